"""The decode memory of one engine: the KV cache (planned once from GPU memory), the batch shapes it keeps, with
their tensors and CUDA graphs, and the forward batches a call is split into.

The engine's decode loops ask this object for a `StaticBatch` per batch shape; everything that outlives a call
(the KV store, kept batches, the graph pool) lives here, and is dropped together when the KV store is reallocated.
The user's settings (`kv_cache_tokens`, `max_batch_rows`, ...) are read, never written: what the cache holds now
(planned, or cut after running out of memory) is the read-only `capacity`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from janus_batch.engine import decoder

log = logging.getLogger(__name__)

# Prompt tokens per prefill forward: bounds prefill activation memory whatever the batch size.
PREFILL_TOKENS = 16384
# Rows per forward batch on CPU, where no memory budget sizes batches.
CPU_BATCH_ROWS = 64
# GPU memory kept free beside the estimated workspace: cuBLAS workspaces, CUDA graphs, allocator fragmentation.
GPU_MEMORY_MARGIN = 1 << 30
# Share of the KV cache given back after running out of GPU memory, before the batch is retried.
OOM_SHRINK = 0.2
# Batch shapes whose decode state (and CUDA graphs) an engine keeps; the least recently used goes first.
MAX_BATCH_SHAPES = 32


@dataclass
class StaticBatch:
    """The tensors a decode loop reads and writes, kept across batches of one shape: each batch copies its own
    inputs in, so the CUDA graphs captured for the first batch replay for every later one."""

    cache: decoder.KVCache
    pad_lens: torch.Tensor  # [cache rows] left padding of each row
    keys: torch.Tensor  # [rows] sampling keys
    out: torch.Tensor  # [rows, tokens] the tokens made
    done: torch.Tensor  # [rows] rows that made EOS (understanding)
    step: torch.Tensor  # () the token being made
    prompt_len: torch.Tensor  # () the padded prompt length of the batch
    run_step: Callable[[int], None] | None = None  # decode step (kv_len), eager or CUDA graphs

    def load(self, pad_lens: torch.Tensor, keys: list[int], prompt_len: int) -> None:
        self.pad_lens.copy_(pad_lens)
        self.keys.copy_(torch.tensor(keys, dtype=torch.int64))
        self.prompt_len.fill_(prompt_len)
        self.step.zero_()
        self.done.zero_()


def memory_share(gpu_memory_utilization: float, gpus: float) -> float:
    """gpu_memory_utilization for a Ray actor or replica holding `gpus` GPUs: actors that share a GPU share
    its memory too. 1.0 on CPU (no GPU memory to share)."""
    return gpu_memory_utilization * min(gpus, 1) if gpus else 1.0


def workspace_bytes(model, dtype: torch.dtype, vq_batch: int, max_slots: int) -> int:
    """Estimated GPU memory of the largest phase besides the KV cache (the phases never overlap): a prefill chunk's
    activations, the decode step's logits and sampling noise, or a VQ decode."""
    config = model.config
    text, vq, vision = config.text_config, config.vq_config, config.vision_config
    item = dtype.itemsize
    prefill = PREFILL_TOKENS * (3 * text.intermediate_size + 8 * text.hidden_size) * item
    max_rows = max_slots // vision.num_image_tokens  # every row holds an image's tokens
    decode = max_rows * text.vocab_size * 32  # float32 logits and noise, int64 hashes
    gen_image_size = vq.num_patches * 2 ** (len(vq.channel_multiplier) - 1)
    vq_decode = vq_batch * gen_image_size**2 * vq.base_channels * 6 * item
    return max(prefill, decode, vq_decode) + GPU_MEMORY_MARGIN


