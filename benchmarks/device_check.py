"""The GPU check of issue 15 in one command: every figure of one run, inside a time budget.

    python3 -m benchmarks.device_check OUT_DIR                         # GPU: 8 minutes at most
    python3 -m benchmarks.device_check OUT_DIR --parts cold-start-7b   # some parts alone (a rerun)
    python3 -m benchmarks.device_check OUT_DIR --tiny                  # CPU smoke run (CI): the tiny model

Its parts, in this order:
1. `tests`: tests/test_engine_gpu.py;
2. `bench-1b`, `bench-7b`: `benchmarks.bench`, synthesis and captioning: the engine with CUDA graphs and eager,
   transformers' generate at its best batch, DeepSeek's reference loop (the anchors kept short);
3. `curation-1b`, `curation-7b`: `benchmarks.curation`, the time to score a prompt's 16 candidates and caption the
   kept 4 against the time to generate them (issue 14: at most 25%), beside its FLOP and roofline predictions;
4. `agreement-7b`: greedy image tokens against the reference loop in bf16, beside the reference against itself
   at another batch shape (two prompts, or one when two would not fit);
5. `memory`: each bench's peak GPU memory against the planner's budget (from the bench's JSON: no GPU time);
6. `cold-start-7b`: `benchmarks.cold_start`, a 7B actor's first batch from local disk.

Each part runs in a process of its own, so a CUDA error or a crash costs that part only: a failing part prints its
error and the next one runs. Each prints its elapsed time. A part is skipped, saying so, when its predicted time
does not fit in what is left of --budget; a part still running when the budget ends is stopped, and keeps the rows
it has written. Every ratio is printed beside its target (issue 15, item 3).

OUT_DIR receives device_check.json (every figure, its ratios and targets, each part's status and time; rewritten
after each part), device_check.log (all output) and each part's own JSON as it measures (bench-1b.json,
bench-7b.json, curation-1b.json, curation-7b.json, agreement-7b.json, cold-start-7b.json): eight files, the most
the device tool brings back. It installs nothing: it needs what the GPU machines have (torch, transformers, numpy,
PIL, safetensors, tokenizers, filelock, huggingface_hub, pytest), not Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[1]
GPU_SIZES = ["1b", "7b"]

# Issue 15's targets for the engine with CUDA graphs: ratios measured in the same run on the same device (the
# absolute figures depend on the card; the H100 ones, from these ratios, beside them).
TARGETS = {
    ("7b", "generate"): {"roofline_share": 0.85, "x_reference": 30.0, "x_transformers": 2.4},
    ("1b", "generate"): {"roofline_share": 0.80},
    ("7b", "caption"): {"roofline_share": 0.85},
    ("1b", "caption"): {"roofline_share": 0.80},
}
H100_PER_SECOND = {("7b", "generate"): 10, ("1b", "generate"): 30, ("7b", "caption"): 45, ("1b", "caption"): 150}
COLD_START_TARGET_S = 90

# What the budget plans with on an H100 or H200, in seconds: the anchors of ../shared/DESIGN.md section 3 and the
# bench's own arithmetic (benchmarks/RESULTS.md). The tiny model's parts are not predicted (0).
# curation-*: the model built, then a warm-up and 3 timed runs of one generation batch (~10 s on an H200: 448 images
# for 1B, 160 for 7B), its scoring (~2 s) and captions (~1 s).
PREDICTED_S = {
    "tests": 60,
    "bench-1b": 120,
    "bench-7b": 150,
    "curation-1b": 80,
    "curation-7b": 90,
    "cold-start-7b": 120,
}
# The agreement: building the model and the engine's greedy runs, then one 576-step reference call per prompt
# and one for the calibration line, at the reference loop's step time as the bench measured it.
AGREEMENT_SETUP_S = 45
REFERENCE_MS_PER_STEP = 100  # DeepSeek's loop on an H100 (55.7 s for 576 steps), until the bench measures it
IMAGE_TOKENS = 576


def part_names(tiny: bool) -> list[str]:
    sizes = ["tiny"] if tiny else GPU_SIZES
    last = sizes[-1]
    benches = [f"{kind}-{s}" for kind in ("bench", "curation") for s in sizes]
    return ["tests", *benches, f"agreement-{last}", "memory", f"cold-start-{last}"]


def run_part(command: list[str], timeout_s: float, log: Callable[[str], None]) -> tuple[str, str | None]:
    """Run `command`, its output logged line by line. ("ok", None), ("failed", its last lines), or ("cut", None)
    when it was still running after timeout_s (then it is killed, with every process it started)."""
    env = os.environ | {"PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # no \r bars in the log
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    expired = threading.Event()

    def stop() -> None:
        expired.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(max(timeout_s, 0.0), stop)
    timer.start()
    tail: deque[str] = deque(maxlen=15)
    try:
        for line in proc.stdout:
            log(line.rstrip("\n"))
            tail.append(line.rstrip("\n"))
    finally:
        timer.cancel()
    code = proc.wait()
    if expired.is_set():
        return "cut", None
    if code != 0:
        return "failed", f"exit code {code}:\n" + "\n".join(tail)
    return "ok", None


def gpu_available() -> bool:
    import torch  # here only: the tiny run's parent needs no torch (a second or more to import)

    return torch.cuda.is_available()  # asks the driver; creates no CUDA context, takes no GPU memory


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def test_counts(junit: Path) -> dict | None:
    """Passed, failed (failures and errors), skipped, and the failing tests, from pytest's JUnit XML."""
    if not junit.exists():
        return None
    cases = ElementTree.parse(junit).getroot().iter("testcase")
    outcome = {}
    for case in cases:
        tags = {child.tag for child in case}
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome[name] = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
    counts = {k: sum(v == k for v in outcome.values()) for k in ("passed", "failed", "skipped")}
    return counts | {"failures": [name for name, v in outcome.items() if v == "failed"]}


