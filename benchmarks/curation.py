"""The cost of curation on one engine: scoring a prompt's 16 candidates and captioning the kept 4, against the time
to generate them (issue 14, item 7: at most 25% more, on 7B and 1B).

    python -m benchmarks.curation --model 7b --json curation-7b.json   # GPU: random weights at real dims, bf16
    python -m benchmarks.curation --model tiny --quick                 # CPU smoke run: its timings mean nothing

As a curate job's model actor does it (janus_batch/stages.py), on one engine with CUDA graphs on a GPU:
(a) generate: `engine.generate_images`, 16 candidates a prompt (CFG 5, temperature 1, 576 tokens, VQ decode);
(b) score: `Scorer.score` on the generated uint8 pixels, both questions (alignment and aesthetic rating);
(c) caption: `engine.understand` on the pixels of the 4 best by combined score, greedy, 64 new tokens with EOS
    ignored (random weights never stop).
The engine generates one full forward batch of prompts (as many as its KV cache holds: a job's call holds several),
so (a) runs at the batch a job runs; times are per prompt. After a warm-up run of all three (KV cache, CUDA graph
capture), each is timed REPEATS times between CUDA synchronisations; the median counts.

Printed and written as JSON beside the measured ratios (b + c) / a, b / a and c / a and the target: two predictions
from the same run, the FLOP ratio (`curation_flops`, from the model config and the run's token counts) and the
time ratio from rooflines measured on this device (generation and caption decode bandwidth-bound, the scoring and
caption prefills compute-bound at the measured matrix-product rate; as benchmarks/bench.py's rooflines).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import numpy as np
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import JanusConfig, PretrainedConfig
from transformers.models.janus.modeling_janus import JanusVQVAE

from benchmarks.bench import (
    PROMPT,
    caption_roofline,
    generation_roofline,
    measure_bandwidth,
    measure_matmul,
    measured_on,
    sync,
)
from janus_batch.engine import JanusEngine, Scorer
from janus_batch.model.random_init import SIZES, build_random_model
from janus_batch.model.tokens import EOI
from janus_batch.options import DEFAULT_CAPTION_INSTRUCTION, ImageSampling, ScoreOptions, TextSampling

CANDIDATES = 16  # per prompt, DeepSeek's default
KEPT = 4  # per prompt, captioned
TARGET = 0.25  # (score + caption) / generate, issue 14
REPEATS = 3
PHASES = ("generate", "score", "caption")

T = TypeVar("T")


class Tokens(NamedTuple):
    """A prompt's token counts as the engine runs them."""

    generation_prompt: int  # a CFG row's prompt, padded to the batch's longest
    score_prefix: int  # BOS, system prompt, user role, the image's tokens up to <end_of_image>
    aesthetic_suffix: int  # after the prefix: the rating question and the assistant role
    alignment_suffix: int  # the same for the alignment question, padded to the batch's longest
    caption_prompt: int  # the whole caption prompt, image tokens included


def decoder_flops(text: PretrainedConfig, tokens: int, cached: int = 0) -> float:
    """FLOPs of `tokens` tokens through the decoder layers after `cached` tokens already in the KV cache: per token
    2·L·(4d² + 3·d·F) for the attention projections (multi-head, as in every Janus model) and the MLP, and 4·L·d
    per key attended to (QKᵀ and AV), causally."""
    layers, d, ffn = text.num_hidden_layers, text.hidden_size, text.intermediate_size
    keys = tokens * cached + tokens * (tokens + 1) / 2
    return 2 * layers * (4 * d * d + 3 * d * ffn) * tokens + 4 * layers * d * keys


