"""Image synthesis: token identity with DeepSeek's reference loop (greedy), on prompts DeepSeek's rules build
(tests/reference.py), the right distribution (sampled), batch invariance and per-image seeds."""

from __future__ import annotations

import copy
import gc
import itertools
import weakref
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from janus_batch.engine import JanusEngine, decoder, memory
from janus_batch.engine.engine import STOP_CHECK_EVERY
from janus_batch.engine.prompts import generation_prompt, understanding_prompt
from janus_batch.engine.sampling import gumbel_noise, id32, row_key, vocab_codes
from janus_batch.model.random_init import build_random_model, weight_bytes
from janus_batch.model.tiny import build_tiny_model
from janus_batch.options import ImageSampling, TextSampling
from tests.reference import (
    first_step_distribution,
    first_step_logits,
    generation_ids,
    gof_pvalue,
    pad_id,
    reference_attention,
    reference_generate,
    truncated,
    two_sample_pvalue,
)

# Whitespace around a prompt, as Parquet columns often carry it: DeepSeek's processor strips each message.
PROMPTS = [
    "a red fox",
    "  A watercolor painting of a lighthouse on a cliff above a stormy sea, highly detailed \n",
    "portrait\t",
]


def prompt_ids(engine: JanusEngine, prompt: str, prompt_format: str = "janus-pro") -> list[int]:
    """The prompt as DeepSeek's generation_inference.py tokenises it (reference.py, not the engine's helpers)."""
    return generation_ids(engine.tokenizer, prompt, prompt_format)


@pytest.mark.parametrize("images_per_prompt,cfg_weight", [(1, 5.0), (2, 1.0), (3, 7.5)])
@pytest.mark.compat
def test_greedy_batch_is_token_identical_to_reference(engine, images_per_prompt, cfg_weight):
    # The reference VQ-decodes each prompt's images as one batch; decode in batches of that shape too.
    engine = JanusEngine(engine.model, engine.processor, vq_batch=images_per_prompt)
    results = engine.generate_images(
        PROMPTS, ImageSampling(images_per_prompt=images_per_prompt, cfg_weight=cfg_weight, greedy=True)
    )
    assert [(r.prompt, r.sample_index) for r in results] == [(p, i) for p in PROMPTS for i in range(images_per_prompt)]
    for p, prompt in enumerate(PROMPTS):
        assert engine.generation_ids(prompt) == prompt_ids(engine, prompt)  # the prompt DeepSeek's code makes
        ref_tokens, ref_pixels = reference_generate(
            engine.model,
            prompt_ids(engine, prompt),
            pad_id(engine.tokenizer),
            images_per_prompt,
            cfg_weight,
            greedy=True,
        )
        mine = results[p * images_per_prompt : (p + 1) * images_per_prompt]
        np.testing.assert_array_equal(np.stack([r.tokens for r in mine]), ref_tokens.numpy())
        np.testing.assert_array_equal(np.stack([r.pixels for r in mine]), ref_pixels)


def test_greedy_real_geometry_576_tokens():
    model, processor = build_tiny_model(384)
    engine = JanusEngine(model, processor, vq_batch=1)
    results = engine.generate_images(PROMPTS[:2], ImageSampling(images_per_prompt=1, greedy=True))
    assert results[0].tokens.shape == (576,) and results[0].pixels.shape == (384, 384, 3)
    for result, prompt in zip(results, PROMPTS[:2], strict=True):
        ref_tokens, ref_pixels = reference_generate(
            model, prompt_ids(engine, prompt), pad_id(engine.tokenizer), 1, 5.0, greedy=True
        )
        np.testing.assert_array_equal(result.tokens, ref_tokens[0].numpy())
        np.testing.assert_array_equal(result.pixels, ref_pixels[0])