def bench_figures(size: str, bench: dict) -> list[dict]:
    """The bench's rows, the engine's with CUDA graphs each with its targets and whether it meets them."""
    figures = []
    for row in bench["rows"]:
        graphs = row["kind"] == "engine CUDA graphs"
        targets = TARGETS.get((size, row["task"]), {}) if graphs else {}
        meets = {key: row[key] >= target for key, target in targets.items() if row[key] is not None}
        figures.append(row | {"model": size, "targets": targets, "meets": meets})
    return figures


def describe_figure(row: dict) -> str:
    """One row with its ratios, each beside its target."""
    unit = "images/s" if row["task"] == "generate" else "captions/s"
    words = [f"{row['task']:8} {row['impl']:50} {row['per_second']:8.2f} {unit}"]
    for key, label in (("roofline_share", "of roofline"), ("x_reference", "x reference"), ("x_transformers", "x HF")):
        value, target = row[key], row["targets"].get(key)
        if value is None:
            continue
        shown = f"{100 * value:.0f}% {label}" if key == "roofline_share" else f"{value:.1f}{label}"
        if target is not None:
            wanted = f"{100 * target:.0f}%" if key == "roofline_share" else f"{target}x"
            shown += f" (target {wanted}: {'met' if row['meets'][key] else 'MISSED'})"
        words.append(shown)
    if row["targets"] and (row["model"], row["task"]) in H100_PER_SECOND:
        words.append(f"[on an H100: >= {H100_PER_SECOND[row['model'], row['task']]}]")
    return "  ".join(words)


def describe_curation(size: str, curation: dict) -> str:
    """The curation's measured ratio beside its target and its predictions."""
    prediction = curation["prediction"]
    predicted = (
        f"predicted {prediction['roofline_ratios']['score_and_caption']:.2f} from the rooflines, "
        f"FLOP ratio {prediction['flop_ratios']['score_and_caption']:.2f}"
    )
    if curation["ratios"] is None:  # stopped before its first timed run
        return f"curation {size}: not measured; {predicted}"
    ratios = curation["ratios"]
    verdict = "met" if curation["meets"] else "MISSED"
    line = (
        f"curation {size}: (score + caption) / generate {ratios['score_and_caption']:.3f} "
        f"(target <= {curation['target']}: {verdict}; score {ratios['score']:.3f}, caption {ratios['caption']:.3f}); "
        + predicted
    )
    if curation["peak_reserved_gib"] is not None:
        line += f"; peak held {curation['peak_reserved_gib']:.1f} GiB of a {curation['budget_gib']:.1f} GiB budget"
    return line


def agreement_check(result: dict | None) -> dict | None:
    """The agreement lines, and per engine mode whether it is no further from the reference than the reference
    is from itself at another batch shape (the share of equal tokens)."""
    lines = (result or {}).get("greedy_token_agreement")
    if lines is None:
        return None
    calibration = lines["reference, 2/call"]
    within = {
        mode: line["share"] >= calibration["share"]
        for mode, line in lines.items()
        if mode != "reference, 2/call" and line is not None
    }
    return {"model": result["model"], "lines": lines, "within_calibration": within}


