"""The benchmark runs end to end on CPU with the tiny model (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from janus_batch.engine.engine import CPU_BATCH_ROWS

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke_run(tmp_path):
    out = tmp_path / "rows.json"
    subprocess.run(
        # 8 images at 4 a batch: the engine's synthesis rows run two batches.
        [sys.executable, "-m", "benchmarks.bench", "--model", "tiny", "--quick", "--rows", "4", "--json", str(out)],
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    result = json.loads(out.read_text())
    rows = result["rows"]
    impls = {(r["task"], r["impl"].split(",")[0]) for r in rows}
    assert impls == {
        ("generate", "DeepSeek reference loop"),
        ("generate", "transformers generate"),
        ("generate", "janus-batch engine"),
        ("caption", "transformers generate"),
        ("caption", "janus-batch engine"),
    }
    assert all(r["per_second"] > 0 and r["roofline"] > 0 for r in rows)
    # ms/step divides by every decode step timed: 16 tokens an image (64 px), in each of the two batches.
    (engine,) = [r for r in rows if r["task"] == "generate" and r["impl"].startswith("janus-batch engine")]
    assert engine["impl"].endswith("4/batch") and engine["steps"] == 2 * 16
    # In float32 on the CPU the engine's greedy tokens are the reference loop's, every one (no CUDA graphs here),
    # and the reference loop's do not depend on its batch.
    assert result["greedy_token_agreement"] == {
        "reference, 2/call": {"share": 1.0, "first_difference": [None]},
        "eager": {"share": 1.0, "first_difference": [None, None]},
    }


def test_cold_start_smoke_run(tmp_path):
    out = tmp_path / "cold.json"
    checkpoint = tmp_path / "checkpoint"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.cold_start", "--model", "tiny", "--quick", "--dir", str(checkpoint)]
        + ["--json", str(out)],
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    result = json.loads(out.read_text())
    assert (checkpoint / "model.safetensors").exists()  # a real checkpoint, loaded back by the child process
    assert result["images"] == CPU_BATCH_ROWS  # one forward batch: 4 prompts x 16 images
    assert result["total_s"] >= result["load_s"] + result["first_batch_s"] > 0
