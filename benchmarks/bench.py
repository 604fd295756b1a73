"""Janus throughput, in one process: the janus-batch engine, transformers' generate and DeepSeek's reference loop.

Random weights at the real Janus-Pro dims (janus_batch/model/random_init.py), built on the device (no downloads), or
the tiny model:

    python -m benchmarks.bench --model 7b                     # GPU: synthesis, captioning, greedy agreement
    python -m benchmarks.bench --model 1b --task generate
    python -m benchmarks.bench --model tiny --quick           # CPU smoke run: its timings mean nothing

`python -m benchmarks.device_check OUT_DIR` runs it for 1B and 7B inside the GPU check's time budget.

Synthesis: 384x384 images, 576 tokens, CFG 5, temperature 1, 16 images per prompt. Captioning: 576 image tokens
+ ~120 prompt tokens, 64 new tokens, greedy. Each row prints items/s, ms per decode step, peak memory and the
share of a roofline computed from the bandwidth (and, for the caption prefill, the matrix-product rate) measured
on this device; the JSON adds the ratios to the reference and to transformers at its best batch.

The engine runs first (with CUDA graphs on a GPU, then eager), one full forward batch after a warm-up batch; then
the anchors, kept short: transformers' generate one call at its best batch, DeepSeek's loop over its first
REFERENCE_STEPS decode steps (launch-bound: each step costs about the same). Last, the share of greedy image
tokens the engine makes as the reference loop does, beside the reference loop against itself at another batch
shape.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from typing import TypeVar

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import StaticCache

from janus_batch.engine import JanusEngine, decoder, memory
from janus_batch.engine.images import normalize
from janus_batch.model.random_init import SIZES, build_random_model, weight_bytes
from janus_batch.options import ImageSampling, TextSampling
from tests.reference import reference_generate

PROMPT = "A stunning princess from kabul in red, white traditional clothing, blue eyes, brown hair"
QUESTION = "Describe this image in detail, including the objects, the colours and the mood of the scene."
# The greedy agreement's prompts: two lengths, so the engine's batch is left-padded.
AGREEMENT_PROMPTS = [PROMPT, "a red fox"]
TASKS = ["generate", "caption", "agreement"]

# DeepSeek's loop is timed over its first steps only: ~100 ms a step on an H100, so a whole call is a minute.
REFERENCE_STEPS = 96
# What the 'x reference' ratio divides by: DeepSeek's loop for synthesis, one image per call for captioning.
BASELINES = {"generate": "DeepSeek reference loop", "caption": "transformers generate, 1/call"}
CAPTION_BASELINE_IMAGES = 2
# transformers' best batches on an H100 (../shared/DESIGN.md section 3); the tiny model: images_per_prompt.
HF_BEST_ROWS = {"generate": {"7b": 64, "1b": 128}, "caption": {"7b": 128, "1b": 128}}

T = TypeVar("T")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth(device: torch.device) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync(device)
    return 2 * n * 10 / (time.perf_counter() - start)


def measure_matmul(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large matrix product in the model's dtype, on random data (zeros run faster)."""
    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n**3 * 10 / (time.perf_counter() - start)


@dataclass
class Row:
    task: str
    kind: str  # "engine CUDA graphs", "engine eager", "transformers" (at its best batch) or "reference"
    impl: str
    items: float  # images or captions made; a fraction of them when only the first decode steps are timed
    seconds: float
    steps: int  # decode steps timed, every batch's counted
    peak_gib: float  # GPU memory allocated (0 on CPU)
    peak_reserved_gib: float  # GPU memory the allocator held

    @property
    def per_second(self) -> float:
        return self.items / self.seconds

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.seconds / self.steps


def timed(
    task: str,
    kind: str,
    impl: str,
    items: float,
    steps: int,
    device: torch.device,
    fn: Callable[[], object],
    warm_up: bool = True,
) -> Row:
    if warm_up:
        fn()  # allocator, kernels, lazy initialisation, CUDA graph capture
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - start
    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0
    return Row(task, kind, impl, items, seconds, steps, peak, reserved)


def attempt(errors: list[str], what: str, fn: Callable[..., T], *args) -> T | None:
    """fn(*args), or None with the error printed and kept in `errors`: one failing implementation must not cost
    the others' figures."""
    try:
        return fn(*args)
    except Exception as e:
        errors.append(f"{what}: {type(e).__name__}: {e}")
        print(f"{what} failed: {type(e).__name__}: {e}", flush=True)
        return None


def decoder_bytes(engine: JanusEngine) -> int:
    """Weights a decode step reads: the decoder layers and norm (an embedding lookup reads one row, not the table)."""
    return weight_bytes(engine.lm) - weight_bytes(engine.lm.embed_tokens)


