"""The Llama decoder of Janus run over a preallocated KV cache (gpt-fast style).

We use transformers' modules and weights (norms, projections, MLP, rotary tables) but drive them ourselves:
one `forward` serves prefill and decode, writes keys/values into a cache allocated once per engine,
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


def kv_shape(lm: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the decoder."""
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim


def bytes_per_slot(lm: nn.Module, dtype: torch.dtype) -> int:
    """KV cache bytes of one token of one row: keys and values of every layer."""
    layers, heads, head_dim = kv_shape(lm)
    return 2 * layers * heads * head_dim * dtype.itemsize


@dataclass
class KVCache:
    """A batch's view of the cache: per layer [rows, heads, max_len, head_dim]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def rows(self, start: int, end: int) -> KVCache:
        """Rows [start, end) of this cache (views: writes land in this cache)."""
        return KVCache([k[start:end] for k in self.keys], [v[start:end] for v in self.values])


class KVStore:
    """The KV cache memory of an engine: one flat buffer per layer for keys and one for values, allocated
    once, holding `capacity` slots (a slot is one token of one row). Every batch views the front of the buffers
    as [rows, heads, capacity // rows, head_dim]: a batch of as many rows gets the same addresses, so the CUDA
    graphs captured for one batch replay for the next."""

    def __init__(self, lm: nn.Module, capacity: int, device: torch.device, dtype: torch.dtype):
        layers, self.heads, self.head_dim = kv_shape(lm)
        size = capacity * self.heads * self.head_dim
        self.capacity = capacity
        self.keys = [torch.zeros(size, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.zeros(size, device=device, dtype=dtype) for _ in range(layers)]

    def cache(self, rows: int) -> KVCache:
        shape = (rows, self.heads, self.capacity // rows, self.head_dim)
        size = shape[0] * shape[1] * shape[2] * shape[3]
        return KVCache([k[:size].view(shape) for k in self.keys], [v[:size].view(shape) for v in self.values])


def round_up(length: int) -> int:
    return -(-length // KV_BUCKET) * KV_BUCKET


def kv_read_len(last_slot: int, max_len: int) -> int:
    """Cache slots a step at `last_slot` must read, rounded up to KV_BUCKET."""
    return min(max_len, (last_slot // KV_BUCKET + 1) * KV_BUCKET)


class CudaGraphs:
    """Runs `step(kv_len)` as CUDA graphs: one per KV bucket, captured the first time that bucket is met and
    replayed after. That first call runs eagerly (it is the warm-up) and does the real work; the capture only
    records. Both run on one side stream, so what a stream needs once (cuBLAS's workspace) is allocated at the
    warm-up, outside the graphs' pool.

    `step` must read and write only tensors that outlive the graphs (inputs, outputs, the KV cache) and must not
    synchronise with the host; its shapes may depend on kv_len alone. So every tensor it makes in the graph
    pool is a temporary, dead when the step ends: graphs can share one `pool` (from
    `torch.cuda.graph_pool_handle()`) and replay in any order, as long as never two at the same time."""

    def __init__(self, step, pool):
        self.step = step
        self.pool = pool
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.stream = torch.cuda.Stream()

    def __call__(self, kv_len: int) -> None:
        graph = self.graphs.get(kv_len)
        if graph is not None:
            graph.replay()
            return
        stream = self.stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.step(kv_len)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads of the process (a Serve health check, say) may use CUDA meanwhile.
        with torch.cuda.graph(graph, pool=self.pool, stream=stream, capture_error_mode="thread_local"):
            self.step(kv_len)
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
