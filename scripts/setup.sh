#!/usr/bin/env bash
# Create a virtualenv with janus-batch and its dependencies; pick the right torch build for this machine.
#   scripts/setup.sh                 .venv: the pinned stack, with Ray and the test tools
#   COMPAT=1 scripts/setup.sh        .venv-compat: transformers 5.17 (what our GPU machines ship), no Ray,
#                                    for the engine tests on that release too
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -n "${COMPAT:-}" ]; then VENV=.venv-compat EXTRAS=test; else VENV=.venv EXTRAS=ray,test; fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # GPU machine: PyPI's default Linux wheel is the CUDA build.
    "$VENV/bin/python" -m pip install -q "torch>=2.11"
  else
    # CPU machine: torch 2.13.0. PyPI's Linux wheel of it is the multi-GB CUDA build (it runs on CPU too):
    # point JANUS_TORCH_INDEX at https://download.pytorch.org/whl/cpu for the CPU build.
    "$VENV/bin/python" -m pip install -q ${JANUS_TORCH_INDEX:+--index-url "$JANUS_TORCH_INDEX"} "torch==2.13.0"
  fi
fi
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
if [ -n "${COMPAT:-}" ]; then
  # Over the pin on purpose (pip warns about it): transformers 5.17 wants huggingface_hub < 2.
  "$VENV/bin/python" -m pip install -q "transformers==5.17.0" "huggingface_hub<2"
fi

# tests/test_report.py opens the run report in a real headless browser: Debian's chromium (CI runs as root).
if [ -z "${COMPAT:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup.sh: chromium is missing (the report test needs it): apt-get install chromium" >&2
  fi
fi
