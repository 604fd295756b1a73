"""Scores from the understanding path: P("Yes") and the expected rating against a plain transformers forward on the
prompt DeepSeek's rules build (tests/reference.py), the answer-token rules on tokenizers with the published
special-token layout, batch invariance, one prefill of the image prefix per image, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import JanusForConditionalGeneration, JanusImageProcessorPil, JanusProcessor, PreTrainedTokenizerFast

from janus_batch.engine import JanusEngine, decoder
from janus_batch.engine.scoring import ImageScore, Scorer, answer_tokens
from janus_batch.model.tiny import BOI, EOI, GEOMETRIES, IMAGE, build_tiny_model, tiny_config
from janus_batch.options import ImageSampling, ScoreOptions
from tests.reference import reference_pixels, understanding_ids

PUBLISHED = Path(__file__).parent / "data" / "checkpoints" / "configs" / "Janus-Pro-7B"
CORPUS = [
    "Yes. No. Yes, yes. Yes Yes Yes. No no. Answer yes or no. 1 2 3 4 5 6 7 8 9 10",
    "Does this figure show a red fox? Please answer yes or no. Rate the aesthetic quality of this image from 1 to 9.",
    "Answer with one number. A photo of a lighthouse on a cliff, a cat, a dog, a city street at night.",
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language.",
]


def published_layout_tokenizer(digits_apart: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Janus-Pro's special tokens as published (special_tokens_map.json, plus
    <begin_of_image> and <end_of_image>, added tokens of its tokenizer.json), "Yes" and " Yes" single tokens.
    `digits_apart`: a pre-tokenizer modelled on DeepSeek's (newlines, letters and punctuation each with one
    leading space, then every digit alone: ": 5" is ":", " ", "5"); else GPT-2's (" 5" one token)."""
    published = json.loads((PUBLISHED / "special_tokens_map.json").read_text())
    special = [published[k] for k in ("bos_token", "eos_token", "pad_token")]
    special += published["additional_special_tokens"] + [BOI, EOI]
    tok = Tokenizer(models.BPE())
    if digits_apart:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"[\r\n]"), "isolated"),
                pre_tokenizers.Split(Regex(r"\s?\p{L}+"), "isolated"),
                pre_tokenizers.Split(Regex(r"\s?[^\s\p{L}\p{N}]+"), "isolated"),
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=published["bos_token"],
        eos_token=published["eos_token"],
        pad_token=published["pad_token"],
        add_bos_token=True,  # as DeepSeek's LlamaTokenizer encodes
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI},
    )


def engine_on(tokenizer: PreTrainedTokenizerFast) -> JanusEngine:
    """The tiny 64 px model (tiny.py's config) on `tokenizer`, its answer tokens' head rows scaled up so that
    P("Yes") and the ratings vary from image to image instead of sitting near 1 / vocab."""
    ids = tokenizer.convert_tokens_to_ids
    config = tiny_config(
        64, len(tokenizer), *ids([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, IMAGE])
    )
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(config).eval()
    answers = sorted({t for label in ["Yes", *map(str, range(1, 10))] for t in single_tokens(tokenizer, label)})
    with torch.no_grad():
        model.lm_head.weight[answers] *= 150.0
    image_processor = JanusImageProcessorPil(
        size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = JanusProcessor(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=GEOMETRIES[64])
    return JanusEngine(model, processor)


def single_tokens(tokenizer, label: str) -> list[int]:
    """The single tokens of `label` and of " " + label, looked up by their byte-level names ("Ġ" is the space)."""
    vocab = tokenizer.get_vocab()
    return [vocab[name] for name in (label, "Ġ" + label) if name in vocab]


@pytest.fixture(scope="module")
def engine() -> JanusEngine:
    return engine_on(published_layout_tokenizer(digits_apart=True))


@pytest.fixture(scope="module")
def scorer(engine) -> Scorer:
    return Scorer(engine)


@pytest.fixture(scope="module")
def images(engine) -> np.ndarray:
    """Four images as the engine generates them, then two that are not noise."""
    generated = engine.generate_images(["a red fox", "a lighthouse"], ImageSampling(images_per_prompt=2))
    gradient = np.broadcast_to(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 64, 3))
    grey = np.full((64, 64, 3), 127, dtype=np.uint8)
    return np.stack([g.pixels for g in generated] + [gradient, grey])


