"""The GPU check (benchmarks/device_check.py) runs end to end on CPU with the tiny model: every part runs and its
JSON has every field (a smoke test: no timing is asserted); the bench's, the curation's and the cold start's own
figures; the check's budget, failure and target logic; and the curation's FLOP formula against PyTorch's count."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import JanusForConditionalGeneration

from benchmarks import curation, device_check
from janus_batch.engine import decoder
from janus_batch.engine.memory import CPU_BATCH_ROWS
from janus_batch.model.random_init import janus_pro_config

ROOT = Path(__file__).resolve().parents[1]

# The bench drives transformers' generate and builds Janus configs: both move between transformers releases.
pytestmark = pytest.mark.compat

ROW_FIELDS = {
    "task",
    "kind",
    "impl",
    "items",
    "seconds",
    "steps",
    "peak_gib",
    "peak_reserved_gib",
    "per_second",
    "ms_per_step",
    "roofline",
    "roofline_share",
    "x_reference",
    "x_transformers",
    "model",
    "targets",
    "meets",
}
MEMORY_FIELDS = {
    "gpu_total_gib",
    "budget_gib",
    "weights_gib",
    "kv_cache_gib",
    "workspace_estimate_gib",
    "kv_slots_planned",
    "kv_slots_after",
    "peak_gib",
    "peak_reserved_gib",
    "peak_share_of_budget",
    "within_budget",
    "kv_cut",
}


@pytest.fixture(scope="module")
def check(tmp_path_factory) -> tuple[Path, Path]:
    """One run of the whole check on the tiny model: (its output directory, its work directory). The tests on it
    are marked gpu_stack: `make test` runs them on the GPU machines' stack (.venv-compat) only."""
    base = tmp_path_factory.mktemp("device-check")
    out, work = base / "out", base / "work"
    command = [sys.executable, "-m", "benchmarks.device_check", str(out), "--tiny", "--work-dir", str(work)]
    subprocess.run(command, cwd=ROOT, check=True, timeout=600)
    return out, work


@pytest.mark.gpu_stack
def test_device_check_runs_every_part_and_writes_every_field(check):
    out, _ = check
    summary = json.loads((out / "device_check.json").read_text())
    parts = summary["parts"]
    assert {name: part["status"] for name, part in parts.items()} == dict.fromkeys(device_check.part_names(True), "ok")
    assert all(part["seconds"] >= 0 and part["error"] is None for part in parts.values())
    log = (out / "device_check.log").read_text()
    for name in parts:
        assert f"== {name}: ok in " in log  # each part's elapsed time
    assert summary["tests"]["failed"] == 0 and summary["tests"]["skipped"] > 0  # no GPU here: skipped, not failed

    (bench,) = summary["bench"].values()
    assert bench["errors"] == [] and bench["bandwidth_tb_s"] > 0
    for row in bench["rows"]:
        assert set(row) == ROW_FIELDS
        assert row["x_reference"] > 0 and row["x_transformers"] > 0 and row["roofline_share"] > 0
    assert set(summary["memory"]["tiny"]) == MEMORY_FIELDS  # their values are None on CPU: no planner budget
    agreement = summary["agreement"]
    assert set(agreement["lines"]) == {"reference, 2/call", "eager"} and agreement["within_calibration"] == {
        "eager": True
    }
    cold = summary["cold_start"]
    assert set(cold) == {"load_s", "first_batch_s", "images", "total_s", "start_s", "target_s", "meets"}
    # Every file comes back from the device tool, which brings back 8 at most.
    assert sorted(p.name for p in out.iterdir()) == [
        "agreement-tiny.json",
        "bench-tiny.json",
        "cold-start-tiny.json",
        "curation-tiny.json",
        "device_check.json",
        "device_check.log",
    ]


@pytest.mark.gpu_stack
def test_bench_rows_and_greedy_agreement(check):
    out, _ = check
    rows = json.loads((out / "bench-tiny.json").read_text())["rows"]
    assert {(r["task"], r["kind"]) for r in rows} == {
        (task, kind) for task in ("generate", "caption") for kind in ("engine eager", "transformers", "reference")
    }
    assert all(r["per_second"] > 0 and r["roofline"] > 0 for r in rows)
    # ms/step divides by every decode step timed: 16 tokens an image (64 px), in each of the two batches.
    (engine,) = [r for r in rows if r["task"] == "generate" and r["kind"] == "engine eager"]
    assert engine["impl"].endswith("4/batch") and engine["steps"] == 2 * 16
    # In float32 on the CPU the engine's greedy tokens are the reference loop's, every one (no CUDA graphs here),
    # and the reference loop's do not depend on its batch.
    assert json.loads((out / "agreement-tiny.json").read_text())["greedy_token_agreement"] == {
        "reference, 2/call": {"share": 1.0, "first_difference": [None]},
        "eager": {"share": 1.0, "first_difference": [None, None]},
    }