def cfg_logits_of(model) -> list[torch.Tensor]:
    """The CFG-mixed logits of each step the engine runs (a forward hook on the generation head)."""
    mixed = []

    def hook(module, args, logits):
        cond, uncond = logits.float().chunk(2)
        mixed.append(uncond + 5.0 * (cond - uncond))

    model.model.generation_head.register_forward_hook(hook)
    return mixed


BF16_STEPS = 160  # past two 64-slot KV buckets; the whole 576 cost minutes in bf16 on CPU (transformers 5.17)


def test_bf16_path_is_within_bf16_rounding_and_differs_from_the_reference_loop_only_by_attention(monkeypatch):
    model, processor = build_tiny_model(384)
    ids = [generation_ids(processor.tokenizer, PROMPTS[1])]
    pad = pad_id(processor.tokenizer)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    engine = JanusEngine(bf16, processor)
    logits = cfg_logits_of(bf16)
    greedy = ImageSampling(greedy=True)
    bucketed = engine.generate_image_tokens(ids, [0], greedy, BF16_STEPS)
    # The real bf16 path (the engine's bucketed attention under a mask): its first CFG logits are the reference
    # forward's in bf16 to within kernel rounding (equal on CPU; a mask that lets a query see one slot too many
    # is 3% off), and those are the fp32 ones to within bf16's rounding (measured: 1.3% of the largest logit).
    exact = first_step_logits(model, ids[0], pad, 5.0)
    rounded = first_step_logits(bf16, ids[0], pad, 5.0)
    scale = exact.abs().max()
    assert (rounded - exact).abs().max() <= 0.03 * scale
    assert (logits[0][0].double() - rounded).abs().max() <= 0.005 * scale
    assert bucketed[0, 0] == exact.argmax()
    # With the reference's attention call in its place, every other operation (CFG mix in bf16 included) is
    # the reference loop's, to the bit.
    want = reference_generate(bf16, ids[0], pad, 1, 5.0, greedy=True, steps=BF16_STEPS)[0]
    monkeypatch.setattr(decoder, "F", SimpleNamespace(scaled_dot_product_attention=reference_attention))
    np.testing.assert_array_equal(engine.generate_image_tokens(ids, [0], greedy, BF16_STEPS).numpy(), want.numpy())


def tokens_by_key(results) -> dict[tuple[str, int], np.ndarray]:
    return {(r.prompt_id, r.sample_index): r.tokens for r in results}


def test_sampling_is_batch_invariant(engine):
    alone = engine.generate_images(["a red fox"], ImageSampling(images_per_prompt=4, seed=7))
    engine_small_batches = JanusEngine(engine.model, engine.processor, max_batch_rows=3)
    crowded = engine_small_batches.generate_images(
        [PROMPTS[1], "a red fox", PROMPTS[2]], ImageSampling(images_per_prompt=4, seed=7)
    )
    reordered = engine.generate_images([PROMPTS[2], "a red fox"], ImageSampling(images_per_prompt=4, seed=7))
    want = tokens_by_key(alone)
    for results in (crowded, reordered):
        got = tokens_by_key(results)
        for key, tokens in want.items():
            np.testing.assert_array_equal(got[key], tokens)
    # A prompt id, not the prompt's position, keys the noise: same id => same images.
    by_id = engine.generate_images(["a red fox"], ImageSampling(images_per_prompt=2, seed=7), prompt_ids=["fox-1"])
    by_id_again = engine.generate_images(
        ["portrait", "a red fox"], ImageSampling(images_per_prompt=2, seed=7), prompt_ids=["p", "fox-1"]
    )
    np.testing.assert_array_equal(by_id[1].tokens, by_id_again[3].tokens)


def test_seeds_and_image_indices_give_different_images(engine):
    a = engine.generate_images(["a red fox"], ImageSampling(images_per_prompt=3, seed=1))
    b = engine.generate_images(["a red fox"], ImageSampling(images_per_prompt=3, seed=2))
    assert all(r.seed == 1 for r in a)
    assert not np.array_equal(a[0].tokens, a[1].tokens)
    assert not np.array_equal(a[0].tokens, b[0].tokens)
    np.testing.assert_array_equal(
        a[2].pixels, engine.generate_images(["a red fox"], ImageSampling(images_per_prompt=3, seed=1))[2].pixels
    )