class DecodeMemory:
    def __init__(
        self,
        model,
        *,
        device: torch.device,
        dtype: torch.dtype,
        vq_batch: int,
        max_batch_rows: int | None = None,
        kv_cache_tokens: int | None = None,
        gpu_memory_utilization: float = 0.9,
        cuda_graphs: bool = True,
    ):
        """`max_batch_rows`: at most this many images (or understanding rows) per forward batch; None: as many as
        the KV cache holds on a GPU, CPU_BATCH_ROWS on CPU.
        `kv_cache_tokens`: KV cache size in slots (one token of one row); None: sized from free memory on a GPU
        (planned at the first batch, then kept), as each batch needs on CPU.
        `gpu_memory_utilization`: share of the GPU's memory this engine may use, weights included; lower it when
        actors share a GPU.
        `cuda_graphs`: on a GPU, replay the decode steps as CUDA graphs (one per batch shape and KV bucket).
        `vq_batch`: the engine's images per VQ decode call (part of the workspace)."""
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        self.model = model
        self.lm = model.model.language_model
        self.device, self.dtype = device, dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_batch_rows = max_batch_rows
        self.vq_batch = vq_batch
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        # None until planned on a GPU (at the first batch, once the weights are in memory); None on CPU: no limit.
        self._capacity = kv_cache_tokens
        self.kv: decoder.KVStore | None = None
        self.static_batches: dict[tuple, StaticBatch] = {}
        self.graph_pool = None  # one memory pool shared by the CUDA graphs of the kept batches

    @property
    def capacity(self) -> int | None:
        """KV cache slots (a slot is one token of one row) this engine may hold: kv_cache_tokens, or on a GPU what
        memory allows (planned once), less what running out of memory gave back; None on CPU: no limit."""
        if self._capacity is None and self.device.type == "cuda":
            self._capacity = self.plan()
        return self._capacity

    def plan(self) -> int:
        """KV cache slots that fit in this engine's share of GPU memory, beside what it already holds (the
        weights) and the workspace of its largest phase."""
        free, total = torch.cuda.mem_get_info(self.device)
        held = torch.cuda.memory_allocated(self.device)
        cached = torch.cuda.memory_reserved(self.device) - held  # free inside this process's allocator
        available = min(free + cached, self.gpu_memory_utilization * total - held)
        per_slot = decoder.bytes_per_slot(self.lm, self.dtype)
        workspace = workspace_bytes(self.model, self.dtype, self.vq_batch, int(available // per_slot))
        slots = int((available - workspace) // per_slot)
        gib = 2**-30
        log.info(
            "KV cache: %d slots (%.1f GiB); GPU %.1f GiB, weights %.1f GiB, utilization %.2f",
            slots,
            slots * per_slot * gib,
            total * gib,
            held * gib,
            self.gpu_memory_utilization,
        )
        if slots < self.model.config.vq_config.num_patches**2:  # not one image's tokens
            raise RuntimeError(
                f"no room for a KV cache: {available * gib:.1f} GiB of GPU memory left to this engine after "
                f"{held * gib:.1f} GiB of weights (gpu_memory_utilization {self.gpu_memory_utilization})"
            )
        return slots

    # ---- forward batches --------------------------------------------------------------------------------

    def in_batches(self, count: int, cache_rows: int, length: int, run: Callable[[int, int], list]) -> list:
        """`run(start, end)` over items [0, count) in equal batches as large as max_batch_rows and the KV cache
        allow, each item taking `cache_rows` rows of `length` slots. When the GPU runs out of memory, give back
        part of the KV cache and retry the batch in smaller batches (the sampling noise does not depend on them)."""
        results: list = []
        start = 0
        while start < count:
            size = self.batch_size(count - start, cache_rows, length)
            try:
                results.extend(run(start, start + size))
            except torch.OutOfMemoryError:
                if not self.shrink(cache_rows * decoder.round_up(length)):
                    raise
                continue
            start += size
        return results

    def batch_size(self, count: int, cache_rows: int, length: int) -> int:
        """Items per batch to run `count` items in as few equal batches as batch_limit allows."""
        batches = -(-count // self.batch_limit(cache_rows, length))
        return -(-count // batches)

    def batch_limit(self, cache_rows: int, length: int) -> int:
        """The most items per forward batch, each taking `cache_rows` rows of `length` slots: max_batch_rows,
        or as many as the KV cache holds (CPU_BATCH_ROWS on CPU without a kv_cache_tokens budget)."""
        capacity = self.capacity
        if capacity is None:
            return self.max_batch_rows or CPU_BATCH_ROWS
        # Lengths rounded up to a KV bucket: batches of similar prompts share a shape (and CUDA graphs).
        fit = capacity // (cache_rows * decoder.round_up(length))
        if fit < 1:
            raise ValueError(
                f"one item needs {cache_rows} x {length} KV cache slots, the cache holds {capacity} "
                "(raise kv_cache_tokens or gpu_memory_utilization, or shorten the prompt)"
            )
        return min(self.max_batch_rows or fit, fit)

    def shrink(self, item_slots: int) -> bool:
        """Out of GPU memory: give back OOM_SHRINK of the KV cache for workspace. False when there is no
        budget to shrink, or the smaller cache would not hold one item: then the error is the device's."""
        if self.kv is None or self._capacity is None:
            return False
        smaller = int(self.kv.capacity * (1 - OOM_SHRINK))
        if smaller < item_slots:
            return False
        self._capacity = smaller
        log.warning("out of GPU memory: KV cache cut to %d slots; retrying the batch", smaller)
        self.release()
        return True

    # ---- kept batches -----------------------------------------------------------------------------------

    def static_batch(
        self, key: tuple, rows: int, cache_rows: int, length: int, tokens: int, pad_id: int
    ) -> StaticBatch:
        """The kept tensors for batches of this shape (`key`), with a KV cache of `cache_rows` rows of at least
        `length` slots and room for `tokens` tokens per row; the KV store is (re)allocated when it is too small."""
        if self.kv is None or self.kv.capacity // cache_rows < length:
            self.release()
            capacity = self.capacity or cache_rows * length
            if capacity < cache_rows * length:
                raise ValueError(f"{cache_rows} rows of {length} slots exceed the KV cache of {capacity} slots")
            self.kv = decoder.KVStore(self.lm, capacity, self.device, self.dtype)
        batch = self.static_batches.pop(key, None)
        if batch is None:
            if len(self.static_batches) >= MAX_BATCH_SHAPES:
                self.drop(next(iter(self.static_batches)))  # the least recently used
            device, long = self.device, torch.long
            batch = StaticBatch(
                cache=self.kv.cache(cache_rows),
                pad_lens=torch.zeros(cache_rows, dtype=long, device=device),
                keys=torch.zeros(rows, dtype=torch.int64, device=device),
                out=torch.full((rows, tokens), pad_id, dtype=long, device=device),
                done=torch.zeros(rows, dtype=torch.bool, device=device),
                step=torch.zeros((), dtype=long, device=device),
                prompt_len=torch.zeros((), dtype=long, device=device),
            )
        self.static_batches[key] = batch  # the most recently used last
        return batch

    def graphed(self, step: Callable[[int], None]) -> Callable[[int], None]:
        """`step`, replayed as CUDA graphs when they are on."""
        if not self.cuda_graphs:
            return step
        if self.graph_pool is None:
            self.graph_pool = torch.cuda.graph_pool_handle()
        return decoder.CudaGraphs(step, self.graph_pool)

    def release(self) -> None:
        """Free the KV store and everything pointing into it (kept batches and their CUDA graphs)."""
        self.kv = None
        for key in list(self.static_batches):
            self.drop(key)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def drop(self, key: tuple) -> None:
        # A batch's decode step holds the batch: breaking that cycle frees the memory now, not whenever Python's
        # garbage collector next runs (the retry after out of memory needs it now).
        self.static_batches.pop(key).run_step = None
        if not any(isinstance(b.run_step, decoder.CudaGraphs) for b in self.static_batches.values()):
            # PyTorch's allocator forgets a graph pool once no graph uses it, and capturing into that pool's id
            # again fails an internal assert: the next capture starts a new pool.
            self.graph_pool = None
