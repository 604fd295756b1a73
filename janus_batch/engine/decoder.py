"""The Llama decoder of Janus run over a preallocated KV cache (gpt-fast style).

We use transformers' modules and weights (norms, projections, MLP, rotary tables) but drive them ourselves:
one `forward` serves prefill and decode, writes keys/values into a cache allocated once per batch,
and attends over a fixed number of cache slots (on a GPU the decode step can be replayed as CUDA graphs).
Every row of a batch shares the same cache slot per step; rows are left-padded, so a row's position id is
its slot minus its padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Decode attention reads cache slots rounded up to a multiple of this: only about the filled part of the
# cache is read, while the number of distinct shapes (and so of future CUDA graphs) stays small.
KV_BUCKET = 64


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # per layer [rows, heads, max_len, head_dim]
    values: list[torch.Tensor]

    @classmethod
    def allocate(cls, lm: nn.Module, rows: int, max_len: int, device: torch.device, dtype: torch.dtype):
        cfg = lm.config
        heads = cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (rows, heads, max_len, head_dim)
        n = cfg.num_hidden_layers
        return cls(
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
        )

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]


def kv_read_len(last_slot: int, max_len: int) -> int:
    """Cache slots a step at `last_slot` must read, rounded up to KV_BUCKET."""
    return min(max_len, (last_slot // KV_BUCKET + 1) * KV_BUCKET)


class CudaGraphs:
    """Runs `step(kv_len)` as CUDA graphs: one per KV bucket, captured the first time that bucket is met and
    replayed after. That first call runs eagerly (it is the warm-up, on a side stream) and does the real work;
    the capture only records. The graphs share one memory pool: they never run at the same time.

    `step` must read and write only tensors that outlive the graphs (inputs, outputs, the KV cache) and must not
    synchronise with the host; its shapes may depend on kv_len alone."""

    def __init__(self, step):
        self.step = step
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def __call__(self, kv_len: int) -> None:
        graph = self.graphs.get(kv_len)
        if graph is not None:
            graph.replay()
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.step(kv_len)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads of the process (a Serve health check, say) may use CUDA meanwhile.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self.step(kv_len)
        self.pool = graph.pool()
        self.graphs[kv_len] = graph


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def forward(
    lm: nn.Module,
    embeds: torch.Tensor,
    slots: torch.Tensor,
    pad_lens: torch.Tensor,
    cache: KVCache,
    kv_len: int,
) -> torch.Tensor:
    """Run the decoder on `embeds` [rows, T, hidden] placed at cache `slots` [T]; return final hidden states.

    `pad_lens` [rows] is each row's left padding; cache slots below it are never attended to.
    `kv_len` is how many cache slots attention reads (>= slots[-1] + 1).
    """
    rows, steps, _ = embeds.shape
    positions = (slots[None, :] - pad_lens[:, None]).clamp(min=0)
    cos, sin = lm.rotary_emb(embeds, positions)
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads

    key_slots = torch.arange(kv_len, device=embeds.device)
    causal = key_slots[None, :] <= slots[:, None]  # [T, kv_len]
    real = key_slots[None, :] >= pad_lens[:, None]  # [rows, kv_len]
    # A padding query attends to itself only: its output is unused, but a row of -inf would give NaN.
    own = key_slots[None, :] == slots[:, None]
    mask = (causal[None] & (real[:, None] | own[None]))[:, None]  # [rows, 1, T, kv_len]

    hidden = embeds
    for i, layer in enumerate(lm.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(rows, steps, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(rows, steps, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(rows, steps, -1, attn.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        cache.keys[i].index_copy_(2, slots, k)
        cache.values[i].index_copy_(2, slots, v)
        out = F.scaled_dot_product_attention(
            q,
            cache.keys[i][:, :, :kv_len],
            cache.values[i][:, :, :kv_len],
            attn_mask=mask,
            scale=attn.scaling,
            enable_gqa=attn.num_key_value_groups > 1,
        )
        hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(rows, steps, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return lm.norm(hidden)