def test_top_k_one_and_a_tiny_top_p_are_greedy(engine):
    greedy = engine.generate_images(["a red fox"], ImageSampling(images_per_prompt=1, greedy=True))
    top1 = engine.generate_images(["a red fox"], ImageSampling(images_per_prompt=2, top_k=1, seed=3))
    tiny_p = engine.generate_images(["a red fox"], ImageSampling(images_per_prompt=2, top_p=1e-6, seed=3))
    for r in top1 + tiny_p:
        np.testing.assert_array_equal(r.tokens, greedy[0].tokens)


# ---- sampled mode matches the reference in distribution ----------------------------------------------

N_SAMPLES = 3000
P_MIN = 1e-3  # stated tolerance: a correct sampler fails this test with probability 0.1% (fixed seeds)


def sample_tokens(
    engine: JanusEngine,
    prompt: str,
    cfg_weight: float,
    temperature: float,
    seed: int,
    steps: int,
    top_k: int | None = None,
    top_p: float | None = None,
) -> np.ndarray:
    """The first `steps` tokens of N_SAMPLES images of one prompt, in one batch (no VQ decode)."""
    keys = [row_key(seed, id32(prompt), i) for i in range(N_SAMPLES)]
    ids = prompt_ids(engine, prompt)
    sampling = ImageSampling(cfg_weight=cfg_weight, temperature=temperature, top_k=top_k, top_p=top_p)
    return engine.generate_image_tokens([ids] * N_SAMPLES, keys, sampling, steps).numpy()


@pytest.mark.parametrize("prompt,cfg_weight,temperature", [("a red fox", 5.0, 1.0), (PROMPTS[1], 3.0, 1.5)])
def test_sampled_first_token_matches_the_exact_cfg_distribution(engine, prompt, cfg_weight, temperature):
    ids = prompt_ids(engine, prompt)
    pad = pad_id(engine.tokenizer)
    first = sample_tokens(engine, prompt, cfg_weight, temperature, seed=11, steps=1)[:, 0]
    exact = first_step_distribution(engine.model, ids, pad, cfg_weight, temperature)
    assert gof_pvalue(first, exact) > P_MIN

    # The same test rejects the mistakes it is meant to catch.
    bos, boi = ids[0], ids[-1]
    wrong = {
        "no CFG / unmasked unconditional rows": first_step_distribution(engine.model, ids, pad, 1.0, temperature),
        "temperature too low": first_step_distribution(engine.model, ids, pad, cfg_weight, temperature * 0.7),
        "temperature too high": first_step_distribution(engine.model, ids, pad, cfg_weight, temperature * 1.4),
        "unconditional row without pad": first_step_distribution(
            engine.model, [bos, *ids[1:-1], boi], -1, cfg_weight, temperature, uncond_ids=[bos, boi]
        ),
    }
    for mistake, probs in wrong.items():
        assert gof_pvalue(first, probs) < 1e-6, mistake


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.8), (10, 0.9)], ids=["top_k", "top_p", "both"])
def test_top_k_and_top_p_sample_the_exact_truncated_distribution(engine, top_k, top_p):
    exact = first_step_distribution(engine.model, prompt_ids(engine, "a red fox"), pad_id(engine.tokenizer), 5.0, 1.0)
    want = truncated(exact, top_k, top_p)
    first = sample_tokens(engine, "a red fox", 5.0, 1.0, seed=4, steps=1, top_k=top_k, top_p=top_p)[:, 0]
    assert gof_pvalue(first, want) > P_MIN
    assert 2 < np.count_nonzero(want) < 40  # a real truncation, far from the extremes
    # Not truncating, truncating more, or (with both) applying only one of them, is rejected.
    if top_k and top_p:
        wrong = [(None, None), (top_k, None), (None, top_p)]
    else:
        wrong = [(None, None), (top_k - 1, None) if top_k else (None, top_p - 0.2)]
    for k, p in wrong:
        assert gof_pvalue(first, truncated(exact, k, p)) < 1e-6, (k, p)