@pytest.mark.gpu_stack
def test_curation_ratio_beside_its_target_and_predictions(check):
    out, _ = check
    result = json.loads((out / "device_check.json").read_text())["curation"]["tiny"]
    assert (result["candidates_per_prompt"], result["kept_per_prompt"], result["target"]) == (16, 4, 0.25)
    assert all(len(runs) == curation.REPEATS and min(runs) > 0 for runs in result["seconds"].values())
    per_prompt = result["per_prompt_s"]
    assert result["ratios"]["score_and_caption"] == pytest.approx(
        (per_prompt["score"] + per_prompt["caption"]) / per_prompt["generate"]
    )
    assert result["meets"] == (result["ratios"]["score_and_caption"] <= 0.25)
    prediction = result["prediction"]
    for kind in ("flop_ratios", "roofline_ratios"):
        assert set(prediction[kind]) == {"score_and_caption", "score", "caption"}
        assert all(value > 0 for value in prediction[kind].values())
    assert result["tokens"]["score_prefix"] > 16  # the system prompt and the 64 px image's 16 tokens
    log = (out / "device_check.log").read_text()
    assert "curation tiny: (score + caption) / generate " in log and "(target <= 0.25: " in log
    assert "FLOP ratio " in log


@pytest.mark.parametrize("size", ["1b", "7b"])
def test_curation_flop_formula_is_pytorch_s_count_of_the_model(size):
    # On the meta device (no memory, no compute): the formula from the config against PyTorch's FLOP counter over
    # the modules the engine runs, a decode step after 100 cached tokens and one image through SigLIP and the aligner.
    config = janus_pro_config(size)
    cached = 100
    with torch.device("meta"):
        model = JanusForConditionalGeneration(config)
        lm = model.model.language_model
        layers, heads, head_dim = decoder.kv_shape(lm)
        shape = (1, heads, cached + 1, head_dim)
        cache = decoder.KVCache(
            [torch.empty(shape) for _ in range(layers)], [torch.empty(shape) for _ in range(layers)]
        )
        token, pixels = torch.empty(1, 1, config.text_config.hidden_size), torch.empty(1, 3, 384, 384)
        slots, no_padding = torch.tensor([cached]), torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as step:
        decoder.forward(lm, token, slots, no_padding, cache, cached + 1)
    with FlopCounterMode(display=False) as vision:
        model.model.aligner(model.model.vision_model(pixels).last_hidden_state)
    # transformers 5.17's rotary embedding adds a product of its 64 frequencies by the position: 128 FLOPs.
    assert curation.decoder_flops(config.text_config, 1, cached) == pytest.approx(step.get_total_flops(), abs=128)
    assert curation.vision_flops(config) == vision.get_total_flops()


@pytest.mark.gpu_stack
def test_cold_start(check):
    out, work = check
    result = json.loads((out / "cold-start-tiny.json").read_text())
    assert (work / "janus-tiny-random" / "model.safetensors").exists()  # a real checkpoint, loaded back by the child
    assert result["images"] == CPU_BATCH_ROWS  # one forward batch: 4 prompts x 16 images
    assert result["total_s"] >= result["load_s"] + result["first_batch_s"] > 0


def test_a_part_that_fails_shows_its_error_and_one_past_its_time_is_stopped():
    lines: list[str] = []
    fails = [sys.executable, "-c", "print('measured 1 row', flush=True); raise SystemExit('boom: out of memory')"]
    status, error = device_check.run_part(fails, 60, lines.append)
    assert status == "failed" and "boom: out of memory" in error and lines[0] == "measured 1 row"

    start = time.monotonic()
    hangs = [sys.executable, "-c", "print('first row', flush=True); import time; time.sleep(60)"]
    assert device_check.run_part(hangs, 2, lines.append) == ("cut", None)
    assert time.monotonic() - start < 30 and lines[-1] == "first row"  # what it printed before is kept


def test_parts_that_do_not_fit_the_budget_are_skipped_saying_so(tmp_path):
    # No time left: every part that runs on the device is skipped; the memory part (no device time) still runs.
    device_check.main([str(tmp_path), "--tiny", "--budget", "0", "--parts", "bench-tiny", "memory"])
    parts = json.loads((tmp_path / "device_check.json").read_text())["parts"]
    assert [parts[n]["status"] for n in ("tests", "bench-tiny", "memory")] == ["not run", "skipped", "ok"]
    assert (
        "== bench-tiny: skipped, it needs ~0 s and 0 s of the budget are left"
        in (tmp_path / "device_check.log").read_text()
    )
    assert "--parts bench-tiny" in (tmp_path / "device_check.log").read_text()  # the command to run it again


def test_figures_beside_their_targets_and_memory_against_the_budget():
    row = {"task": "generate", "kind": "engine CUDA graphs", "impl": "janus-batch engine, CUDA graphs, 80/batch"}
    row |= {"per_second": 9.0, "roofline_share": 0.9, "x_reference": 25.0, "x_transformers": None, "peak_gib": 60}
    bench = {"rows": [row | {"peak_reserved_gib": 75.0}], "memory": {"budget_gib": 71.7, "kv_slots_planned": 100}}
    bench["memory"]["kv_slots_after"] = 80
    (figure,) = device_check.bench_figures("7b", bench)
    assert figure["meets"] == {"roofline_share": True, "x_reference": False}  # transformers not measured: no verdict
    line = device_check.describe_figure(figure)
    assert "90% of roofline (target 85%: met)" in line and "25.0x reference (target 30.0x: MISSED)" in line
    memory = device_check.memory_check(bench)
    assert memory["within_budget"] is False and memory["kv_cut"] is True and memory["peak_share_of_budget"] > 1