def vision_flops(config: JanusConfig) -> float:
    """One image through SigLIP (patch embedding, encoder layers with full attention) and the aligner MLP."""
    vision, d = config.vision_config, config.text_config.hidden_size
    patches = (vision.image_size // vision.patch_size) ** 2
    width, inner = vision.hidden_size, int(vision.hidden_size * vision.mlp_ratio)
    embedding = 2 * 3 * vision.patch_size**2 * width * patches
    layer = 2 * (4 * width * width + 2 * width * inner) * patches + 4 * width * patches * patches
    aligner = 2 * (width * d + (vision.depth - 1) * d * d) * patches
    return embedding + vision.num_hidden_layers * layer + aligner


def vq_decode_flops(config: JanusConfig) -> float:
    """One image's VQ decode (a convolutional decoder): counted by PyTorch's FLOP counter on the meta device."""
    with torch.device("meta"):
        vqmodel = JanusVQVAE(config.vq_config)
        tokens = torch.zeros(1, config.vq_config.num_patches**2, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        vqmodel.decode(tokens)
    return float(counter.get_total_flops())


def curation_flops(config: JanusConfig, tokens: Tokens, caption_tokens: int) -> dict[str, float]:
    """The FLOPs of one prompt's curation: generating its CANDIDATES, scoring them, captioning KEPT of them."""
    text, vq = config.text_config, config.vq_config
    image_tokens = vq.num_patches**2
    lm_head = 2 * text.hidden_size * text.vocab_size
    generation_head = 2 * (vq.image_token_embed_dim * vq.projection_dim + vq.projection_dim * vq.num_embeddings)
    generation_aligner = 2 * (vq.embed_dim * vq.projection_dim + (vq.num_hidden_layers - 1) * vq.projection_dim**2)
    # Two CFG rows an image: the prompt, then every image token but the last fed back; the head at every token.
    row = (
        decoder_flops(text, tokens.generation_prompt + image_tokens - 1)
        + image_tokens * generation_head
        + (image_tokens - 1) * generation_aligner
    )
    generate = 2 * row + vq_decode_flops(config)
    # The prefix once, both questions' suffixes after it, a next-token distribution for each.
    score = (
        vision_flops(config)
        + decoder_flops(text, tokens.score_prefix)
        + decoder_flops(text, tokens.aesthetic_suffix, tokens.score_prefix)
        + decoder_flops(text, tokens.alignment_suffix, tokens.score_prefix)
        + 2 * lm_head
    )
    caption = (
        vision_flops(config)
        + decoder_flops(text, tokens.caption_prompt + caption_tokens - 1)
        + caption_tokens * lm_head
    )
    return {"generate": CANDIDATES * generate, "score": CANDIDATES * score, "caption": KEPT * caption}


def ratios(per_prompt: dict[str, float]) -> dict[str, float]:
    """(score + caption) / generate, and each alone / generate."""
    generate = per_prompt["generate"]
    return {
        "score_and_caption": (per_prompt["score"] + per_prompt["caption"]) / generate,
        "score": per_prompt["score"] / generate,
        "caption": per_prompt["caption"] / generate,
    }


def kept_of(scores: list, prompts: int) -> list[int]:
    """The indices of each prompt's KEPT best candidates by combined score (ties: the lower sample index)."""
    kept = []
    for p in range(prompts):
        candidates = range(p * CANDIDATES, (p + 1) * CANDIDATES)
        kept += sorted(candidates, key=lambda i: (-scores[i].combined, i))[:KEPT]
    return kept


def curation_tokens(engine: JanusEngine, options: ScoreOptions, prompts: list[str]) -> Tokens:
    """The token counts of `prompts`' curation on this engine (its tokenizer, its prompt format)."""
    end_of_image = engine.tokenizer.convert_tokens_to_ids(EOI)

    def split(question: str) -> tuple[int, int]:
        # The understanding prompt of `question`: (the image prefix, up to <end_of_image>; the rest). The answer's
        # leading-space token that the scorer feeds with some tokenizers (one token) is left out.
        ids = engine.understanding_ids(question)
        prefix = ids.index(end_of_image) + 1
        return prefix, len(ids) - prefix

    prefix, aesthetic = split(options.aesthetic_text)
    return Tokens(
        generation_prompt=max(len(engine.generation_ids(p)) for p in prompts),
        score_prefix=prefix,
        aesthetic_suffix=aesthetic,
        alignment_suffix=max(split(options.alignment_text(p))[1] for p in prompts),
        caption_prompt=len(engine.understanding_ids(DEFAULT_CAPTION_INSTRUCTION)),
    )


def timed(device: torch.device, fn: Callable[[], T]) -> tuple[float, T]:
    """(seconds, fn()), between device synchronisations."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=SIZES, default="tiny")
    parser.add_argument("--prompts", type=int, default=None, help="prompts generated at once (default: one batch)")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed runs after the warm-up (the median)")
    parser.add_argument("--quick", action="store_true", help="one prompt, 8 caption tokens, the 64 px tiny model")
    parser.add_argument("--json", default=None, help="also write everything measured to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    caption_tokens = 8 if args.quick else 64

    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    model, processor = build_random_model(args.model, device, dtype, args.quick)
    engine = JanusEngine(model, processor)  # CUDA graphs on a GPU, the KV cache from free memory
    scorer = Scorer(engine)
    bandwidth, flops = measure_bandwidth(device), measure_matmul(device, dtype)

    image_batch = engine.memory.batch_limit(2, len(engine.generation_ids(PROMPT)) + engine.num_gen_tokens)
    prompts = args.prompts or (1 if args.quick else max(1, image_batch // CANDIDATES))
    batch = [f"{PROMPT} #{i}" for i in range(prompts)]
    sampling = ImageSampling(images_per_prompt=CANDIDATES)  # CFG 5, temperature 1: DeepSeek's defaults
    caption_sampling = TextSampling(max_new_tokens=caption_tokens, ignore_eos=True)  # greedy
    tokens = curation_tokens(engine, scorer.options, batch)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"device {device_name}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"model {args.model} ({dtype}) built in {time.perf_counter() - start:.1f} s, "
        f"measured bandwidth {bandwidth / 1e12:.2f} TB/s, matrix products {flops / 1e12:.0f} TFLOP/s; "
        f"{prompts} prompt(s) x {CANDIDATES} candidates, {KEPT} kept each; tokens {tokens._asdict()}"
    )

    # The predictions, per prompt: the FLOPs, and the times at the rooflines of this device, at the batches this
    # run makes (generation and the caption decode read weights and KV cache; the VQ decode and the scoring
    # prefill are compute, at the matrix-product rate).
    flop_counts = curation_flops(model.config, tokens, caption_tokens)
    generation_rate = generation_roofline(engine, prompts * CANDIDATES, tokens.generation_prompt, bandwidth)
    caption_rate = caption_roofline(engine, prompts * KEPT, tokens.caption_prompt, caption_tokens, bandwidth, flops)
    roofline_s = {
        "generate": CANDIDATES * (1 / generation_rate + vq_decode_flops(model.config) / flops),
        "score": flop_counts["score"] / flops,
        "caption": KEPT / caption_rate,
    }
    result = {
        **measured_on(device_name, args.model, dtype, bandwidth, flops),
        "prompts": prompts,
        "candidates_per_prompt": CANDIDATES,
        "kept_per_prompt": KEPT,
        "caption_tokens": caption_tokens,
        "tokens": tokens._asdict(),
        "target": TARGET,
        "prediction": {
            "flops_per_prompt": flop_counts,
            "flop_ratios": ratios(flop_counts),
            "roofline_s_per_prompt": roofline_s,
            "roofline_ratios": ratios(roofline_s),
        },
        "seconds": {phase: [] for phase in PHASES},  # each timed run, all prompts
        "per_prompt_s": None,
        "ratios": None,
        "meets": None,
        "peak_gib": None,
        "peak_reserved_gib": None,
        "budget_gib": None,
    }

    def curate() -> dict[str, float]:
        """One prompt batch's curation, each phase timed: generate, score, caption the kept."""
        generate_s, images = timed(device, lambda: engine.generate_images(batch, sampling))
        pixels = np.stack([image.pixels for image in images])
        score_s, scores = timed(device, lambda: scorer.score(pixels, [image.prompt for image in images]))
        kept = [images[i].pixels for i in kept_of(scores, prompts)]
        caption_s, _ = timed(device, lambda: engine.understand(kept, None, caption_sampling))
        return {"generate": generate_s, "score": score_s, "caption": caption_s}

    def write_json() -> None:
        # Rewritten after every run: a run cut short keeps what it has.
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    write_json()
    warm_up = curate()  # KV cache, CUDA graph capture, lazy initialisation
    print("warm-up run (s): " + ", ".join(f"{phase} {seconds:.2f}" for phase, seconds in warm_up.items()), flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.repeats):
        for phase, seconds in curate().items():
            result["seconds"][phase].append(seconds)
        per_prompt = {phase: statistics.median(runs) / prompts for phase, runs in result["seconds"].items()}
        result.update(per_prompt_s=per_prompt, ratios=ratios(per_prompt))
        result["meets"] = result["ratios"]["score_and_caption"] <= TARGET
        if device.type == "cuda":
            total = torch.cuda.mem_get_info(device)[1]
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            result["budget_gib"] = engine.memory.gpu_memory_utilization * total / 2**30
        write_json()
    describe(result)


def describe(result: dict) -> None:
    """The per-prompt times beside their predictions, and the ratios beside the target."""
    per_prompt, prediction = result["per_prompt_s"], result["prediction"]
    what = {
        "generate": f"generate {result['candidates_per_prompt']}",
        "score": f"score {result['candidates_per_prompt']} (2 questions)",
        "caption": f"caption {result['kept_per_prompt']} ({result['caption_tokens']} tokens)",
    }
    print(f"per prompt, median of {len(result['seconds']['generate'])} runs of {result['prompts']} prompt(s):")
    print(f"  {'':28} {'measured s':>11} {'roofline s':>11} {'TFLOP':>8}")
    for phase, label in what.items():
        roofline, flop_count = prediction["roofline_s_per_prompt"][phase], prediction["flops_per_prompt"][phase]
        print(f"  {label:28} {per_prompt[phase]:11.4f} {roofline:11.4f} {flop_count / 1e12:8.3g}")
    measured, flop_ratios, roofline = result["ratios"], prediction["flop_ratios"], prediction["roofline_ratios"]
    verdict = "met" if result["meets"] else "MISSED"
    print(
        f"(score + caption) / generate: measured {measured['score_and_caption']:.3f} "
        f"(target <= {result['target']}: {verdict}); predicted {roofline['score_and_caption']:.3f} from the "
        f"rooflines, FLOP ratio {flop_ratios['score_and_caption']:.3f}"
    )
    for phase in ("score", "caption"):
        print(
            f"{phase} / generate: measured {measured[phase]:.3f}, rooflines {roofline[phase]:.3f}, "
            f"FLOPs {flop_ratios[phase]:.3f}"
        )
    if result["peak_reserved_gib"] is not None:
        print(f"peak GPU memory held {result['peak_reserved_gib']:.1f} GiB, budget {result['budget_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
