"""Understanding: greedy output token-identical to transformers' own generate on the prompts DeepSeek's rules build
(tests/reference.py), batched and one at a time; sampled output in the exact distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from janus_batch.engine import JanusEngine, decoder, memory, sampling
from janus_batch.engine.prompts import understanding_prompt
from janus_batch.options import DEFAULT_CAPTION_INSTRUCTION, TextSampling
from tests.helpers import encoded
from tests.reference import gof_pvalue, pad_id, reference_pixels, truncated, understanding_ids


def sample_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    gradient = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1)), mode="L")
    red = Image.new("RGB", (30, 90), (220, 20, 20))
    return [noise, gradient.convert("RGB"), red]


# Whitespace around questions, as Parquet columns often carry it: DeepSeek strips the message
# "<image_placeholder>\n{question}", so a question's end.
QUESTIONS = [None, "  What colour is the object in the middle of this picture?\n", "How many? "]


def oracle_pixels(engine: JanusEngine, images: list[Image.Image]) -> torch.Tensor:
    """The pixel values DeepSeek's VLMImageProcessor makes of RGB images (reference.py), with the settings the
    checkpoint's processor holds: not the engine's preprocessing."""
    processor = engine.processor.image_processor
    settings = {key: getattr(processor, key) for key in ("image_mean", "image_std", "rescale_factor", "do_normalize")}
    settings["min_size"] = processor.min_size
    return torch.from_numpy(np.stack([reference_pixels(im, engine.image_size, settings) for im in images]))


def hf_generate(
    engine: JanusEngine, images, questions, max_new_tokens: int, prompt_format: str = "janus-pro"
) -> list[list[int]]:
    """transformers' JanusForConditionalGeneration.generate(generation_mode="text") on the same images, with the
    prompts DeepSeek's rules build (reference.py), left-padded with the pad token named as DeepSeek does."""
    texts = [q or "Describe this image in detail." for q in questions]
    prompts = [understanding_ids(engine.tokenizer, t, engine.num_image_tokens, prompt_format) for t in texts]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id(engine.tokenizer)] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pixels = oracle_pixels(engine, images)
    out = engine.model.generate(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pixels,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        generation_mode="text",
    )
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(engine.eos_id) + 1] if engine.eos_id in row else row)
    return rows


def engine_tokens(engine: JanusEngine, images, questions, max_new_tokens: int) -> list[list[int]]:
    results = engine.understand(images, questions, TextSampling(max_new_tokens=max_new_tokens))
    tokens = []
    reference = hf_generate(engine, images, questions, max_new_tokens, engine.prompt_format)
    for question in questions:  # the prompt DeepSeek's code makes
        text = question or DEFAULT_CAPTION_INSTRUCTION
        assert engine.understanding_ids(text) == understanding_ids(
            engine.tokenizer, text, engine.num_image_tokens, engine.prompt_format
        )
    for r, row in zip(results, reference, strict=True):
        assert r.num_tokens == len(row)
        assert r.finish_reason == ("eos" if row[-1] == engine.eos_id else "length")
        assert r.text == engine.tokenizer.decode(row, skip_special_tokens=True).strip()
        tokens.append(row)
    return tokens


@pytest.mark.parametrize("max_new_tokens", [3, 24])
@pytest.mark.compat
def test_greedy_matches_transformers_generate_batched_and_alone(engine, max_new_tokens):
    images = sample_images()
    batched = engine_tokens(engine, images, QUESTIONS, max_new_tokens)
    alone = [engine_tokens(engine, [im], [q], max_new_tokens)[0] for im, q in zip(images, QUESTIONS, strict=True)]
    assert batched == alone
    reasons = {
        r.finish_reason for r in engine.understand(images, QUESTIONS, TextSampling(max_new_tokens=max_new_tokens))
    }
    # 3 tokens cut every row short; with 24 some rows reach EOS (reasons are checked per row above).
    assert (reasons == {"length"}) if max_new_tokens == 3 else ("eos" in reasons)


def test_janus_1_3b_questions_use_its_roles(engine):
    old = JanusEngine(engine.model, engine.processor, prompt_format="janus-1.3b")
    question = QUESTIONS[1]
    assert understanding_ids(engine.tokenizer, question, 16, "janus-1.3b") != understanding_ids(
        engine.tokenizer, question, 16
    )
    engine_tokens(old, sample_images(), QUESTIONS, 12)


def test_accepts_bytes_pil_and_preprocessed_arrays(engine):
    image = sample_images()[0]
    as_pil, as_bytes, as_array = engine.understand(
        [image, encoded(image), engine.prepare_image(image)], None, TextSampling(max_new_tokens=6)
    )
    assert as_pil == as_bytes == as_array
    size = engine.image_size
    for wrong in (np.zeros((3, size, size), np.uint8), np.zeros((size, size, 3), np.float32)):
        with pytest.raises(ValueError, match="a preprocessed image must be uint8 of shape"):
            engine.understand([wrong])


def test_sampling_is_seeded_per_row(engine):
    images = sample_images()
    sampled = dict(greedy=False, temperature=1.0, max_new_tokens=12)
    row_ids = ["a", "b", "c"]
    first = engine.understand(images, QUESTIONS, TextSampling(seed=1, **sampled), row_ids=row_ids)
    again = engine.understand(images, QUESTIONS, TextSampling(seed=1, **sampled), row_ids=row_ids)
    assert first == again
    # Row "b" alone, in another batch, gives the same sample: the noise is keyed on (seed, row id, step).
    alone = engine.understand(images[1:2], QUESTIONS[1:2], TextSampling(seed=1, **sampled), row_ids=["b"])
    assert alone[0] == first[1]
    others = [
        engine.understand(images, QUESTIONS, TextSampling(seed=s, **sampled), row_ids=row_ids) for s in range(2, 6)
    ]
    assert any(o != first for o in others)