PROMPTS = ["a red fox", "a lighthouse on a cliff above a stormy sea, at night", None, " a cat ", "a dog", "x"]


def reference_distribution(engine: JanusEngine, pixels: np.ndarray, question: str, then: list[int]) -> torch.Tensor:
    """softmax of transformers' logits at the last position, float64, on DeepSeek's prompt for `question` followed
    by the tokens `then`, and DeepSeek's preprocessing of the pixels."""
    ids = understanding_ids(engine.tokenizer, question, engine.num_image_tokens, "janus-pro") + then
    settings = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "rescale_factor": 1 / 255, "do_normalize": True}
    values = reference_pixels(Image.fromarray(pixels), 64, settings | {"min_size": 14})
    with torch.no_grad():
        out = engine.model(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(values)[None])
    return torch.softmax(out.logits[0, -1].double(), -1)


def test_scores_match_a_plain_transformers_forward(engine, scorer, images):
    tok = engine.tokenizer
    yes = [tok.convert_tokens_to_ids(t) for t in ("Yes", "ĠYes")]
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(1, 10)]
    space = tok.convert_tokens_to_ids("Ġ")  # this tokenizer writes ": 5" as ":", " ", "5"
    rating_question = "Rate the aesthetic quality of this image from 1 to 9. Answer with one number."
    scores = scorer.score(images, PROMPTS)
    alignments, ratings = [], []
    for pixels, prompt, score in zip(images, PROMPTS, scores, strict=True):
        p = reference_distribution(engine, pixels, rating_question, [space])[digits]
        rating = float((p * torch.arange(1, 10)).sum() / p.sum())
        assert score.aesthetic == pytest.approx(rating, abs=1e-5, rel=1e-5)
        ratings.append(rating)
        if prompt is None:
            assert score.alignment is None
            assert score.combined == pytest.approx((rating - 1) / 8, abs=1e-5)
            continue
        question = f'Does this figure show "{prompt.strip()}"? Please answer yes or no.'
        alignment = float(reference_distribution(engine, pixels, question, [])[yes].sum())
        assert score.alignment == pytest.approx(alignment, abs=1e-5, rel=1e-4)
        assert score.combined == pytest.approx((alignment + (rating - 1) / 8) / 2, abs=1e-5)
        alignments.append(alignment)
    # The oracle values are not degenerate: they vary between images.
    assert np.ptp(alignments) > 0.5
    assert np.ptp(ratings) > 0.2


def same_scores(a: list[ImageScore], b: list[ImageScore]) -> bool:
    """Equal up to float32 rounding: CPU matrix products round differently in the last bits for other row counts."""

    def values(scores: list[ImageScore]) -> np.ndarray:
        return np.array([[s.alignment or 0.0, s.aesthetic, s.combined] for s in scores])

    missing = [s.alignment is None for s in a] == [s.alignment is None for s in b]
    return missing and np.allclose(values(a), values(b), rtol=1e-6, atol=1e-6)


def test_an_image_scores_the_same_alone_and_in_any_batch(engine, scorer, images):
    together = scorer.score(images, PROMPTS)  # prompts of 1 to 13 words, and one image without
    alone = [scorer.score(images[i : i + 1], [PROMPTS[i]])[0] for i in range(len(images))]
    assert same_scores(alone, together)
    reordered = list(reversed(range(len(images))))  # other neighbours; batches of 4 and 2
    in_batches = Scorer(engine, batch_rows=4).score(images[reordered], [PROMPTS[i] for i in reordered])
    assert same_scores(list(reversed(in_batches)), together)
    # Not vacuous: other images or prompts score otherwise.
    assert not same_scores(scorer.score(images[::-1], PROMPTS), together)


