"""Janus throughput, in one process: DeepSeek's reference loop, transformers' generate and the janus-batch engine.

Random weights at the real Janus-Pro dims, built on the device (no downloads), or the tiny model:

    python -m benchmarks.bench --model 7b                 # H100: image synthesis and captioning
    python -m benchmarks.bench --model 1b --task generate
    python -m benchmarks.bench --model tiny --quick       # CPU smoke run (CI); no timing is asserted

Prints images/s (384x384, 576 tokens, CFG 5, temperature 1, 16 images per prompt), captions/s (576 image tokens
+ ~30 prompt tokens, 64 new tokens, greedy), ms per decode step, peak memory, the ratio of each to the reference
and to a memory-bandwidth roofline computed from the bandwidth measured on this device; and the share of greedy
image tokens the engine makes as the reference loop does (eager, and with CUDA graphs on a GPU).
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
from transformers import (
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessorPil,
    JanusProcessor,
    StaticCache,
)

from janus_batch.engine import JanusEngine, decoder
from janus_batch.engine.engine import generation_prompt, understanding_prompt
from janus_batch.engine.images import normalize
from janus_batch.model.tiny import build_tiny_model
from tests.reference import reference_generate

PROMPT = "A stunning princess from kabul in red, white traditional clothing, blue eyes, brown hair"
QUESTION = "Describe this image in detail, including the objects, the colours and the mood of the scene."

T = TypeVar("T")

# What the 'x ref' column divides by: DeepSeek's loop for synthesis, one image per call for captioning.
BASELINES = {"generate": "DeepSeek reference loop", "caption": "transformers generate, 1/call"}

# Janus-Pro LLM dims (DeepSeek's configs): layers, hidden, heads, FFN.
LLM_DIMS = {"1b": (24, 2048, 16, 5632), "7b": (30, 4096, 32, 11008)}


def janus_pro_config(size: str) -> JanusConfig:
    layers, hidden, heads, ffn = LLM_DIMS[size]
    text = transformers.LlamaConfig(
        vocab_size=102400,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=16384,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    vision = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=384, patch_size=16)
    vision.update(projection_dim=hidden, num_image_tokens=576, depth=2)
    vq = dict(embed_dim=8, num_embeddings=16384, projection_dim=hidden, image_token_embed_dim=hidden)
    return JanusConfig(text_config=text.to_dict(), vision_config=vision, vq_config=vq, tie_word_embeddings=False)


def build_model(size: str, device: torch.device, dtype: torch.dtype, quick: bool = False):
    """A random Janus at real dims with the tiny model's tokenizer, or the tiny model (64 px when quick)."""
    if size == "tiny":
        model, processor = build_tiny_model(64 if quick else 384)
        return model.to(device, dtype).eval(), processor
    _, tiny = build_tiny_model(64)
    image_processor = JanusImageProcessorPil(
        size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = JanusProcessor(image_processor=image_processor, tokenizer=tiny.tokenizer, num_image_tokens=576)
    config = janus_pro_config(size)
    config.image_token_id = processor.tokenizer.convert_tokens_to_ids("<image_placeholder>")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = JanusForConditionalGeneration(config).eval()
    torch.set_default_dtype(previous)
    return model, processor


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


@dataclass
class Row:
    task: str
    impl: str
    items: int  # images or captions
    seconds: float
    peak_gib: float
    steps: int  # decode steps per item sequence

    @property
    def per_second(self) -> float:
        return self.items / self.seconds

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.seconds / self.steps


def timed(
    task: str, impl: str, items: int, steps: int, device: torch.device, fn: Callable[[], object], warm_up: bool = True
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
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return Row(task, impl, items, seconds, peak, steps)


def attempt(what: str, fn: Callable[..., T], *args) -> T | None:
    """fn(*args), or None with the error printed: one failing implementation must not cost the others' figures
    (nothing here has yet run on a GPU)."""
    try:
        return fn(*args)
    except Exception as e:
        print(f"{what} failed: {type(e).__name__}: {e}")
        return None


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def decoder_bytes(engine: JanusEngine) -> int:
    """Weights a decode step reads: the decoder layers and norm (an embedding lookup reads one row, not the table)."""
    return weight_bytes(engine.lm) - weight_bytes(engine.lm.embed_tokens)


def generation_roofline(engine: JanusEngine, rows: int, prompt_len: int, bandwidth: float) -> float:
    """Images/s if each decode step only had to read the weights once and the filled KV cache of 2 x rows."""
    model = engine.model.model
    weights = decoder_bytes(engine) + weight_bytes(model.generation_aligner) + weight_bytes(model.generation_head)
    mean_filled = prompt_len + engine.num_gen_tokens / 2
    kv = 2 * rows * decoder.bytes_per_slot(engine.lm, engine.dtype) * mean_filled
    return rows / (engine.num_gen_tokens * (weights + kv) / bandwidth)


def caption_roofline(engine: JanusEngine, rows: int, prompt_len: int, new_tokens: int, bandwidth: float) -> float:
    """Captions/s if each decode step only had to read the weights once and the filled KV cache (prefill not
    counted: it is compute-bound, see RESULTS.md)."""
    weights = decoder_bytes(engine) + weight_bytes(engine.model.lm_head)
    kv = rows * decoder.bytes_per_slot(engine.lm, engine.dtype) * (prompt_len + new_tokens / 2)
    return rows / (new_tokens * (weights + kv) / bandwidth)


def bench_generate(
    engine: JanusEngine, prompts: int, images_per_prompt: int, hf_rows: int, device
) -> Iterator[Row | None]:
    """The synthesis rows, each yielded as soon as it is measured (None: that implementation failed)."""
    model, n = engine.model, engine.num_gen_tokens
    ids = engine.encode(generation_prompt(PROMPT))
    engine.release_kv()  # the engine's KV cache takes most of the GPU
    impl = f"{BASELINES['generate']}, {images_per_prompt}/call"
    yield attempt(
        impl,
        timed,
        "generate",
        impl,
        images_per_prompt,
        n,
        device,
        lambda: reference_generate(model, ids, engine.pad_id, images_per_prompt, 5.0, 1.0),
        False,  # no warm-up: launch-bound for a minute on a GPU, a warm-up would change nothing but the wait
    )
    input_ids = torch.tensor([ids] * (hf_rows // images_per_prompt), device=device)

    def hf_generate():
        engine.release_kv()  # the engine's KV cache takes most of the GPU
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
    yield attempt(impl, timed, "generate", impl, hf_rows, n, device, hf_generate)
    batch = [PROMPT + f" #{i}" for i in range(prompts)]
    images = prompts * images_per_prompt
    per_batch = engine.batch_size(images, 2, len(ids) + n)
    for mode, graphs in engine_modes(engine):
        engine.cuda_graphs = graphs
        impl = f"janus-batch engine, {mode}, {per_batch}/batch"
        run = partial(engine.generate_images, batch, images_per_prompt=images_per_prompt)
        yield attempt(impl, timed, "generate", impl, images, n * -(-images // per_batch), device, run)


def engine_modes(engine: JanusEngine) -> list[tuple[str, bool]]:
    """(name, cuda_graphs) of the engine's modes: eager, and on a GPU also with CUDA graphs. One engine, one
    KV cache: a second engine would plan its cache in what the first one left."""
    return [("eager", False), ("CUDA graphs", True)] if engine.device.type == "cuda" else [("eager", False)]


def greedy_agreement(engine: JanusEngine, prompts: list[str]) -> dict[str, dict | None]:
    """Greedy image tokens against DeepSeek's reference loop on the same model, one image per prompt (prompts of
    different lengths share the engine's batch): per engine mode, the share of equal tokens and the step of each
    image's first difference. In bf16 a kernel's rounding can flip a near tie, and the image goes another way
    from there. 'reference, 2/call' measures that effect alone: the reference loop against itself at another
    batch shape (the first prompt only: the loop is slow)."""
    ids = [engine.encode(generation_prompt(p)) for p in prompts]
    engine.release_kv()  # the engine's KV cache takes most of the GPU
    want = torch.cat([reference_generate(engine.model, i, engine.pad_id, 1, 5.0, greedy=True)[0] for i in ids])
    again = reference_generate(engine.model, ids[0], engine.pad_id, 2, 5.0, greedy=True)[0][:1]
    agreement = {"reference, 2/call": compare_tokens(again, want[:1])}
    for mode, graphs in engine_modes(engine):
        engine.cuda_graphs = graphs
        got = attempt(f"engine, {mode}", engine.generate_image_tokens, ids, [0] * len(ids), 5.0, 0.0)
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


def bench_caption(engine: JanusEngine, images: int, hf_rows: int, new_tokens: int, device) -> Iterator[Row | None]:
    """The captioning rows, each yielded as soon as it is measured (None: that implementation failed)."""
    model = engine.model
    rng = np.random.default_rng(0)
    pil = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(images)]
    pixels = np.stack([engine.prepare_image(im) for im in pil])
    prompt = engine.encode(understanding_prompt(QUESTION, engine.num_image_tokens, engine.system_prompt))

    def hf_caption(batch: int, count: int):
        def run():
            engine.release_kv()  # the engine's KV cache takes most of the GPU
            for start in range(0, count, batch):
                n = min(batch, count - start)
                ids = torch.tensor([prompt] * n, device=device)
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    pixel_values=normalize(torch.from_numpy(pixels[start : start + n]).to(device)).to(engine.dtype),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,  # random weights: keep every row to the same length
                    do_sample=False,
                    generation_mode="text",
                )

        return run

    one = min(images, 4)
    impl = BASELINES["caption"]
    yield attempt(impl, timed, "caption", impl, one, new_tokens * one, device, hf_caption(1, one))
    impl = f"transformers generate, {hf_rows}/call"
    steps = new_tokens * -(-images // hf_rows)
    yield attempt(impl, timed, "caption", impl, images, steps, device, hf_caption(hf_rows, images))
    eos = engine.eos_id
    engine.eos_id = -1  # random weights: never stop early, so every implementation makes new_tokens tokens
    per_batch = engine.batch_size(images, 1, len(prompt) + new_tokens)
    try:
        for mode, graphs in engine_modes(engine):
            engine.cuda_graphs = graphs
            impl = f"janus-batch engine, {mode}, {per_batch}/batch"
            run = partial(engine.understand, list(pixels), [QUESTION] * images, max_new_tokens=new_tokens)
            steps = new_tokens * -(-images // per_batch)
            yield attempt(impl, timed, "caption", impl, images, steps, device, run)
    finally:
        engine.eos_id = eos
        engine.release_kv()  # its CUDA graphs were captured with no EOS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "1b", "7b"], default="tiny")
    parser.add_argument("--task", choices=["generate", "caption", "all"], default="all")
    parser.add_argument("--rows", type=int, default=None, help="engine max_batch_rows (default: GPU memory; 16 CPU)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts in the engine run (default: 2 batches)")
    parser.add_argument("--captions", type=int, default=None, help="images captioned (default: 2 engine batches)")
    parser.add_argument("--hf-rows", type=int, default=None, help="images per transformers call (default: its best)")
    parser.add_argument("--quick", action="store_true", help="small runs (and the 64 px tiny model) for a smoke test")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    images_per_prompt = 4 if args.quick else 16
    new_tokens = 8 if args.quick else 64

    transformers.logging.set_verbosity_error()
    model, processor = build_model(args.model, device, dtype, args.quick)
    engine = JanusEngine(model, processor, max_batch_rows=args.rows or (None if device.type == "cuda" else 16))
    bandwidth = measure_bandwidth(device)
    prompt_len = len(engine.encode(generation_prompt(PROMPT)))
    caption_len = len(engine.encode(understanding_prompt(QUESTION, engine.num_image_tokens, engine.system_prompt)))
    image_batch = engine.batch_limit(2, prompt_len + engine.num_gen_tokens)
    caption_batch = engine.batch_limit(1, caption_len + new_tokens)
    # Two full batches at most: one image more would split the run into three smaller batches.
    prompts = args.prompts or (2 if args.quick else max(1, 2 * image_batch // images_per_prompt))
    captions = args.captions or (4 if args.quick else 2 * caption_batch)
    # transformers' best batches on an H100 (../shared/DESIGN.md section 3): 64 images/call for 7B, 128 for 1B.
    hf_rows = args.hf_rows or {"7b": 64, "1b": 128}.get(args.model, images_per_prompt)
    kv = engine.kv_capacity()
    print(
        f"device {torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, model {args.model} ({dtype}), "
        f"measured bandwidth {bandwidth / 1e12:.2f} TB/s"
    )
    if kv is not None:
        gib = kv * decoder.bytes_per_slot(engine.lm, dtype) / 2**30
        print(f"KV cache {kv} slots ({gib:.1f} GiB): up to {image_batch} images or {caption_batch} captions a batch")

    agreement = {}
    tasks = []  # (rows as they are measured, roofline); generators: nothing runs until the table is printed
    if args.task in ("generate", "all"):
        agreement = attempt("greedy agreement", greedy_agreement, engine, [PROMPT, "a red fox"]) or {}
        print("greedy image tokens equal to the reference loop's (1/call):")
        for name, result in agreement.items():
            print(f"  {describe_agreement(name, result)}")
        roof = generation_roofline(engine, image_batch, prompt_len, bandwidth)
        tasks.append((bench_generate(engine, prompts, images_per_prompt, hf_rows, device), roof))
    if args.task in ("caption", "all"):
        roof = caption_roofline(engine, caption_batch, caption_len, new_tokens, bandwidth)
        tasks.append((bench_caption(engine, captions, min(hf_rows, captions), new_tokens, device), roof))

    # Each row is printed (and the JSON rewritten) as soon as it is measured: a run cut short keeps what it has.
    print(f"{'task':9} {'implementation':42} {'items/s':>9} {'ms/step':>8} {'peak GiB':>8} {'x ref':>7} {'% roof':>7}")
    results: list[tuple[Row, float]] = []
    reference: dict[str, float] = {}

    def write_json() -> None:
        if args.json:
            rows_out = [asdict(r) | {"per_second": r.per_second, "roofline": ro} for r, ro in results]
            with open(args.json, "w") as f:
                json.dump({"rows": rows_out, "greedy_token_agreement": agreement}, f, indent=1)

    write_json()
    for rows, roof in tasks:
        for row in rows:
            if row is None:
                continue
            if row.impl.startswith(BASELINES[row.task]):
                reference[row.task] = row.per_second
            ratio = f"{row.per_second / reference[row.task]:7.1f}" if row.task in reference else "      -"
            print(
                f"{row.task:9} {row.impl:42} {row.per_second:9.2f} {row.ms_per_step:8.2f} {row.peak_gib:8.1f} "
                f"{ratio} {100 * row.per_second / roof:6.1f}%",
                flush=True,
            )
            results.append((row, roof))
            write_json()
    print("rooflines (items/s): " + ", ".join(sorted({f"{r.task} {roof:.1f}" for r, roof in results})))


if __name__ == "__main__":
    main()