def test_sampled_token_pairs_match_the_reference_multinomial(engine):
    # The joint law of (token 0, token 1): a sampler that reused step 0's noise at step 1 keeps each step's
    # marginal near the reference's, but not the pairs.
    ids = prompt_ids(engine, "a red fox")
    mine = sample_tokens(engine, "a red fox", 5.0, 1.0, seed=5, steps=2)
    generator = torch.Generator().manual_seed(0)
    ref, _ = reference_generate(
        engine.model, ids, pad_id(engine.tokenizer), N_SAMPLES, 5.0, 1.0, generator=generator, steps=2
    )
    vocab = engine.model.config.vq_config.num_embeddings
    pairs, ref_pairs = mine[:, 0] * vocab + mine[:, 1], (ref[:, 0] * vocab + ref[:, 1]).numpy()
    assert two_sample_pvalue(pairs, ref_pairs) > P_MIN


def test_sampling_noise_depends_on_the_step_and_the_key():
    keys = torch.tensor([row_key(0, id32("a red fox"), i) for i in range(64)])
    codes = vocab_codes(1024, torch.device("cpu"))
    noise = {step: gumbel_noise(keys, torch.tensor(step), codes) for step in range(4)}
    for a, b in itertools.combinations(noise.values(), 2):
        assert abs(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]) < 0.02
    for values in noise.values():  # Gumbel(0, 1): mean is Euler's gamma, variance pi^2 / 6
        assert abs(values.mean().item() - 0.5772) < 0.02 and abs(values.var().item() - np.pi**2 / 6) < 0.05
    rows = noise[0]
    assert abs(np.corrcoef(rows[0].numpy(), rows[1].numpy())[0, 1]) < 0.1


def test_bad_prompts_get_specific_errors(engine):
    assert engine.check_prompt("a red fox") is None
    cases = [
        ("", "empty prompt"),
        ("   \n", "empty prompt"),
        (None, "must be a string"),
        # The template's own special tokens, as text: they would change the prompt's structure.
        ("a fox <image_placeholder>", "prompt contains '<image_placeholder>', a special token of the prompt"),
        ("<begin_of_image>", "contains '<begin_of_image>'"),
        ("a fox\n\n<|Assistant|>: no", "contains '<|Assistant|>'"),
    ]
    for prompt, message in cases:
        assert message in engine.check_prompt(prompt)
        with pytest.raises(ValueError, match=message):
            engine.generate_images([prompt])
    # The tiny model has 2048 positions: 16 image tokens leave room for ~2000 prompt tokens.
    with pytest.raises(ValueError, match="prompt too long: .* exceeds the model's context of 2048"):
        engine.generate_images(["fox " * 3000])
    with pytest.raises(ValueError, match="prompt_ids"):
        engine.generate_images(["a", "b"], prompt_ids=["only-one"])
    with pytest.raises(ValueError, match="images_per_prompt"):
        engine.generate_images(["a"], ImageSampling(images_per_prompt=0))


# ---- prompt formats -----------------------------------------------------------------------------------


def test_janus_1_3b_prompts_use_its_roles_and_match_the_reference(engine):
    # Janus-1.3B's scripts say User / Assistant where Janus-Pro's say <|User|> / <|Assistant|>.
    old = JanusEngine(engine.model, engine.processor, prompt_format="janus-1.3b", vq_batch=1)
    assert prompt_ids(engine, PROMPTS[1], "janus-1.3b") != prompt_ids(engine, PROMPTS[1])
    results = old.generate_images(PROMPTS[1:], ImageSampling(images_per_prompt=1, greedy=True))
    for result, prompt in zip(results, PROMPTS[1:], strict=True):
        ids = prompt_ids(engine, prompt, "janus-1.3b")
        assert old.generation_ids(prompt) == ids
        ref_tokens, ref_pixels = reference_generate(engine.model, ids, pad_id(engine.tokenizer), 1, 5.0, greedy=True)
        np.testing.assert_array_equal(result.tokens, ref_tokens[0].numpy())
        np.testing.assert_array_equal(result.pixels, ref_pixels[0])
    assert old.check_prompt("User: a fox") is None  # plain text in this format, not a special token