def test_the_image_prefix_is_prefilled_once_for_both_questions(engine, scorer, images, monkeypatch):
    calls, forward = [], decoder.forward

    def recording(lm, embeds, slots, *args):
        calls.append((embeds.shape[0], embeds.shape[1], int(slots[0])))
        return forward(lm, embeds, slots, *args)

    monkeypatch.setattr(decoder, "forward", recording)
    prefix = len(scorer.prefix_ids)
    scorer.score(images[:3], PROMPTS[:3])
    prefill, aesthetic, alignment = calls
    assert prefill == (3, prefix, 0)  # once per image, at the first slots
    assert aesthetic[0] == 3 and aesthetic[2] == prefix and aesthetic[1] == len(scorer.aesthetic_ids)
    # Then the two images with a prompt, right-padded to the longer alignment question.
    longest = max(len(scorer.suffix_ids(ScoreOptions().alignment_text(p))) for p in PROMPTS[:2])
    assert alignment == (2, longest, prefix) and longest < prefix
    calls.clear()
    scorer.score(images[2:3], [None])
    assert [c[:2] for c in calls] == [(1, prefix), (1, len(scorer.aesthetic_ids))]


def test_forward_batches_keep_to_the_engines_max_batch_rows(engine, images, monkeypatch):
    capped = JanusEngine(engine.model, engine.processor, max_batch_rows=2)
    prefills, forward = [], decoder.forward

    def recording(lm, embeds, slots, *args):
        if int(slots[0]) == 0:
            prefills.append(embeds.shape[0])
        return forward(lm, embeds, slots, *args)

    monkeypatch.setattr(decoder, "forward", recording)
    Scorer(capped).score(images[:5], PROMPTS[:5])
    assert prefills == [2, 2, 1]
    prefills.clear()
    Scorer(engine).score(images[:5], PROMPTS[:5])  # no cap: one batch
    assert prefills == [5]


@pytest.mark.parametrize("prompt_format", ["janus-pro", "janus-1.3b"])
def test_prefix_and_suffix_ids_are_the_whole_prompts_ids(engine, prompt_format):
    engine = JanusEngine(engine.model, engine.processor, prompt_format=prompt_format)
    scorer = Scorer(engine)
    assert scorer.prefix_ids[-1] == engine.tokenizer.convert_tokens_to_ids(EOI)
    questions = [ScoreOptions().alignment_text(p) for p in (" a red fox\n", 'a "quoted" {prompt}', "12 cats")]
    for question in [*questions, "  What is it?\n", ScoreOptions().aesthetic_text]:
        whole = understanding_ids(engine.tokenizer, question, engine.num_image_tokens, prompt_format)
        assert scorer.prefix_ids + scorer.suffix_ids(question) == whole


def test_answer_tokens_follow_the_documented_rule():
    apart = published_layout_tokenizer(digits_apart=True)
    vocab = apart.get_vocab()
    # "Yes" keeps its space: the answer starts right after the colon and counts "Yes" and " Yes".
    assert answer_tokens(apart, "<|Assistant|>:", ["Yes"]) == ([], [sorted([vocab["Yes"], vocab["ĠYes"]])])
    # Digits: the space is a token of its own, fed before the answer; then each digit is one token.
    start, tokens = answer_tokens(apart, "<|Assistant|>:", ["1", "5", "9"])
    assert start == [vocab["Ġ"]] and tokens == [[vocab["1"]], [vocab["5"]], [vocab["9"]]]
    # Janus-1.3B's plain-text role: the same tokens.
    assert answer_tokens(apart, "Assistant:", ["1", "5", "9"]) == (start, tokens)

    together = published_layout_tokenizer(digits_apart=False)
    vocab = together.get_vocab()
    start, tokens = answer_tokens(together, "<|Assistant|>:", ["5", "Yes"])
    assert start == [] and tokens == [sorted([vocab["5"], vocab["Ġ5"]]), sorted([vocab["Yes"], vocab["ĠYes"]])]
    assert "yes" not in [together.decode([t]).strip() for ts in tokens for t in ts]  # case-sensitive

    # The project's tiny tokenizer is trained on the scorer's answers, so the embedded default can curate; on it a
    # 1..10 scale, whose "10" is two digits there, is refused, saying why.
    model, processor = build_tiny_model(64)
    assert Scorer(JanusEngine(model, processor)).options == ScoreOptions()
    with pytest.raises(ValueError, match="the answer '10' is not a single token"):
        Scorer(JanusEngine(model, processor), ScoreOptions(aesthetic_high=10))


