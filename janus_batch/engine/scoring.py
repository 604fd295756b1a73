"""Scores of images from the model's own understanding path: prompt alignment and an aesthetic rating.

Both are read from the next-token distribution (a softmax over the whole vocabulary, in float32) after DeepSeek's
understanding prompt, `<|User|>: <image>\\n{question}\\n\\n<|Assistant|>:` with the system prompt, the engine's
prompt format's roles and its stripping rules:
- `alignment`, VQAScore (Lin et al. 2024): P("Yes") for `Does this figure show "{prompt}"? Please answer yes or
  no.`;
- `aesthetic`: the expected rating for a rating question, over the scale's labels (1..9 by default): the sum of
  rating x P(rating) with P renormalised over the scale's labels;
- `combined`: the weighted mean of the alignment and of the aesthetic rating scaled to [0, 1] (of the aesthetic
  alone for an image without a prompt).

How an answer maps to tokens (DeepSeek's tokenizer is byte-level BPE):
- P(label) is the sum of the probabilities of the single tokens the tokenizer makes of the label alone and of the
  label after one space: "Yes" and " Yes", case-sensitive as VQAScore ("yes", "YES" do not count).
- The answer starts where the tokenizer starts it in `<|Assistant|>: {label}`, the text of an assistant turn in
  DeepSeek's template. A tokenizer that writes that space as a token of its own (DeepSeek's splits digits from
  the space before them: ": 5" is ":", " ", "5") has that space token fed after the question, so the
  distribution is read where the label's own token comes.
- There the label must be a single token, else the scale (or the answer) is refused when a `Scorer` is built: so
  multi-token numbers are avoided, not approximated (1..9 is single digits; a 1..10 scale is refused by a
  tokenizer that splits digits).

The image prefix (BOS, system prompt, user role, image tokens up to <end_of_image>) is the same length for every
image: it is prefilled once per image into a KV cache both questions share, then each question's suffix runs at
the slots after it, right-padded, the second question overwriting the first's slots (causal attention never reads
past a token's own slot). The prefix and the suffix split at <end_of_image>, a special token, so their ids are
those of the whole prompt tokenized at once.

Images are uint8 [n, S, S, 3] as the engine generates them (no PNG round trip), S the understanding size
`engine.image_size`; every published Janus model and the tiny ones generate at that size (384, or 64), so
generated pixels are the vision tower's input as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from janus_batch.engine import decoder
from janus_batch.engine.images import normalize
from janus_batch.engine.prompts import PROMPT_ROLES, understanding_prompt
from janus_batch.model.tokens import EOI
from janus_batch.options import ScoreOptions

ALIGNMENT_ANSWER = "Yes"  # VQAScore's


@dataclass
class ImageScore:
    alignment: float | None  # P("Yes"); None without a prompt
    aesthetic: float  # the expected rating, in [aesthetic_low, aesthetic_high]
    combined: float  # in [0, 1]


def answer_tokens(tokenizer, context: str, labels: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """(the tokens fed after `context` before the answer, each label's tokens there), by the rules of the module
    doc: ValueError when a label is not a single token there."""

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    before = encode(context)
    starts, tokens = set(), []
    for label in labels:
        ids = encode(f"{context} {label}")
        start, answer = ids[len(before) : -1], ids[-1:]
        if ids[: len(before)] != before or (start and tokenizer.decode(start) != " "):
            pieces = [tokenizer.decode([i]) for i in ids[len(before) :]]
            raise ValueError(
                f"the answer {label!r} is not a single token for this tokenizer (after {context!r} it is {pieces}): "
                "answers and scale labels must be single tokens"
            )
        alone = [form[0] for form in (encode(label), encode(" " + label)) if len(form) == 1]
        starts.add(tuple(start))
        tokens.append(sorted({*answer, *alone}))
    if len(starts) > 1:
        raise ValueError(f"the labels {list(labels)} start at different tokens for this tokenizer")
    return list(starts.pop()), tokens


class Scorer:
    """Scores images with an engine's model (see the module doc). Built once per engine and options: it checks
    the options against the tokenizer and tokenizes the image prefix and the rating question."""

    def __init__(self, engine, options: ScoreOptions = ScoreOptions(), *, batch_rows: int = 16):
        """`batch_rows`: images per forward batch (each holds a KV cache of about 650 slots at 384 px), at most the
        engine's max_batch_rows (`--max-batch-rows`) where it has one."""
        self.engine, self.options = engine, options
        self.batch_rows = min(batch_rows, engine.memory.max_batch_rows or batch_rows)
        whole = understanding_prompt(
            options.aesthetic_text, engine.num_image_tokens, engine.system_prompt, engine.prompt_format
        )
        self.prefix_text = whole[: whole.index(EOI) + len(EOI)]
        self.prefix_ids = engine.encode(self.prefix_text)
        # Only the assistant turn's opening decides how the answer is tokenized: the tokenizers split at
        # newlines and special tokens, and the role follows a blank line.
        context = PROMPT_ROLES[engine.prompt_format][1] + ":"
        self.yes_start, (self.yes_tokens,) = answer_tokens(engine.tokenizer, context, [ALIGNMENT_ANSWER])
        self.rating_start, rating_tokens = answer_tokens(engine.tokenizer, context, [str(r) for r in options.ratings])
        self.rating_tokens = [
            (rating, token) for rating, ts in zip(options.ratings, rating_tokens, strict=True) for token in ts
        ]
        if error := engine.check_question(options.aesthetic_text, len(self.rating_start) + 1):
            raise ValueError(f"aesthetic {error}")
        suffix_ids = self.suffix_ids(options.aesthetic_text)
        if self.prefix_ids + suffix_ids != engine.encode(whole):
            raise ValueError("the tokenizer does not split the understanding prompt at <end_of_image>")
        self.aesthetic_ids = suffix_ids + self.rating_start

    def suffix_ids(self, question: str) -> list[int]:
        """The ids of the prompt after the image prefix: `\\n{question}\\n\\n<|Assistant|>:`."""
        engine = self.engine
        whole = understanding_prompt(question, engine.num_image_tokens, engine.system_prompt, engine.prompt_format)
        return engine.tokenizer.encode(whole[len(self.prefix_text) :], add_special_tokens=False)

    def check_prompt(self, prompt: object) -> str | None:
        """Why the alignment question cannot be asked for `prompt`, or None when it can."""
        if not isinstance(prompt, str):
            return f"prompt must be a string, got {type(prompt).__name__}"
        if not prompt.strip():
            return "empty prompt"
        error = self.engine.check_question(self.options.alignment_text(prompt), len(self.yes_start) + 1)
        return f"alignment {error}" if error else None

    @torch.inference_mode()
    def score(self, pixels: np.ndarray | torch.Tensor, prompts: Sequence[str | None] | None = None) -> list[ImageScore]:
        """Scores of uint8 images [n, S, S, 3]; `prompts[i]` (None: no alignment) is what image i should show."""
        size = self.engine.image_size
        pixels = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.array(pixels))
        if pixels.dtype != torch.uint8 or pixels.shape[1:] != (size, size, 3):
            raise ValueError(f"images must be uint8 [n, {size}, {size}, 3], got {pixels.dtype} {list(pixels.shape)}")
        prompts = list(prompts) if prompts is not None else [None] * len(pixels)
        if len(prompts) != len(pixels):
            raise ValueError(f"{len(pixels)} images but {len(prompts)} prompts")
        for prompt in prompts:
            if prompt is not None and (error := self.check_prompt(prompt)):
                raise ValueError(error)
        if None in prompts and self.options.aesthetic_weight == 0:
            raise ValueError("aesthetic_weight is 0 and an image has no prompt: no combined score")
        # Images with a prompt first: in each batch they are its first rows, a view of its KV cache.
        order = sorted(range(len(pixels)), key=lambda i: prompts[i] is None)
        scores: list[ImageScore | None] = [None] * len(pixels)
        for start in range(0, len(order), self.batch_rows):
            rows = order[start : start + self.batch_rows]
            for i, score in zip(rows, self.score_batch(pixels[rows], [prompts[i] for i in rows]), strict=True):
                scores[i] = score
        return scores

    def score_batch(self, pixels: torch.Tensor, prompts: list[str | None]) -> list[ImageScore]:
        """One forward batch; the images with a prompt come first."""
        engine, lm = self.engine, self.engine.lm
        alignment_ids = [
            self.suffix_ids(self.options.alignment_text(p)) + self.yes_start for p in prompts if p is not None
        ]
        prefix_len = len(self.prefix_ids)
        longest = max(len(ids) for ids in [self.aesthetic_ids, *alignment_ids])
        layers, heads, head_dim = decoder.kv_shape(lm)
        shape = (len(pixels), heads, prefix_len + longest, head_dim)
        cache = decoder.KVCache(
            [torch.empty(shape, device=engine.device, dtype=engine.dtype) for _ in range(layers)],
            [torch.empty(shape, device=engine.device, dtype=engine.dtype) for _ in range(layers)],
        )
        slots = torch.arange(prefix_len, device=engine.device)
        no_padding = torch.zeros(len(pixels), dtype=torch.long, device=engine.device)
        decoder.forward(lm, self.prefix_embeds(pixels), slots, no_padding, cache, prefix_len)

        probs = self.next_token_probs(cache, [self.aesthetic_ids] * len(pixels))
        ratings = torch.tensor([r for r, _ in self.rating_tokens], dtype=torch.float32, device=engine.device)
        rating_probs = probs[:, [t for _, t in self.rating_tokens]]
        aesthetic = ((rating_probs * ratings).sum(-1) / rating_probs.sum(-1)).tolist()
        alignment: list[float | None] = [None] * len(pixels)
        if alignment_ids:
            probs = self.next_token_probs(cache.rows(0, len(alignment_ids)), alignment_ids)
            alignment[: len(alignment_ids)] = probs[:, self.yes_tokens].sum(-1).tolist()
        return [ImageScore(a, e, self.options.combined(a, e)) for a, e in zip(alignment, aesthetic, strict=True)]

    def prefix_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """[rows, prefix, hidden]: the prefix's embeddings with each image's features in place of the placeholders."""
        engine, model = self.engine, self.engine.model
        ids = torch.tensor(self.prefix_ids, device=engine.device).expand(len(pixels), -1)
        pixel_values = normalize(pixels.to(engine.device), engine.pixel_table).to(engine.dtype)
        features = model.model.aligner(model.model.vision_model(pixel_values).last_hidden_state)
        embeds = engine.lm.embed_tokens(ids)
        return embeds.masked_scatter((ids == engine.image_token_id)[..., None], features.to(embeds.dtype))

    def next_token_probs(self, cache: decoder.KVCache, suffixes: list[list[int]]) -> torch.Tensor:
        """float32 [rows, vocab]: the next-token distribution after each row's prefix (in `cache`) and suffix."""
        engine = self.engine
        prefix_len, width = len(self.prefix_ids), max(map(len, suffixes))
        ids = torch.tensor([s + [engine.pad_id] * (width - len(s)) for s in suffixes], device=engine.device)
        slots = torch.arange(prefix_len, prefix_len + width, device=engine.device)
        no_padding = torch.zeros(len(suffixes), dtype=torch.long, device=engine.device)
        hidden = decoder.forward(engine.lm, engine.lm.embed_tokens(ids), slots, no_padding, cache, prefix_len + width)
        ends = torch.tensor([len(s) - 1 for s in suffixes], device=engine.device)
        last = hidden[torch.arange(len(suffixes), device=engine.device), ends]
        return torch.softmax(engine.model.lm_head(last).float(), dim=-1)
