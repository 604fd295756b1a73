#!/usr/bin/env bash
# Create .venv with janus-batch and its dependencies; pick the right torch build for this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # GPU machine: PyPI's default Linux wheel is the CUDA build.
    .venv/bin/python -m pip install -q "torch>=2.11"
  else
    # CPU machine: the CPU build. Where pip's default index would give the multi-GB CUDA build, point
    # JANUS_TORCH_INDEX at https://download.pytorch.org/whl/cpu.
    .venv/bin/python -m pip install -q ${JANUS_TORCH_INDEX:+--index-url "$JANUS_TORCH_INDEX"} "torch==2.13.0"
  fi
fi
.venv/bin/python -m pip install -q -e ".[ray,test]"
