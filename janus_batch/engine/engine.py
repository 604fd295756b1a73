"""JanusEngine: batched CFG text-to-image synthesis and batched understanding (captioning / VQA).

Pure PyTorch, no Ray: used by the Ray actors, the Serve replicas, notebooks and benchmarks alike.
Prompts are formatted (stripped, with the model family's chat roles) and the CFG rows built exactly as in
DeepSeek's reference code, images preprocessed with the checkpoint's preprocessor settings; many prompts of
different lengths share one batch (left padding, per-row positions and masks); every sampled token comes
from counter-based noise keyed on (seed, prompt id, image index, step), so the random numbers never depend on
batching (nor, on CPU in float32, do the results; in bf16 on a GPU, kernels picked per batch shape may round
differently).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from janus_batch.engine import decoder, sampling
from janus_batch.engine.images import decode_image, normalize, pixels_to_uint8, preprocess_image, to_rgb, value_table
from janus_batch.model.loading import DEFAULT_PROMPT_FORMAT, Preprocessing, load_janus, prompt_format_of
from janus_batch.model.tiny import BOI, EOI, IMAGE

log = logging.getLogger(__name__)

DEFAULT_CAPTION_INSTRUCTION = "Describe this image in detail."
# The chat roles of DeepSeek's conversation template per model family, as DeepSeek's own scripts pass them:
# Janus-Pro's (demo/app_januspro.py, its README) and Janus-1.3B's (inference.py, generation_inference.py, demo/app.py).
PROMPT_ROLES = {"janus-pro": ("<|User|>", "<|Assistant|>"), "janus-1.3b": ("User", "Assistant")}
# DeepSeek's VLChatProcessor system prompt, used for understanding (not for image generation).
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
# Checked every this many decode steps whether all rows have stopped (the only host sync in the loop).
STOP_CHECK_EVERY = 8
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
class GeneratedImage:
    prompt_id: str
    prompt: str
    sample_index: int
    seed: int
    tokens: np.ndarray  # int32 [image tokens]
    pixels: np.ndarray  # uint8 [H, W, 3]


@dataclass
class TextResult:
    text: str
    num_tokens: int  # generated tokens, EOS included
    finish_reason: Literal["eos", "length"]


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


def chat_prompt(message: str, roles: tuple[str, str], system_prompt: str) -> str:
    """DeepSeek's conversation template (janus/utils/conversation.py, "deepseek") as its processor applies it to
    one user message and an open assistant turn: the message stripped, the system prompt (if any) and the message
    each followed by a blank line, the whole prompt stripped."""
    user, assistant = roles
    system = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{system}{user}: {message.strip()}\n\n{assistant}:".strip()


def generation_prompt(prompt: str, prompt_format: str = DEFAULT_PROMPT_FORMAT) -> str:
    """DeepSeek's generation prompt: the template with an empty system prompt, then <begin_of_image>."""
    return chat_prompt(prompt, PROMPT_ROLES[prompt_format], "") + BOI


def understanding_prompt(
    question: str, num_image_tokens: int, system_prompt: str, prompt_format: str = DEFAULT_PROMPT_FORMAT
) -> str:
    """DeepSeek's understanding prompt: the user message is the image, a newline and the question (so stripping it
    strips the question's end), and the image's placeholder becomes <begin_of_image>, `num_image_tokens`
    placeholders and <end_of_image> (VLChatProcessor.add_image_token)."""
    image = BOI + IMAGE * num_image_tokens + EOI
    return chat_prompt(f"{image}\n{question}", PROMPT_ROLES[prompt_format], system_prompt)


def memory_share(gpu_memory_utilization: float, gpus: float) -> float:
    """gpu_memory_utilization for a Ray actor or replica holding `gpus` GPUs: actors that share a GPU share
    its memory too. 1.0 on CPU (no GPU memory to share)."""
    return gpu_memory_utilization * min(gpus, 1) if gpus else 1.0


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [rows, max_len] left-padded with pad_id, pad_lens [rows])."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    pad_lens = torch.tensor([width - len(r) for r in rows], dtype=torch.long, device=device)
    return ids, pad_lens


