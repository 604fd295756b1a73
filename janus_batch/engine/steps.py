"""The steps of the engine's two decode loops, as module functions of explicit inputs: a kept step (and the CUDA
graph captured from it) can only ever read its batch's own tensors and the values bound from the batch's key, never
a value of the call that first built it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from janus_batch.engine import decoder, memory, sampling
from janus_batch.engine.images import normalize
from janus_batch.engine.memory import StaticBatch


def sampling_key(seed: int, row_id: str | int, index: int) -> int:
    return sampling.row_key(seed, sampling.id32(row_id), index)


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [rows, max_len] left-padded with pad_id, pad_lens [rows])."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    pad_lens = torch.tensor([width - len(r) for r in rows], dtype=torch.long, device=device)
    return ids, pad_lens


def prefill(lm, embed: Callable[[int, int], torch.Tensor], batch: StaticBatch, prompt_len: int) -> torch.Tensor:
    """Every row's prompt through the decoder, PREFILL_TOKENS at a time; the last hidden state of each
    row [rows, hidden]. `embed(start, end)` gives rows [start, end) of the prompt embeddings."""
    rows = len(batch.pad_lens)
    chunk = max(1, memory.PREFILL_TOKENS // prompt_len)
    slots = torch.arange(prompt_len, device=batch.pad_lens.device)
    last = []
    for start in range(0, rows, chunk):
        end = min(rows, start + chunk)
        cache = batch.cache.rows(start, end)
        hidden = decoder.forward(lm, embed(start, end), slots, batch.pad_lens[start:end], cache, prompt_len)
        last.append(hidden[:, -1])
    return torch.cat(last)


def understanding_embeds(model, ids, pixels: np.ndarray, pixel_table, image_token_id: int, start: int, end: int):
    """Prompt embeddings of rows [start, end), the image features in place of the placeholders."""
    lm = model.model.language_model
    pixel_values = normalize(torch.from_numpy(pixels[start:end]).to(ids.device), pixel_table).to(model.dtype)
    features = model.model.aligner(model.model.vision_model(pixel_values).last_hidden_state)
    embeds = lm.embed_tokens(ids[start:end])
    return embeds.masked_scatter((ids[start:end] == image_token_id)[..., None], features.to(embeds.dtype))


def take_image_token(model, codes, cfg_weight, temperature, top_k, top_p, batch: StaticBatch, hidden) -> None:
    """Token `step` of every image from the last hidden states of its two CFG rows, then step + 1."""
    # The CFG mix in the model's dtype, as DeepSeek's code does (sampling then works in float32): in bf16 the
    # engine's tokens then differ from the reference loop's only by attention rounding (tests).
    logits = model.model.generation_head(hidden)
    n = len(batch.keys)
    cond, uncond = logits[:n], logits[n:]
    token = sampling.sample(
        uncond + cfg_weight * (cond - uncond), batch.keys, batch.step, codes, temperature, top_k, top_p
    )
    batch.out.index_copy_(1, batch.step.view(1), token[:, None])
    batch.step.add_(1)


def image_decode_step(model, take: Callable, batch: StaticBatch, kv_len: int) -> None:
    """Feed token `step - 1` of every image, make token `step`. It reads and writes only the batch's kept
    tensors, with no host round trip: captured once as a CUDA graph, it replays for later batches."""
    previous = batch.out.index_select(1, batch.step.view(1) - 1).view(-1)
    embeds = model.prepare_embeddings_for_image_generation(previous.repeat(2))[:, None]
    slot = (batch.step + batch.prompt_len - 1).view(1)
    take(batch, decoder.forward(model.model.language_model, embeds, slot, batch.pad_lens, batch.cache, kv_len)[:, -1])


def take_text_token(model, codes, temperature, eos_id: int, pad_id: int, batch: StaticBatch, hidden) -> None:
    """Token `step` of every row (pad once the row has made EOS), then step + 1."""
    token = sampling.sample(model.lm_head(hidden), batch.keys, batch.step, codes, temperature)
    token = token.masked_fill(batch.done, pad_id)
    batch.out.index_copy_(1, batch.step.view(1), token[:, None])
    batch.done |= token == eos_id
    batch.step.add_(1)


def text_decode_step(lm, take: Callable, batch: StaticBatch, kv_len: int) -> None:
    """Feed token `step - 1`, make token `step`: kept tensors only, as in image generation."""
    previous = batch.out.index_select(1, batch.step.view(1) - 1)
    slot = (batch.step + batch.prompt_len - 1).view(1)
    take(batch, decoder.forward(lm, lm.embed_tokens(previous), slot, batch.pad_lens, batch.cache, kv_len)[:, -1])