def test_prompt_format_is_told_from_the_checkpoint(engine):
    model, processor = engine.model, engine.processor
    told = {
        "deepseek-ai/Janus-1.3B": "janus-1.3b",
        "s3://models/janus/janus-1.3b/": "janus-1.3b",
        "/models/Janus-1.3B-hf": "janus-1.3b",
        "deepseek-ai/Janus-Pro-1B": "janus-pro",
        "deepseek-community/Janus-Pro-7B": "janus-pro",
        "/models/janus-1.3b/snapshot": "janus-1.3b",  # the nearest part that names a model counts
        "/models/janus-1.3b/Janus-Pro-1B": "janus-pro",
        "": "janus-pro",
    }
    for name, prompt_format in told.items():
        assert JanusEngine(model, processor, model_id=name).prompt_format == prompt_format, name
    assert JanusEngine(
        model, processor, model_id="deepseek-ai/Janus-1.3B", prompt_format="janus-pro"
    ).prompt_format == ("janus-pro")
    recorded = copy.copy(model.config)
    recorded.prompt_format = "janus-1.3b"  # as the converter writes it into config.json
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model, "config", recorded)
        assert JanusEngine(model, processor, model_id="/models/converted").prompt_format == "janus-1.3b"
    with pytest.raises(ValueError, match="prompt_format must be 'auto' or one of"):
        JanusEngine(model, processor, prompt_format="llama")


# ---- designed for the GPU path -----------------------------------------------------------------------


def count_host_round_trips(monkeypatch) -> Counter:
    """Counts what costs a host round trip on a GPU: tensors made from Python data (a blocking copy to the
    device); `.item()`, `.tolist()`, `bool()` and `int()` of a tensor, `.cpu()`, `.numpy()` and `nonzero` (a
    wait for the device)."""
    counts: Counter = Counter()

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for function in ("tensor", "nonzero"):
        monkeypatch.setattr(torch, function, counting(function, getattr(torch, function)))
    for method in ("item", "tolist", "__bool__", "__int__", "cpu", "numpy", "nonzero"):
        monkeypatch.setattr(torch.Tensor, method, counting(method, getattr(torch.Tensor, method)))
    return counts


def test_decode_loops_make_no_host_round_trip_per_step(engine, monkeypatch):
    steps = 0
    forward = decoder.forward

    def counted_forward(*args):
        nonlocal steps
        steps += 1
        return forward(*args)

    monkeypatch.setattr(decoder, "forward", counted_forward)
    counts = count_host_round_trips(monkeypatch)
    ids = prompt_ids(engine, "a red fox")
    engine.generate_image_tokens([ids, ids[:3] + ids[-2:]], [1, 2], ImageSampling())
    assert steps == engine.num_gen_tokens  # one prefill, then one forward per token after the first
    assert sum(counts.values()) <= 3, counts  # the batch's ids, padding and sampling keys; nothing per step

    # Understanding checks for all rows done once every STOP_CHECK_EVERY steps, and nothing else.
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    per_call = []
    for max_new_tokens in (8, 40):
        counts.clear()
        never_stops = TextSampling(max_new_tokens=max_new_tokens, ignore_eos=True)
        engine.generate_text_tokens([engine.encode("x")], np.stack([engine.prepare_image(image)]), [0], never_stops)
        per_call.append(sum(counts.values()))
    assert per_call[1] - per_call[0] == 32 // STOP_CHECK_EVERY, per_call