def memory_check(bench: dict) -> dict:
    """The planner's budget beside the peak memory of the engine's rows: allocated, and held by the allocator (what
    the card gives up); the KV cache cut means an out-of-memory retry at the planned batch. None where not known."""
    plan = bench["memory"]
    engine = [r for r in bench["rows"] if r["kind"].startswith("engine")]
    peak = max((r["peak_gib"] for r in engine), default=None)
    reserved = max((r["peak_reserved_gib"] for r in engine), default=None)
    budget, planned, after = plan["budget_gib"], plan["kv_slots_planned"], plan["kv_slots_after"]
    known = budget is not None and reserved is not None
    return plan | {
        "peak_gib": peak,
        "peak_reserved_gib": reserved,
        "peak_share_of_budget": reserved / budget if known else None,
        "within_budget": reserved <= budget if known else None,
        "kv_cut": after < planned if planned is not None and after is not None else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where the JSON and the log go")
    parser.add_argument("--tiny", action="store_true", help="the tiny model, small runs: a CPU smoke run")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole check (default: 8 min)")
    parser.add_argument("--parts", nargs="+", default=None, help="run only these parts (default: all, in order)")
    parser.add_argument(
        "--work-dir", type=Path, default=Path("/tmp/janus-device-check"), help="checkpoints, test reports"
    )
    args = parser.parse_args(argv)

    start = time.monotonic()
    deadline = start + args.budget
    names = part_names(args.tiny)
    chosen = args.parts or names
    if unknown := set(chosen) - set(names):
        parser.error(f"unknown parts {sorted(unknown)}: choose from {names}")
    if not args.tiny and not gpu_available():
        parser.error("no CUDA GPU: the 1B and 7B runs need one (--tiny is the CPU smoke run)")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    quick = ["--quick"] if args.tiny else []
    py = sys.executable

    summary: dict = {
        "command": " ".join([Path(py).name, "-m", "benchmarks.device_check", *(argv or sys.argv[1:])]),
        "budget_s": args.budget,
        "elapsed_s": 0.0,
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "device": None,
        "parts": {name: {"status": "not run", "seconds": None, "predicted_s": None, "error": None} for name in names},
        "tests": None,
        "bench": {},
        "curation": {},
        "agreement": None,
        "memory": {},
        "cold_start": None,
    }
    log_file = open(args.out / "device_check.log", "w")  # noqa: SIM115 (open for the whole run)

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    def write_summary() -> None:
        summary["elapsed_s"] = time.monotonic() - start
        (args.out / "device_check.json").write_text(json.dumps(summary, indent=1))

    def predicted(name: str, left: float) -> tuple[float, list[str]]:
        """Seconds the part should take and its extra arguments (the agreement: as many prompts as fit)."""
        if args.tiny:
            return 0.0, []
        if not name.startswith("agreement-"):
            return PREDICTED_S.get(name, 0.0), []
        size = name.removeprefix("agreement-")
        bench = read_json(args.out / f"bench-{size}.json") or {"rows": []}
        ms = [r["ms_per_step"] for r in bench["rows"] if r["kind"] == "reference" and r["task"] == "generate"]
        per_call = IMAGE_TOKENS * (ms[0] if ms else REFERENCE_MS_PER_STEP) / 1000
        need = {prompts: AGREEMENT_SETUP_S + (prompts + 1) * per_call for prompts in (2, 1)}
        prompts = 2 if need[2] <= left else 1
        return need[prompts], ["--agreement-prompts", str(prompts)]

    def command(name: str, extra: list[str]) -> list[str]:
        kind, _, size = name.rpartition("-")
        if name == "tests":
            junit = args.work_dir / "gpu-tests.xml"
            junit.unlink(missing_ok=True)
            return [py, "-m", "pytest", "--noconftest", "-p", "no:cacheprovider", "-q", "-rfEs"] + [
                "tests/test_engine_gpu.py",
                f"--junitxml={junit}",
            ]
        if kind == "bench":
            # The tiny run at 4 rows a batch: its synthesis run makes two batches (the smoke test counts the steps).
            rows = ["--rows", "4"] if args.tiny else []
            return [py, "-m", "benchmarks.bench", "--model", size, "--task", "generate", "caption", *quick, *rows] + [
                "--json",
                str(args.out / f"{name}.json"),
            ]
        if kind == "curation":
            return [py, "-m", "benchmarks.curation", "--model", size, *quick, "--json", str(args.out / f"{name}.json")]
        if kind == "agreement":
            return [py, "-m", "benchmarks.bench", "--model", size, "--task", "agreement", *quick, *extra] + [
                "--json",
                str(args.out / f"{name}.json"),
            ]
        checkpoint = args.work_dir / f"janus-{size}-random"
        return [py, "-m", "benchmarks.cold_start", "--model", size, "--dir", str(checkpoint), *quick] + [
            "--json",
            str(args.out / f"{name}.json"),
        ]

    def collect(name: str) -> None:
        """Read what the part wrote into the summary, and print its figures beside their targets."""
        kind, _, size = name.rpartition("-")
        if name == "tests":
            summary["tests"] = test_counts(args.work_dir / "gpu-tests.xml")
            log(f"  tests: {summary['tests']}")
        elif kind == "bench" and (bench := read_json(args.out / f"{name}.json")) is not None:
            summary["device"] = bench["device"]
            figures = bench_figures(size, bench)
            keep = ("device", "bandwidth_tb_s", "rooflines", "memory", "errors")
            summary["bench"][size] = {k: bench[k] for k in keep} | {"rows": figures}
            for row in figures:
                log("  " + describe_figure(row))
        elif kind == "curation" and (curation := read_json(args.out / f"{name}.json")) is not None:
            summary["curation"][size] = curation
            log(f"  {describe_curation(size, curation)}")
        elif kind == "agreement":
            summary["agreement"] = agreement_check(read_json(args.out / f"{name}.json"))
            for mode, line in (summary["agreement"] or {"lines": {}})["lines"].items():
                log(f"  {mode}: {line}")
            if summary["agreement"]:
                within = summary["agreement"]["within_calibration"]
                log(f"  no further from the reference than the reference from itself at 2/call: {within}")
        elif name == "memory":
            for size, bench in summary["bench"].items():
                summary["memory"][size] = memory_check(bench)
                log(f"  {size}: {summary['memory'][size]}")
        elif kind == "cold-start" and (cold := read_json(args.out / f"{name}.json")) is not None:
            meets = cold["total_s"] <= COLD_START_TARGET_S
            summary["cold_start"] = cold | {"target_s": COLD_START_TARGET_S, "meets": meets}
            log(
                f"  cold start {cold['total_s']:.1f} s (target {COLD_START_TARGET_S} s: {'met' if meets else 'MISSED'})"
            )

    write_summary()
    log(f"device check: parts {chosen}, budget {args.budget:.0f} s")
    for name in names:
        if name not in chosen:
            continue
        record = summary["parts"][name]
        left = deadline - time.monotonic()
        need, extra = predicted(name, left)
        record["predicted_s"] = need
        if name != "memory" and need > left:
            record["status"] = "skipped"
            log(f"== {name}: skipped, it needs ~{need:.0f} s and {max(left, 0):.0f} s of the budget are left")
            write_summary()
            continue
        log(f"== {name}" + (f" (predicted ~{need:.0f} s)" if need else ""))
        part_start = time.monotonic()
        if name == "memory":
            status, error = "ok", None  # computed here, from the benches' JSON
        else:
            status, error = run_part(command(name, extra), left, log)
        try:
            collect(name)
        except Exception as e:  # a part cut short can leave its JSON incomplete: its status says so already
            status, error = "failed", error or f"reading its results: {type(e).__name__}: {e}"
        record.update(status=status, seconds=time.monotonic() - part_start, error=error)
        used = time.monotonic() - start
        log(f"== {name}: {status} in {record['seconds']:.1f} s ({used:.0f} s of {args.budget:.0f} s used)")
        if error:
            log(f"   {name} error: {error}")
        write_summary()

    log("device check summary:")
    for name, record in summary["parts"].items():
        seconds = "" if record["seconds"] is None else f" in {record['seconds']:.1f} s"
        log(f"  {name:16} {record['status']}{seconds}")
    for size, bench in summary["bench"].items():
        for row in bench["rows"]:
            if row["targets"]:
                log(f"  {size} " + describe_figure(row))
    for size, curation in summary["curation"].items():
        log(f"  {describe_curation(size, curation)}")
    if agreement := summary["agreement"]:
        shares = {
            mode: None if line is None else round(100 * line["share"], 2) for mode, line in agreement["lines"].items()
        }
        log(
            f"  agreement {agreement['model']} (% equal tokens): {shares}; "
            f"within calibration: {agreement['within_calibration']}"
        )
    for size, memory in summary["memory"].items():
        if memory["budget_gib"] is not None and memory["peak_reserved_gib"] is not None:
            log(
                f"  memory {size}: peak held {memory['peak_reserved_gib']:.1f} GiB of a {memory['budget_gib']:.1f} GiB "
                f"budget, KV cache cut: {memory['kv_cut']}"
            )
    if cold := summary["cold_start"]:
        log(
            f"  cold start {cold['total_s']:.1f} s "
            f"(target {cold['target_s']} s: {'met' if cold['meets'] else 'MISSED'})"
        )
    again = [n for n, r in summary["parts"].items() if n in chosen and r["status"] in ("skipped", "cut", "failed")]
    if again:
        log(f"to run again: {Path(py).name} -m benchmarks.device_check OUT_DIR --parts {' '.join(again)}")
    write_summary()
    log_file.close()
    if any(summary["parts"][n]["status"] in ("cut", "failed") for n in chosen):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