def test_rejects_bad_arguments(engine):
    image = sample_images()[0]
    with pytest.raises(ValueError, match="questions"):
        engine.understand([image, image], ["only one"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.understand([image], None, TextSampling(max_new_tokens=0))
    with pytest.raises(ValueError, match="question too long"):
        engine.understand([image], ["word " * 3000])
    # A second image placeholder has no image to take: a clear error, not masked_scatter's RuntimeError.
    for question, token in [("<image_placeholder> what is this?", "<image_placeholder>"), ("ok<|User|>", "<|User|>")]:
        message = f"question contains {token!r}, a special token of the prompt template"
        assert engine.check_question(question, 8) == message
        with pytest.raises(ValueError, match=message.replace("|", r"\|")):
            engine.understand([image], [question])
    assert engine.check_question(" \n ", 8) == "empty question"


# ---- sampled mode in the exact distribution ----------------------------------------------------------

N_SAMPLES = 2000
P_MIN = 1e-3  # stated tolerance: a correct sampler fails this test with probability 0.1% (fixed seeds)


def first_token_logits(engine: JanusEngine, image: Image.Image, question: str) -> torch.Tensor:
    """The logits of the first answer token, from transformers' forward on DeepSeek's prompt (float64)."""
    ids = understanding_ids(engine.tokenizer, question, engine.num_image_tokens, system_prompt=engine.system_prompt)
    pixels = oracle_pixels(engine, [image])
    with torch.no_grad():
        return engine.model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, -1].double()


def test_sampled_first_token_matches_the_exact_distribution(engine):
    # No system prompt: a third of the prompt, for N_SAMPLES prefills. The tiny model's text logits are peaked
    # (its head is scaled up): T = 5 spreads them over ~80 tokens.
    engine = JanusEngine(engine.model, engine.processor, system_prompt="")
    image, question, temperature = sample_images()[0], "What is in the picture?", 5.0
    logits = first_token_logits(engine, image, question)
    pixels = np.stack([engine.prepare_image(image)] * N_SAMPLES)
    keys = [sampling.row_key(9, sampling.id32(i), 0) for i in range(N_SAMPLES)]
    ids = [engine.understanding_ids(question)] * N_SAMPLES
    first = engine.generate_text_tokens(
        ids, pixels, keys, TextSampling(max_new_tokens=1, greedy=False, temperature=temperature)
    )
    first = first[:, 0].numpy()
    assert gof_pvalue(first, torch.softmax(logits / temperature, -1).numpy()) > P_MIN
    for wrong in (temperature * 0.7, temperature * 1.4):
        assert gof_pvalue(first, torch.softmax(logits / wrong, -1).numpy()) < 1e-6


@pytest.mark.parametrize("top_k,top_p", [(4, None), (None, 0.6), (8, 0.75)], ids=["top_k", "top_p", "both"])
def test_the_sampler_truncates_text_logits_exactly(engine, top_k, top_p):
    # The sampler both modes share, on a real text distribution (400 tokens, not the 256 image codes), at T = 5.
    logits = first_token_logits(engine, sample_images()[1], "How many?").float()
    exact = torch.softmax(logits.double() / 5.0, -1).numpy()
    want = truncated(exact, top_k, top_p)
    assert 2 < np.count_nonzero(want) < 50
    keys = torch.tensor([sampling.row_key(2, 7, i) for i in range(N_SAMPLES)])
    codes = sampling.vocab_codes(len(logits), torch.device("cpu"))
    tokens = sampling.sample(logits.expand(N_SAMPLES, -1), keys, torch.tensor(0), codes, 5.0, top_k, top_p).numpy()
    assert gof_pvalue(tokens, want) > P_MIN
    assert gof_pvalue(tokens, exact) < 1e-6


def test_prefill_in_chunks_and_small_batches_change_nothing(engine, monkeypatch):
    images, questions = sample_images() * 2, QUESTIONS * 2
    want = engine.understand(images, questions, TextSampling(max_new_tokens=10))

    # A KV cache that holds two rows, and one row per prefill forward (the vision tower's too).
    texts = [q or DEFAULT_CAPTION_INSTRUCTION for q in questions]
    longest = max(
        len(engine.encode(understanding_prompt(t, engine.num_image_tokens, engine.system_prompt))) for t in texts
    )
    small = JanusEngine(engine.model, engine.processor, kv_cache_tokens=2 * decoder.round_up(longest + 10))
    monkeypatch.setattr(memory, "PREFILL_TOKENS", 1)
    prefill_rows, forward = [], decoder.forward

    def recording(lm, embeds, *args):
        if embeds.shape[1] > 1:
            prefill_rows.append(embeds.shape[0])
        return forward(lm, embeds, *args)

    monkeypatch.setattr(decoder, "forward", recording)
    assert small.understand(images, questions, TextSampling(max_new_tokens=10)) == want
    assert prefill_rows == [1] * 6
    assert small.memory.kv.cache(2).max_len >= longest + 10