# ---- batch sizes, the kept KV cache and running out of memory ----------------------------------------


def batch_sizes(engine: JanusEngine, monkeypatch) -> list[int]:
    """Records the images of each forward batch the engine runs."""
    sizes = []
    run = engine.generate_image_tokens

    def recording(prompt_tokens, *args):
        sizes.append(len(prompt_tokens))
        return run(prompt_tokens, *args)

    monkeypatch.setattr(engine, "generate_image_tokens", recording)
    return sizes


def test_kv_cache_budget_sets_equal_batches_and_is_kept_across_calls(engine, monkeypatch):
    want = tokens_by_key(engine.generate_images(PROMPTS, ImageSampling(images_per_prompt=4, seed=5)))
    longest = max(len(prompt_ids(engine, p)) for p in PROMPTS)
    slots_per_image = 2 * decoder.round_up(longest + engine.num_gen_tokens)  # conditional + unconditional row
    budgeted = JanusEngine(engine.model, engine.processor, kv_cache_tokens=5 * slots_per_image)
    sizes = batch_sizes(budgeted, monkeypatch)

    got = budgeted.generate_images(PROMPTS, ImageSampling(images_per_prompt=4, seed=5))
    assert sizes == [4, 4, 4]  # 12 images, 5 fit: three equal batches rather than 5 + 5 + 2
    got = tokens_by_key(got)
    assert got.keys() == want.keys()
    for key, tokens in want.items():
        np.testing.assert_array_equal(got[key], tokens)
    store, kept = budgeted.memory.kv, dict(budgeted.memory.static_batches)
    assert store.capacity == 5 * slots_per_image and len(kept) == 1
    budgeted.generate_images(list(reversed(PROMPTS)), ImageSampling(images_per_prompt=4, seed=6))
    # Same shape again: the same KV store and kept tensors (on a GPU: the same CUDA graphs, replayed).
    assert budgeted.memory.kv is store
    assert budgeted.memory.static_batches.keys() == kept.keys()
    assert all(budgeted.memory.static_batches[k] is v for k, v in kept.items())

    # Only the most recently used shapes are kept (a Serve replica meets many batch sizes).
    monkeypatch.setattr(memory, "MAX_BATCH_SHAPES", 2)
    for images in (1, 2, 3, 2):
        budgeted.generate_images(PROMPTS[:1], ImageSampling(images_per_prompt=images))
    assert [k[1] for k in budgeted.memory.static_batches] == [3, 2]

    with pytest.raises(ValueError, match="KV cache slots, the cache holds"):
        JanusEngine(engine.model, engine.processor, kv_cache_tokens=slots_per_image - 1).generate_images(PROMPTS)


def test_dropped_batches_free_their_memory_at_once(engine, monkeypatch):
    # memory.release() (before a retry after out of memory) and the eviction of old shapes must free the KV cache
    # and CUDA graphs at once: a batch's decode step closes over the batch, a cycle only a gc pass would free.
    budgeted = JanusEngine(engine.model, engine.processor, kv_cache_tokens=1 << 14)
    budgeted.generate_images(PROMPTS[:1], ImageSampling(images_per_prompt=2))
    budgeted.understand([np.zeros((64, 64, 3), np.uint8)], None, TextSampling(max_new_tokens=3))
    gc.disable()  # what frees the batches must be their reference counts
    try:
        batches = [weakref.ref(b) for b in budgeted.memory.static_batches.values()]
        caches = [weakref.ref(b.cache.keys[0]) for b in budgeted.memory.static_batches.values()]
        budgeted.memory.release()
        assert len(batches) == 2 and all(r() is None for r in batches + caches)

        monkeypatch.setattr(memory, "MAX_BATCH_SHAPES", 1)
        budgeted.generate_images(PROMPTS[:1], ImageSampling(images_per_prompt=1))
        first = weakref.ref(next(iter(budgeted.memory.static_batches.values())))
        budgeted.generate_images(PROMPTS[:1], ImageSampling(images_per_prompt=2))  # another shape evicts the first
        assert first() is None
    finally:
        gc.enable()