def generation_roofline(engine: JanusEngine, images: int, prompt_len: int, bandwidth: float) -> float:
    """Images/s of a call for `images` images, at the forward batch the engine runs them in (its memory plan), if
    each decode step only had to read the weights once and the filled KV cache of 2 x rows."""
    rows = engine.memory.batch_size(images, 2, prompt_len + engine.num_gen_tokens)
    model = engine.model.model
    weights = decoder_bytes(engine) + weight_bytes(model.generation_aligner) + weight_bytes(model.generation_head)
    mean_filled = prompt_len + engine.num_gen_tokens / 2
    kv = 2 * rows * decoder.bytes_per_slot(engine.lm, engine.dtype) * mean_filled
    return rows / (engine.num_gen_tokens * (weights + kv) / bandwidth)


def caption_roofline(
    engine: JanusEngine, captions: int, prompt_len: int, new_tokens: int, bandwidth: float, flops: float
) -> float:
    """Captions/s of a call for `captions` captions, at the engine's forward batch, if the prefill ran at the
    measured matrix-product rate (2 FLOP per weight per token: the decoder over the prompt, the vision tower over
    the image's patches; attention is ~2% more) and each decode step only had to read the weights once and the
    filled KV cache at the measured bandwidth."""
    rows = engine.memory.batch_size(captions, 1, prompt_len + new_tokens)
    model = engine.model.model
    vision = sum(p.numel() for p in model.vision_model.parameters()) + sum(
        p.numel() for p in model.aligner.parameters()
    )
    layers = decoder_bytes(engine) // engine.dtype.itemsize
    prefill = 2 * (layers * prompt_len + vision * engine.num_image_tokens) / flops
    weights = decoder_bytes(engine) + weight_bytes(engine.model.lm_head)
    kv = rows * decoder.bytes_per_slot(engine.lm, engine.dtype) * (prompt_len + new_tokens / 2)
    return rows / (rows * prefill + new_tokens * (weights + kv) / bandwidth)


def measured_on(device_name: str, model: str, dtype: torch.dtype, bandwidth: float, flops: float) -> dict:
    """The first keys of a benchmark's JSON: the machine, the stack and the model it measured."""
    return {
        "device": device_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": model,
        "dtype": str(dtype),
        "bandwidth_tb_s": bandwidth / 1e12,
        "matmul_tflop_s": flops / 1e12,
    }


# A measurement: (what it is, the function that measures it). The plans below are generators, so what runs
# between two measurements (releasing the KV cache) runs in order, and a failure costs one row only.
Measurement = tuple[str, Callable[[], Row]]


# The engine in each of its modes, by name: on a GPU with CUDA graphs, then eager; eager alone on CPU.
Engines = dict[str, JanusEngine]


def mode_engines(model, processor, **settings) -> Engines:
    """An engine per mode, on the same model with the same settings. One holds a KV cache at a time (`release`
    before each run), so each plans its cache in the same memory."""
    on_gpu = next(model.parameters()).device.type == "cuda"
    modes = {"CUDA graphs": True, "eager": False} if on_gpu else {"eager": False}
    return {mode: JanusEngine(model, processor, cuda_graphs=graphs, **settings) for mode, graphs in modes.items()}


def release(engines: Engines) -> None:
    """Free every engine's KV cache and CUDA graphs (and the allocator's cache): the next run's peak memory is its
    own alone."""
    for engine in engines.values():
        engine.memory.release()


def kv_slots_now(engines: Engines) -> int | None:
    """The KV cache slots of the engine holding one now (the last to run): fewer than planned once an out-of-memory
    retry has cut it. None on CPU, where no budget sizes the cache."""
    return next((e.memory.capacity for e in engines.values() if e.memory.kv is not None), None)


def engine_rows(
    engines: Engines, task: str, items: int, steps: int, per_batch: int, run: Callable[[JanusEngine], object]
) -> Iterator[Measurement]:
    """The engines' rows of a task, `run(engine)` each: the first mode after a warm-up run of the same batches
    (kernels, KV cache allocation, graph capture); eager after it needs none (the same kernels, no capture)."""
    for i, (mode, engine) in enumerate(engines.items()):
        release(engines)  # a measurement runs before its plan resumes
        impl = f"janus-batch engine, {mode}, {per_batch}/batch"
        yield (
            impl,
            partial(timed, task, f"engine {mode}", impl, items, steps, engine.device, partial(run, engine), i == 0),
        )
    release(engines)  # the engine's KV cache takes most of the GPU