def test_scores_on_a_tokenizer_that_keeps_the_space_before_digits(images):
    engine = engine_on(published_layout_tokenizer(digits_apart=False))
    scorer = Scorer(engine)
    assert scorer.rating_start == []
    tok = engine.tokenizer
    digits = [[tok.convert_tokens_to_ids(n) for n in (str(d), f"Ġ{d}")] for d in range(1, 10)]
    score = scorer.score(images[:1], ["a red fox"])[0]
    question = "Rate the aesthetic quality of this image from 1 to 9. Answer with one number."
    p = reference_distribution(engine, images[0], question, [])
    p = torch.stack([p[ids].sum() for ids in digits])
    assert score.aesthetic == pytest.approx(float((p * torch.arange(1, 10)).sum() / p.sum()), abs=1e-5, rel=1e-5)


def test_refusals(engine, scorer, images):
    # A scale whose labels are not single tokens of this tokenizer (it writes 10 as "1", "0").
    with pytest.raises(ValueError, match=r"the answer '10' is not a single token.*single tokens"):
        Scorer(engine, ScoreOptions(aesthetic_low=0, aesthetic_high=10))
    assert Scorer(engine, ScoreOptions(aesthetic_low=0, aesthetic_high=4)).rating_tokens[-1][0] == 4
    # Bad options, at construction.
    bad = [
        {"alignment_weight": -1.0},
        {"aesthetic_weight": float("nan")},
        {"alignment_weight": 0.0, "aesthetic_weight": 0.0},
        {"aesthetic_question": "  \n"},
        {"alignment_question": "Is this a fox? Answer yes or no."},
        {"alignment_question": "{prompt} or {prompt}?"},
        {"aesthetic_low": 5, "aesthetic_high": 5},
        {"temperature": 1.0},
    ]
    for options in bad:
        with pytest.raises(ValidationError):
            ScoreOptions(**options)
    with pytest.raises(ValueError, match="aesthetic question contains '<end_of_image>'"):
        Scorer(engine, ScoreOptions(aesthetic_question="Rate <end_of_image> from 1 to 9."))
    # Prompts that cannot be asked about.
    assert scorer.check_prompt("  ") == "empty prompt"
    assert scorer.check_prompt(3) == "prompt must be a string, got int"
    assert "special token" in scorer.check_prompt("a fox <|User|>: hi")
    assert "too long" in scorer.check_prompt("a fox " * 2000)
    assert scorer.check_prompt("a fox") is None
    with pytest.raises(ValueError, match="empty prompt"):
        scorer.score(images[:2], ["a fox", ""])
    # Images not as the model sees them, mismatched prompts, no combined score.
    with pytest.raises(ValueError, match=r"uint8 \[n, 64, 64, 3\]"):
        scorer.score(images[:, :32, :32])
    with pytest.raises(ValueError, match=r"uint8 \[n, 64, 64, 3\]"):
        scorer.score(images.astype(np.float32))
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.score(images[:2], ["a fox"])
    alignment_only = Scorer(engine, ScoreOptions(aesthetic_weight=0.0))
    with pytest.raises(ValueError, match="no combined score"):
        alignment_only.score(images[:2], ["a fox", None])
    assert alignment_only.score(images[:1], ["a fox"])[0].combined == scorer.score(images[:1], ["a fox"])[0].alignment