def test_out_of_memory_gives_back_kv_cache_and_retries_the_batch(engine, monkeypatch):
    want = tokens_by_key(engine.generate_images(PROMPTS, ImageSampling(images_per_prompt=4, seed=5)))
    longest = max(len(prompt_ids(engine, p)) for p in PROMPTS)
    budget = 12 * 2 * decoder.round_up(longest + engine.num_gen_tokens)
    budgeted = JanusEngine(engine.model, engine.processor, kv_cache_tokens=budget)
    sizes = batch_sizes(budgeted, monkeypatch)
    forward, injected = decoder.forward, []

    def out_of_memory_once(*args):
        if not injected:
            injected.append(budgeted.memory.kv.capacity)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return forward(*args)

    monkeypatch.setattr(decoder, "forward", out_of_memory_once)
    got = tokens_by_key(budgeted.generate_images(PROMPTS, ImageSampling(images_per_prompt=4, seed=5)))
    assert injected == [budget]
    assert budgeted.memory.kv.capacity == int(budget * 0.8)
    assert sizes == [12, 6, 6]  # the failed batch of 12, then 9 fit: two of 6
    assert got.keys() == want.keys()
    for key, tokens in want.items():
        np.testing.assert_array_equal(got[key], tokens)

    # Out of memory whatever the cache: cut while it still holds one image, then the error is raised as it
    # is (a device failure for the Ray stage to retry, not a row error).
    def always_out_of_memory(*args):
        injected.append(budgeted.memory.kv.capacity)
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(decoder, "forward", always_out_of_memory)
    injected.clear()
    with pytest.raises(torch.OutOfMemoryError):
        budgeted.generate_images(PROMPTS, ImageSampling(images_per_prompt=4))
    one_image = 2 * decoder.round_up(longest + engine.num_gen_tokens)
    assert injected[-1] * 0.8 < one_image <= injected[-1]
    assert all(b == int(a * 0.8) for a, b in zip(injected, injected[1:], strict=False))

    # With no budget to cut (CPU, no kv_cache_tokens) the error is raised at once.
    unbudgeted = JanusEngine(engine.model, engine.processor)
    with pytest.raises(torch.OutOfMemoryError):
        unbudgeted.generate_images(PROMPTS)


@pytest.mark.parametrize("size,images,captions", [("7b", 91, 153), ("1b", 272, 453)])
@pytest.mark.compat
def test_kv_cache_plan_for_janus_pro_on_an_80_gb_gpu(monkeypatch, size, images, captions):
    # The planner's arithmetic on the real configs (weights on the meta device: no memory), with the CUDA memory
    # queries answering as an 80 GB card holding the bf16 weights would. The batch sizes are the predictions
    # in benchmarks/RESULTS.md.
    model, processor = build_random_model(size, torch.device("meta"), torch.bfloat16)
    engine = JanusEngine(model, processor)
    weights = weight_bytes(model)
    total = 80 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (total - weights - 2**29, total))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: weights)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: weights)

    slots = engine.memory.plan()
    kv = slots * decoder.bytes_per_slot(engine.lm, torch.bfloat16)
    workspace = memory.workspace_bytes(model, torch.bfloat16, engine.vq_batch, slots)
    assert weights + kv + workspace <= 0.9 * total < weights + kv + workspace + 2**20
    assert 2**30 < workspace < 8 * 2**30
    engine = JanusEngine(model, processor, kv_cache_tokens=slots)
    prompt = len(engine.encode(generation_prompt("A photo of a red fox sitting in the snow, golden hour.")))
    assert engine.memory.batch_limit(2, prompt + 576) == images
    question = understanding_prompt("Describe this image in detail.", engine.num_image_tokens, engine.system_prompt)
    assert engine.memory.batch_limit(1, len(engine.encode(question)) + 64) == captions