def bench_generate(engines: Engines, prompts: int, images_per_prompt: int, hf_rows: int) -> Iterator[Measurement]:
    engine = next(iter(engines.values()))
    model, n, device = engine.model, engine.num_gen_tokens, engine.device
    ids = engine.generation_ids(PROMPT)
    batch = [PROMPT + f" #{i}" for i in range(prompts)]
    images = prompts * images_per_prompt
    per_batch = engine.memory.batch_size(images, 2, len(ids) + n)
    sampling = ImageSampling(images_per_prompt=images_per_prompt)  # CFG 5, temperature 1: DeepSeek's defaults

    def run(engine: JanusEngine) -> list:
        return engine.generate_images(batch, sampling)

    yield from engine_rows(engines, "generate", images, n * -(-images // per_batch), per_batch, run)

    input_ids = torch.tensor([ids] * (hf_rows // images_per_prompt), device=device)

    def hf_generate():
        model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_mode="image",
            do_sample=True,
            num_return_sequences=images_per_prompt,
            guidance_scale=5.0,
            temperature=1.0,
            top_k=0,
            # Our own cache, as generate would make it: transformers 5.17's image generate fails to make one
            # (a TypeError from _prepare_static_cache), and 5.17 is what GPU images ship.
            past_key_values=StaticCache(config=model.config, max_cache_len=input_ids.shape[1] + n),
        )
        engine.decode_image_tokens(torch.zeros((hf_rows, n), dtype=torch.long))  # same VQ work as the others

    impl = f"transformers generate, {hf_rows}/call"
    # No warm-up: the engine's rows have warmed the process up, and one call takes 15 s on an H100.
    yield impl, partial(timed, "generate", "transformers", impl, hf_rows, n, device, hf_generate, False)
    steps = min(REFERENCE_STEPS, n)
    impl = f"{BASELINES['generate']}, {images_per_prompt}/call" + (f", first {steps} of {n} steps" if steps < n else "")
    reference = partial(reference_generate, model, ids, engine.pad_id, images_per_prompt, 5.0, 1.0, steps=steps)
    # images_per_prompt x steps / n: the images' worth of decoding timed (launch-bound, no warm-up needed).
    yield (
        impl,
        partial(timed, "generate", "reference", impl, images_per_prompt * steps / n, steps, device, reference, False),
    )


def bench_caption(engines: Engines, images: int, hf_rows: int, new_tokens: int) -> Iterator[Measurement]:
    engine = next(iter(engines.values()))
    model, device = engine.model, engine.device
    rng = np.random.default_rng(0)
    distinct = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(8)]
    prepared = [engine.prepare_image(im) for im in distinct]
    pixels = [prepared[i % len(prepared)] for i in range(max(images, hf_rows))]
    prompt = engine.understanding_ids(QUESTION)

    def hf_caption(batch: int, count: int):
        def run():
            for start in range(0, count, batch):
                n = min(batch, count - start)
                ids = torch.tensor([prompt] * n, device=device)
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    pixel_values=normalize(torch.from_numpy(np.stack(pixels[start : start + n])).to(device)).to(
                        engine.dtype
                    ),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,  # random weights: keep every row to the same length
                    do_sample=False,
                    generation_mode="text",
                )

        return run

    per_batch = engine.memory.batch_size(images, 1, len(prompt) + new_tokens)
    # Random weights: never stop early, so every implementation makes new_tokens tokens.
    sampling = TextSampling(max_new_tokens=new_tokens, ignore_eos=True)

    def run(engine: JanusEngine) -> list:
        return engine.understand(pixels[:images], [QUESTION] * images, sampling)

    yield from engine_rows(engines, "caption", images, new_tokens * -(-images // per_batch), per_batch, run)
    impl = f"transformers generate, {hf_rows}/call"
    yield (
        impl,
        partial(timed, "caption", "transformers", impl, hf_rows, new_tokens, device, hf_caption(hf_rows, hf_rows)),
    )
    one = CAPTION_BASELINE_IMAGES
    impl = BASELINES["caption"]
    yield impl, partial(timed, "caption", "reference", impl, one, new_tokens * one, device, hf_caption(1, one))


def greedy_agreement(engines: Engines, prompts: list[str], errors: list[str]) -> dict[str, dict | None]:
    """Greedy image tokens against DeepSeek's reference loop on the same model, one image per prompt (prompts of
    different lengths share the engine's batch): per engine mode, the share of equal tokens and the step of each
    image's first difference. In bf16 a kernel's rounding can flip a near tie, and the image goes another way
    from there. 'reference, 2/call' measures that effect alone: the reference loop against itself at another
    batch shape (the first prompt only: the loop is slow)."""
    engine = next(iter(engines.values()))
    ids = [engine.generation_ids(p) for p in prompts]
    release(engines)  # the engine's KV cache takes most of the GPU
    want = torch.cat([reference_generate(engine.model, i, engine.pad_id, 1, 5.0, greedy=True)[0] for i in ids])
    again = reference_generate(engine.model, ids[0], engine.pad_id, 2, 5.0, greedy=True)[0][:1]
    agreement = {"reference, 2/call": compare_tokens(again, want[:1])}
    greedy = ImageSampling(images_per_prompt=1, cfg_weight=5.0, greedy=True)
    for mode, engine in engines.items():
        release(engines)
        got = attempt(errors, f"engine, {mode}", engine.generate_image_tokens, ids, [0] * len(ids), greedy)
        agreement[mode] = None if got is None else compare_tokens(got.cpu(), want)
    return agreement


def compare_tokens(got: torch.Tensor, want: torch.Tensor) -> dict:
    """Share of equal tokens, and per row the first step where they differ (None: never)."""
    first = [int(row.nonzero()[0]) if row.any() else None for row in got != want]
    return {"share": (got == want).float().mean().item(), "first_difference": first}


def describe_agreement(name: str, result: dict | None) -> str:
    if result is None:
        return f"{name} failed"
    steps = ", ".join("none" if s is None else str(s) for s in result["first_difference"])
    return f"{name} {100 * result['share']:.2f}% (first difference at step: {steps})"


def memory_plan(engine: JanusEngine) -> dict[str, float | int | None]:
    """The planner's budget on this GPU (every value None on CPU, where there is none): the engine's share of
    the card, what it holds as weights, the KV cache it planned and the workspace it allowed for."""
    plan = dict.fromkeys(
        ["gpu_total_gib", "budget_gib", "weights_gib", "kv_cache_gib", "workspace_estimate_gib", "kv_slots_planned"]
    )
    if engine.device.type != "cuda":
        return plan
    gib = 2**-30
    total = torch.cuda.mem_get_info(engine.device)[1]
    slots = engine.memory.capacity
    plan.update(
        gpu_total_gib=total * gib,
        budget_gib=engine.memory.gpu_memory_utilization * total * gib,
        weights_gib=weight_bytes(engine.model) * gib,
        kv_cache_gib=slots * decoder.bytes_per_slot(engine.lm, engine.dtype) * gib,
        workspace_estimate_gib=memory.workspace_bytes(engine.model, engine.dtype, engine.vq_batch, slots) * gib,
        kv_slots_planned=slots,
    )
    return plan


def with_ratios(rows: list[Row], rooflines: dict[str, float]) -> list[dict]:
    """The rows as JSON, each with its share of the roofline and its ratios to the reference and to
    transformers (None until that baseline is measured)."""
    baselines = {(r.task, r.kind): r.per_second for r in rows if r.kind in ("reference", "transformers")}
    out = []
    for r in rows:
        reference, hf = baselines.get((r.task, "reference")), baselines.get((r.task, "transformers"))
        out.append(
            asdict(r)
            | {
                "per_second": r.per_second,
                "ms_per_step": r.ms_per_step,
                "roofline": rooflines[r.task],
                "roofline_share": r.per_second / rooflines[r.task],
                "x_reference": r.per_second / reference if reference else None,
                "x_transformers": r.per_second / hf if hf else None,
            }
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=SIZES, default="tiny")
    parser.add_argument("--task", nargs="+", choices=TASKS, default=TASKS, help="what to run (agreement last)")
    parser.add_argument("--rows", type=int, default=None, help="engine max_batch_rows (default: GPU memory; 16 CPU)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts in the engine run (default: 1 batch)")
    parser.add_argument("--captions", type=int, default=None, help="images captioned (default: 1 engine batch)")
    parser.add_argument("--hf-rows", type=int, default=None, help="images per transformers call (default: its best)")
    parser.add_argument("--agreement-prompts", type=int, choices=[1, 2], default=2, help="prompts compared greedy")
    parser.add_argument("--quick", action="store_true", help="small runs (and the 64 px tiny model) for a smoke test")
    parser.add_argument("--json", default=None, help="also write everything measured to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    images_per_prompt = 4 if args.quick else 16
    new_tokens = 8 if args.quick else 64

    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    model, processor = build_random_model(args.model, device, dtype, args.quick)
    rows = args.rows or (None if device.type == "cuda" else 16)
    # A prompt's images are VQ-decoded together (16 images, the engine's default, on a GPU; 4 in the quick run).
    engines = mode_engines(model, processor, max_batch_rows=rows, vq_batch=images_per_prompt)
    engine = next(iter(engines.values()))  # the plan and the rooflines: every mode's are the same
    bandwidth, flops = measure_bandwidth(device), measure_matmul(device, dtype)
    prompt_len = len(engine.generation_ids(PROMPT))
    caption_len = len(engine.understanding_ids(QUESTION))
    image_batch = engine.memory.batch_limit(2, prompt_len + engine.num_gen_tokens)
    caption_batch = engine.memory.batch_limit(1, caption_len + new_tokens)
    # One full batch at most: one image more would split the run into two smaller batches.
    prompts = args.prompts or (2 if args.quick else max(1, image_batch // images_per_prompt))
    captions = args.captions or (4 if args.quick else caption_batch)
    hf_rows = {task: args.hf_rows or best.get(args.model, images_per_prompt) for task, best in HF_BEST_ROWS.items()}
    hf_rows["caption"] = min(hf_rows["caption"], captions)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"device {device_name}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"model {args.model} ({dtype}) built in {time.perf_counter() - start:.1f} s, "
        f"measured bandwidth {bandwidth / 1e12:.2f} TB/s, matrix products {flops / 1e12:.0f} TFLOP/s"
    )
    memory = memory_plan(engine)
    if memory["kv_slots_planned"] is not None:
        print(
            f"KV cache {memory['kv_slots_planned']} slots ({memory['kv_cache_gib']:.1f} GiB) beside "
            f"{memory['weights_gib']:.1f} GiB of weights, budget {memory['budget_gib']:.1f} GiB of "
            f"{memory['gpu_total_gib']:.1f}: up to {image_batch} images or {caption_batch} captions a batch"
        )

    rooflines = {
        "generate": generation_roofline(engine, prompts * images_per_prompt, prompt_len, bandwidth),
        "caption": caption_roofline(engine, captions, caption_len, new_tokens, bandwidth, flops),
    }
    errors: list[str] = []
    rows: list[Row] = []
    result = {
        **measured_on(device_name, args.model, dtype, bandwidth, flops),
        "rooflines": rooflines,
        "memory": memory | {"kv_slots_after": None},
        "rows": [],
        "greedy_token_agreement": None,
        "errors": errors,
    }

    def write_json() -> None:
        # Rewritten at every row: a run cut short keeps what it has.
        if args.json:
            result["rows"] = with_ratios(rows, rooflines)
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    plans = {
        "generate": lambda: bench_generate(engines, prompts, images_per_prompt, hf_rows["generate"]),
        "caption": lambda: bench_caption(engines, captions, hf_rows["caption"], new_tokens),
    }
    write_json()
    row_tasks = [task for task in ("generate", "caption") if task in args.task]
    if row_tasks:
        print(f"{'task':9} {'implementation':52} {'items/s':>9} {'ms/step':>8} {'peak GiB':>8} {'% roof':>7}")
    for task in row_tasks:
        for what, measure in plans[task]():
            row = attempt(errors, what, measure)
            if row is not None:
                rows.append(row)
                print(
                    f"{row.task:9} {row.impl:52} {row.per_second:9.2f} {row.ms_per_step:8.2f} {row.peak_gib:8.1f} "
                    f"{100 * row.per_second / rooflines[task]:6.1f}%",
                    flush=True,
                )
            # Below the plan: never out of memory at the planned batch (an OOM retry cuts the KV cache).
            slots, after = kv_slots_now(engines), result["memory"]["kv_slots_after"]
            if slots is not None:
                result["memory"]["kv_slots_after"] = slots if after is None else min(slots, after)
            write_json()
    for row in with_ratios(rows, rooflines):
        if row["kind"].startswith("engine"):
            ratios = [f"{row[k]:.1f}x {k[2:]}" for k in ("x_reference", "x_transformers") if row[k] is not None]
            print(
                f"{row['task']} {row['impl']}: "
                + ", ".join(ratios + [f"{100 * row['roofline_share']:.0f}% of roofline"])
            )

    if "agreement" in args.task:
        prompts_compared = AGREEMENT_PROMPTS[: args.agreement_prompts]
        result["greedy_token_agreement"] = attempt(
            errors, "greedy agreement", greedy_agreement, engines, prompts_compared, errors
        )
        print(f"greedy image tokens equal to the reference loop's (1/call, {len(prompts_compared)} prompts):")
        for name, line in (result["greedy_token_agreement"] or {}).items():
            print(f"  {describe_agreement(name, line)}")
        write_json()
    if errors:
        raise SystemExit(f"{len(errors)} measurement(s) failed: " + "; ".join(errors))


if __name__ == "__main__":
    main()
