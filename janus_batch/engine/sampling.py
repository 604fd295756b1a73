"""Counter-based sampling: the noise for (row key, step, vocab id) is a pure hash, never a RNG stream.

That is what makes image i of prompt p identical whatever else shares its batch, however many actors run
and wherever a job resumes. Gumbel-max (argmax(logits / T + Gumbel noise)) draws exactly from
softmax(logits / T), with no host synchronisation and fixed shapes (CUDA-graph friendly).
"""

from __future__ import annotations

import hashlib

import torch

_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2**32 for 0 <= x < 2**32, split so int64 tensors never overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def mix32(x):
    """murmur3's 32-bit finaliser: a bijection with full avalanche. Works on ints and int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def id32(value: str | int) -> int:
    """A stable 32-bit id for a user id (str or int); str(1) and "1" are the same id."""
    return int.from_bytes(hashlib.blake2b(str(value).encode(), digest_size=4).digest(), "little")


def row_key(seed: int, stream_id: int, index: int) -> int:
    """Key of one sampled sequence, e.g. (seed, prompt id, image index)."""
    key = mix32(seed & _M32)
    key = mix32(key ^ ((seed >> 32) & _M32))
    key = mix32(key ^ (stream_id & _M32))
    return mix32(key ^ (index & _M32))


def vocab_codes(vocab_size: int, device: torch.device) -> torch.Tensor:
    """Per-vocab-entry hash inputs, computed once per engine."""
    return mix32((torch.arange(vocab_size, device=device, dtype=torch.int64) * 0x9E3779B1) & _M32)


def gumbel_noise(keys: torch.Tensor, step: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise [rows, vocab] that depends only on (row key, step, vocab id)."""
    step_keys = mix32(keys ^ mix32((step + 0x632BE5AB) & _M32))
    bits = mix32(mix32(step_keys[:, None] ^ codes[None, :]))
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(uniform))


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Mask logits outside the top-k / nucleus (top-p) set with -inf.
    Both off (None) by default, as in DeepSeek's code."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already cover top_p; the first one always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    keys: torch.Tensor,
    step: torch.Tensor,
    codes: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Next tokens [rows] from logits [rows, vocab]. temperature 0 means greedy (argmax)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    return (logits + gumbel_noise(keys, step, codes)).argmax(-1)