class JanusEngine:
    def __init__(
        self,
        model,
        processor,
        *,
        model_id: str = "",
        weights_hash: str = "",
        max_batch_rows: int | None = None,
        kv_cache_tokens: int | None = None,
        gpu_memory_utilization: float = 0.9,
        vq_batch: int = 16,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        prompt_format: str = "auto",
        cuda_graphs: bool = True,
    ):
        """`max_batch_rows`: at most this many images (or understanding rows) per forward batch; None: as many
        as the KV cache holds on a GPU, CPU_BATCH_ROWS on CPU.
        `kv_cache_tokens`: KV cache size in slots (one token of one row); None: sized from free memory on a
        GPU (allocated at the first batch, then kept), as each batch needs on CPU.
        `gpu_memory_utilization`: share of the GPU's memory this engine may use, weights included; lower it
        when actors share a GPU.
        `vq_batch`: images per VQ decode call.
        `prompt_format`: the chat roles, "janus-pro" or "janus-1.3b" (PROMPT_ROLES); "auto": as the checkpoint
        tells (`prompt_format_of`: recorded in its config, else from its name, `model_id`).
        `cuda_graphs`: on a GPU, replay the decode steps as CUDA graphs (one per batch shape and KV bucket)."""
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model_id = model_id
        self.weights_hash = weights_hash
        self.max_batch_rows = max_batch_rows
        self.kv_cache_tokens = kv_cache_tokens
        self.gpu_memory_utilization = gpu_memory_utilization
        self.vq_batch = vq_batch
        self.system_prompt = system_prompt
        if prompt_format == "auto":
            prompt_format, why = prompt_format_of(model_id, getattr(model.config, "prompt_format", None))
        elif prompt_format in PROMPT_ROLES:
            why = "as asked"
        else:
            raise ValueError(f"prompt_format must be 'auto' or one of {sorted(PROMPT_ROLES)}, got {prompt_format!r}")
        self.prompt_format = prompt_format
        log.info("%s: prompt format %s (%s)", model_id or "model", prompt_format, why)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"

        config = model.config
        self.lm = model.model.language_model
        self.image_size = config.vision_config.image_size
        self.num_image_tokens = config.vision_config.num_image_tokens  # understanding placeholders
        grid = config.vq_config.num_patches
        self.num_gen_tokens = grid * grid  # generated tokens per image (16x downsampling)
        self.gen_image_size = grid * 2 ** (len(config.vq_config.channel_multiplier) - 1)
        self.max_positions = config.text_config.max_position_embeddings
        tok = self.tokenizer
        self.bos_id = tok.convert_tokens_to_ids(tok.bos_token)
        self.eos_id = tok.convert_tokens_to_ids(tok.eos_token)
        self.pad_id = tok.convert_tokens_to_ids(tok.pad_token)
        self.image_token_id = config.image_token_id
        # Special tokens the prompts and the CFG rows are built of: in a user's text they would change the
        # template (a second image placeholder, say, has no image to take), so such text is refused.
        added = tok.get_added_vocab()
        template = (tok.bos_token, tok.eos_token, tok.pad_token, IMAGE, BOI, EOI, *PROMPT_ROLES[prompt_format])
        self.reserved_tokens = [t for t in template if t in added]
        self.preprocessing = Preprocessing.of(processor.image_processor)
        self.pixel_table = torch.from_numpy(value_table(self.preprocessing)).to(self.device)

        # Kept across batches (see StaticBatch); all dropped together when the KV store is reallocated.
        self.kv: decoder.KVStore | None = None
        self.static_batches: dict[tuple, StaticBatch] = {}
        self.graph_pool = None  # one memory pool shared by the CUDA graphs of the kept batches
        self.codes = {
            vocab: sampling.vocab_codes(vocab, self.device)
            for vocab in (config.vq_config.num_embeddings, config.text_config.vocab_size)
        }

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        *,
        dtype=None,
        device=None,
        storage_options=None,
        allow_pickle: bool = False,
        revision: str | None = None,
        **engine_kwargs,
    ):
        """An engine on `load_janus(source, ...)` (see there for `allow_pickle` and `revision`)."""
        loaded = load_janus(
            source,
            dtype=dtype,
            device=device,
            storage_options=storage_options,
            allow_pickle=allow_pickle,
            revision=revision,
        )
        return cls(
            loaded.model,
            loaded.processor,
            model_id=loaded.model_id,
            weights_hash=loaded.weights_hash,
            **engine_kwargs,
        )

    # ---- prompts -------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        # BOS first, as DeepSeek's tokenizer.encode does.
        return [self.bos_id] + self.tokenizer.encode(text, add_special_tokens=False)

    def generation_ids(self, prompt: str) -> list[int]:
        return self.encode(generation_prompt(prompt, self.prompt_format))

    def understanding_ids(self, question: str) -> list[int]:
        return self.encode(
            understanding_prompt(question, self.num_image_tokens, self.system_prompt, self.prompt_format)
        )

    def reserved_token_in(self, text: str) -> str | None:
        return next((token for token in self.reserved_tokens if token in text), None)

    def check_prompt(self, prompt: object) -> str | None:
        """Why `prompt` cannot be used for image generation, or None when it can."""
        if not isinstance(prompt, str):
            return f"prompt must be a string, got {type(prompt).__name__}"
        if not prompt.strip():
            return "empty prompt"
        if (token := self.reserved_token_in(prompt)) is not None:
            return f"prompt contains {token!r}, a special token of the prompt template"
        length = len(self.generation_ids(prompt))
        if length + self.num_gen_tokens > self.max_positions:
            return (
                f"prompt too long: {length} tokens + {self.num_gen_tokens} image tokens exceeds the "
                f"model's context of {self.max_positions} positions"
            )
        return None

    def check_question(self, question: str, max_new_tokens: int) -> str | None:
        """Why `question` (or a caption instruction) cannot be asked, or None when it can."""
        if not question.strip():
            return "empty question"
        if (token := self.reserved_token_in(question)) is not None:
            return f"question contains {token!r}, a special token of the prompt template"
        length = len(self.understanding_ids(question))
        if length + max_new_tokens > self.max_positions:
            return (
                f"question too long: {length} prompt tokens + {max_new_tokens} new tokens exceeds the model's "
                f"context of {self.max_positions} positions"
            )
        return None

    # ---- batches, KV cache and GPU memory ---------------------------------------------------------------

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
                if not self.shrink_kv(cache_rows * decoder.round_up(length)):
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
        capacity = self.kv_capacity()
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

    def kv_capacity(self) -> int | None:
        """KV cache slots this engine may hold: kv_cache_tokens, or on a GPU what memory allows (planned once),
        or None on CPU: no limit."""
        if self.kv_cache_tokens is None and self.device.type == "cuda":
            self.kv_cache_tokens = self.plan_kv_cache()
        return self.kv_cache_tokens

    def plan_kv_cache(self) -> int:
        """KV cache slots that fit in this engine's share of GPU memory, beside what it already holds (the
        weights) and the workspace of its largest phase."""
        free, total = torch.cuda.mem_get_info(self.device)
        held = torch.cuda.memory_allocated(self.device)
        cached = torch.cuda.memory_reserved(self.device) - held  # free inside this process's allocator
        available = min(free + cached, self.gpu_memory_utilization * total - held)
        per_slot = decoder.bytes_per_slot(self.lm, self.dtype)
        slots = int((available - self.workspace_bytes(available // per_slot)) // per_slot)
        gib = 2**-30
        log.info(
            "KV cache: %d slots (%.1f GiB); GPU %.1f GiB, weights %.1f GiB, utilization %.2f",
            slots,
            slots * per_slot * gib,
            total * gib,
            held * gib,
            self.gpu_memory_utilization,
        )
        if slots < self.num_gen_tokens:
            raise RuntimeError(
                f"no room for a KV cache: {available * gib:.1f} GiB of GPU memory left to this engine after "
                f"{held * gib:.1f} GiB of weights (gpu_memory_utilization {self.gpu_memory_utilization})"
            )
        return slots

    def workspace_bytes(self, max_slots: int) -> int:
        """Estimated GPU memory of the largest phase besides the KV cache (the phases never overlap): a
        prefill chunk's activations, the decode step's logits and sampling noise, or a VQ decode."""
        text, vq = self.model.config.text_config, self.model.config.vq_config
        item = self.dtype.itemsize
        prefill = PREFILL_TOKENS * (3 * text.intermediate_size + 8 * text.hidden_size) * item
        max_rows = max_slots // self.num_image_tokens  # every row holds an image's tokens
        decode = max_rows * text.vocab_size * 32  # float32 logits and noise, int64 hashes
        vq_decode = self.vq_batch * self.gen_image_size**2 * vq.base_channels * 6 * item
        return max(prefill, decode, vq_decode) + GPU_MEMORY_MARGIN

    def shrink_kv(self, item_slots: int) -> bool:
        """Out of GPU memory: give back OOM_SHRINK of the KV cache for workspace. False when there is no
        budget to shrink, or the smaller cache would not hold one item: then the error is the device's."""
        if self.kv is None or self.kv_cache_tokens is None:
            return False
        smaller = int(self.kv.capacity * (1 - OOM_SHRINK))
        if smaller < item_slots:
            return False
        self.kv_cache_tokens = smaller
        log.warning("out of GPU memory: KV cache cut to %d slots; retrying the batch", self.kv_cache_tokens)
        self.release_kv()
        return True

    def release_kv(self) -> None:
        """Free the KV store and everything pointing into it (static batches and their CUDA graphs)."""
        self.kv = None
        for key in list(self.static_batches):
            self.drop_static_batch(key)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def drop_static_batch(self, key: tuple) -> None:
        # A batch's decode step closes over the batch: breaking that cycle frees the memory now, not whenever
        # Python's garbage collector next runs (the retry after out of memory needs it now).
        self.static_batches.pop(key).run_step = None
        if not any(isinstance(b.run_step, decoder.CudaGraphs) for b in self.static_batches.values()):
            # PyTorch's allocator forgets a graph pool once no graph uses it, and capturing into that pool's id
            # again fails an internal assert: the next capture starts a new pool.
            self.graph_pool = None

    def static_batch(self, key: tuple, rows: int, cache_rows: int, length: int, tokens: int) -> StaticBatch:
        """The kept tensors for batches of this shape, with a KV cache of `cache_rows` rows of at least
        `length` slots; the KV store is (re)allocated when it is too small."""
        if self.kv is None or self.kv.capacity // cache_rows < length:
            self.release_kv()
            capacity = self.kv_capacity() or cache_rows * length
            if capacity < cache_rows * length:
                raise ValueError(f"{cache_rows} rows of {length} slots exceed the KV cache of {capacity} slots")
            self.kv = decoder.KVStore(self.lm, capacity, self.device, self.dtype)
        batch = self.static_batches.pop(key, None)
        if batch is None:
            if len(self.static_batches) >= MAX_BATCH_SHAPES:
                self.drop_static_batch(next(iter(self.static_batches)))  # the least recently used
            device, long = self.device, torch.long
            batch = StaticBatch(
                cache=self.kv.cache(cache_rows),
                pad_lens=torch.zeros(cache_rows, dtype=long, device=device),
                keys=torch.zeros(rows, dtype=torch.int64, device=device),
                out=torch.full((rows, tokens), self.pad_id, dtype=long, device=device),
                done=torch.zeros(rows, dtype=torch.bool, device=device),
                step=torch.zeros((), dtype=long, device=device),
                prompt_len=torch.zeros((), dtype=long, device=device),
            )
        self.static_batches[key] = batch  # the most recently used last
        return batch

    def graphed(self, step: Callable[[int], None]) -> Callable[[int], None]:
        if not self.cuda_graphs:
            return step
        if self.graph_pool is None:
            self.graph_pool = torch.cuda.graph_pool_handle()
        return decoder.CudaGraphs(step, self.graph_pool)

    def prefill(self, embed: Callable[[int, int], torch.Tensor], batch: StaticBatch, prompt_len: int):
        """Every row's prompt through the decoder, PREFILL_TOKENS at a time; the last hidden state of each
        row [rows, hidden]. `embed(start, end)` gives rows [start, end) of the prompt embeddings."""
        rows = len(batch.pad_lens)
        chunk = max(1, PREFILL_TOKENS // prompt_len)
        slots = torch.arange(prompt_len, device=self.device)
        last = []
        for start in range(0, rows, chunk):
            end = min(rows, start + chunk)
            cache = batch.cache.rows(start, end)
            hidden = decoder.forward(self.lm, embed(start, end), slots, batch.pad_lens[start:end], cache, prompt_len)
            last.append(hidden[:, -1])
        return torch.cat(last)

    # ---- image generation ----------------------------------------------------------------------------

    @torch.inference_mode()
    def generate_images(
        self,
        prompts: Sequence[str],
        *,
        prompt_ids: Sequence[str | int] | None = None,
        images_per_prompt: int = 16,
        cfg_weight: float = 5.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        greedy: bool = False,
    ) -> list[GeneratedImage]:
        """`images_per_prompt` images for each prompt, in prompt order. A prompt's id (default: the prompt
        text) keys its random numbers, with the seed and the image index."""
        if images_per_prompt < 1:
            raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        ids = [str(p) for p in (prompt_ids if prompt_ids is not None else prompts)]
        if len(ids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(ids)} prompt_ids")
        for prompt in prompts:
            if (error := self.check_prompt(prompt)) is not None:
                raise ValueError(error)
        tokens = [self.generation_ids(p) for p in prompts]
        rows = [(p, i) for p in range(len(prompts)) for i in range(images_per_prompt)]
        temperature = 0.0 if greedy else temperature

        def run(start: int, end: int) -> list[GeneratedImage]:
            chunk = rows[start:end]
            keys = [sampling.row_key(seed, sampling.id32(ids[p]), i) for p, i in chunk]
            image_tokens = self.generate_image_tokens(
                [tokens[p] for p, _ in chunk], keys, cfg_weight, temperature, top_k, top_p
            )
            pixels = self.decode_image_tokens(image_tokens)
            return [
                GeneratedImage(ids[p], prompts[p], i, seed, toks.astype(np.int32), pix)
                for (p, i), toks, pix in zip(chunk, image_tokens.cpu().numpy(), pixels, strict=True)
            ]

        longest = max(len(t) for t in tokens)
        return self.in_batches(len(rows), 2, longest + self.num_gen_tokens, run)

    @torch.inference_mode()
    def generate_image_tokens(
        self,
        prompt_tokens: list[list[int]],
        keys: list[int],
        cfg_weight: float,
        temperature: float,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> torch.Tensor:
        """One image per row: [rows, num_gen_tokens] VQ token ids. Rows are laid out [cond x R, uncond x R];
        an unconditional row keeps the first token (BOS) and the last (<begin_of_image>), the rest is pad."""
        model, lm = self.model, self.lm
        n = len(prompt_tokens)
        uncond = [[t[0]] + [self.pad_id] * (len(t) - 2) + [t[-1]] for t in prompt_tokens]
        ids, pad_lens = left_pad(prompt_tokens + uncond, self.pad_id, self.device)
        prompt_len = ids.shape[1]
        key = ("image", n, cfg_weight, temperature, top_k, top_p, self.cuda_graphs)
        batch = self.static_batch(key, n, 2 * n, prompt_len + self.num_gen_tokens, self.num_gen_tokens)
        batch.load(pad_lens, keys, prompt_len)
        codes = self.codes[model.config.vq_config.num_embeddings]

        def take(hidden: torch.Tensor) -> None:
            """Token `step` of every row from the last hidden states of its two CFG rows, then step + 1."""
            # The CFG mix in the model's dtype, as DeepSeek's code does (sampling then works in float32): in
            # bf16 the engine's tokens then differ from the reference loop's only by attention rounding (tests).
            logits = model.model.generation_head(hidden)
            cond, uncond_logits = logits[:n], logits[n:]
            mixed = uncond_logits + cfg_weight * (cond - uncond_logits)
            token = sampling.sample(mixed, batch.keys, batch.step, codes, temperature, top_k, top_p)
            batch.out.index_copy_(1, batch.step.view(1), token[:, None])
            batch.step.add_(1)

        def decode_step(kv_len: int) -> None:
            """Feed token `step - 1` of every row, make token `step`. It reads and writes only the batch's kept
            tensors, with no host round trip: captured once as a CUDA graph, it replays for later batches."""
            previous = batch.out.index_select(1, batch.step.view(1) - 1).view(n)
            embeds = model.prepare_embeddings_for_image_generation(previous.repeat(2))[:, None]
            slot = (batch.step + batch.prompt_len - 1).view(1)
            take(decoder.forward(lm, embeds, slot, batch.pad_lens, batch.cache, kv_len)[:, -1])

        take(self.prefill(lambda start, end: lm.embed_tokens(ids[start:end]), batch, prompt_len))
        if batch.run_step is None:
            batch.run_step = self.graphed(decode_step)
        for i in range(1, self.num_gen_tokens):
            batch.run_step(decoder.kv_read_len(prompt_len + i - 1, batch.cache.max_len))
        return batch.out.clone()

    def decode_image_tokens(self, image_tokens: torch.Tensor) -> np.ndarray:
        """VQ-decode [n, num_gen_tokens] tokens to uint8 images [n, H, W, 3].

        Always in chunks of exactly `vq_batch` images (the last one padded): convolution results vary with
        the batch shape in the last bits, so a fixed shape keeps every image independent of its batch."""
        vq = self.model.model.vqmodel
        n = len(image_tokens)
        padded = torch.zeros((-(-n // self.vq_batch) * self.vq_batch, image_tokens.shape[1]), dtype=torch.long)
        padded[:n] = image_tokens
        chunks = [
            pixels_to_uint8(vq.decode(padded[i : i + self.vq_batch].to(self.device)))
            for i in range(0, n, self.vq_batch)
        ]
        return np.concatenate(chunks)[:n]

    # ---- understanding -------------------------------------------------------------------------------

    def prepare_image(self, image: Image.Image | bytes | np.ndarray) -> np.ndarray:
        """Encoded bytes, a PIL image or an already preprocessed array -> uint8 [S, S, 3] (`preprocess_image`)."""
        if isinstance(image, np.ndarray):
            expected = (self.image_size, self.image_size, 3)
            if image.shape != expected or image.dtype != np.uint8:
                raise ValueError(
                    f"a preprocessed image must be uint8 of shape {expected}, got {image.dtype} {image.shape}"
                )
            return image
        pil = to_rgb(image) if isinstance(image, Image.Image) else decode_image(image)
        return preprocess_image(pil, self.image_size, self.preprocessing)

    @torch.inference_mode()
    def understand(
        self,
        images: Sequence[Image.Image | bytes | np.ndarray],
        questions: Sequence[str | None] | None = None,
        *,
        instruction: str = DEFAULT_CAPTION_INSTRUCTION,
        max_new_tokens: int = 128,
        greedy: bool = True,
        temperature: float = 1.0,
        seed: int = 0,
        row_ids: Sequence[str | int] | None = None,
    ) -> list[TextResult]:
        """Caption (question None: `instruction` is asked) or answer a question about each image.
        Sampling (greedy=False) draws from counter-based noise keyed on (seed, row id, step); the row id
        defaults to the row's index in this call."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        questions = list(questions) if questions is not None else [None] * len(images)
        if len(questions) != len(images):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        row_ids = list(row_ids) if row_ids is not None else list(range(len(images)))
        texts = [q if q else instruction for q in questions]
        for text in texts:
            if (error := self.check_question(text, max_new_tokens)) is not None:
                raise ValueError(error)
        prompts = [self.understanding_ids(t) for t in texts]
        pixels = [self.prepare_image(image) for image in images]
        temperature = 0.0 if greedy else temperature

        def run(start: int, end: int) -> list[TextResult]:
            keys = [sampling.row_key(seed, sampling.id32(r), 0) for r in row_ids[start:end]]
            tokens = self.generate_text_tokens(
                prompts[start:end], np.stack(pixels[start:end]), keys, max_new_tokens, temperature
            )
            return [self.finish_text(row) for row in tokens.tolist()]

        longest = max((len(p) for p in prompts), default=0)
        return self.in_batches(len(images), 1, longest + max_new_tokens, run)

    @torch.inference_mode()
    def generate_text_tokens(
        self,
        prompt_tokens: list[list[int]],
        pixels: np.ndarray,
        keys: list[int],
        max_new_tokens: int,
        temperature: float,
    ) -> torch.Tensor:
        """[rows, <= max_new_tokens] generated ids; after a row's EOS the rest of it is pad."""
        model, lm, device = self.model, self.lm, self.device
        n = len(prompt_tokens)
        ids, pad_lens = left_pad(prompt_tokens, self.pad_id, device)
        prompt_len = ids.shape[1]
        key = ("text", n, max_new_tokens, temperature, self.cuda_graphs)
        batch = self.static_batch(key, n, n, prompt_len + max_new_tokens, max_new_tokens)
        batch.load(pad_lens, keys, prompt_len)
        codes = self.codes[model.config.text_config.vocab_size]

        def embed(start: int, end: int) -> torch.Tensor:
            """Prompt embeddings of rows [start, end), the image features in place of the placeholders."""
            pixel_values = normalize(torch.from_numpy(pixels[start:end]).to(device), self.pixel_table).to(self.dtype)
            features = model.model.aligner(model.model.vision_model(pixel_values).last_hidden_state)
            embeds = lm.embed_tokens(ids[start:end])
            image_slots = (ids[start:end] == self.image_token_id)[..., None]
            return embeds.masked_scatter(image_slots, features.to(embeds.dtype))

        def take(hidden: torch.Tensor) -> None:
            """Token `step` of every row (pad once the row has made EOS), then step + 1."""
            token = sampling.sample(model.lm_head(hidden), batch.keys, batch.step, codes, temperature)
            token = token.masked_fill(batch.done, self.pad_id)
            batch.out.index_copy_(1, batch.step.view(1), token[:, None])
            batch.done |= token == self.eos_id
            batch.step.add_(1)

        def decode_step(kv_len: int) -> None:
            """Feed token `step - 1`, make token `step`: kept tensors only, as in image generation."""
            previous = batch.out.index_select(1, batch.step.view(1) - 1)
            slot = (batch.step + batch.prompt_len - 1).view(1)
            take(decoder.forward(lm, lm.embed_tokens(previous), slot, batch.pad_lens, batch.cache, kv_len)[:, -1])

        take(self.prefill(embed, batch, prompt_len))
        if batch.run_step is None:
            batch.run_step = self.graphed(decode_step)
        for i in range(1, max_new_tokens):
            if i % STOP_CHECK_EVERY == 0 and bool(batch.done.all()):
                return batch.out[:, :i].clone()
            batch.run_step(decoder.kv_read_len(prompt_len + i - 1, batch.cache.max_len))
        return batch.out.clone()

    def finish_text(self, row: list[int]) -> TextResult:
        if self.eos_id in row:
            row = row[: row.index(self.eos_id) + 1]
            reason = "eos"
        else:
            reason = "length"
        text = self.tokenizer.decode(row, skip_special_tokens=True).strip()
        return TextResult(text, len(row), reason)
