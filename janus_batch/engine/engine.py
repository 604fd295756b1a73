"""JanusEngine: batched CFG text-to-image synthesis and batched understanding (captioning / VQA).

Pure PyTorch, no Ray: used by the Ray actors, the Serve replicas, notebooks and benchmarks alike.
Prompts are formatted (stripped, with the model family's chat roles) and the CFG rows built exactly as in
DeepSeek's reference code, images preprocessed with the checkpoint's preprocessor settings; many prompts of
different lengths share one batch (left padding, per-row positions and masks); every sampled token comes
from counter-based noise keyed on (seed, prompt id, image index, step), so the random numbers never depend on
batching (nor, on CPU in float32, do the results; in bf16 on a GPU, kernels picked per batch shape may round
differently). The KV cache, the kept batch shapes and the CUDA graphs live in `memory.DecodeMemory`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import torch
from PIL import Image

from janus_batch.engine import decoder, steps
from janus_batch.engine.images import prepare_image, value_table, vq_decode
from janus_batch.engine.memory import DecodeMemory
from janus_batch.engine.prompts import (
    DEFAULT_SYSTEM_PROMPT,
    generation_prompt,
    reserved_tokens,
    resolve_prompt_format,
    text_error,
    understanding_prompt,
)
from janus_batch.engine.sampling import vocab_codes
from janus_batch.model.load import load_janus
from janus_batch.model.preprocessing import Preprocessing
from janus_batch.options import DEFAULT_CAPTION_INSTRUCTION, ImageSampling, TextSampling

# Checked every this many decode steps whether all rows have stopped (the only host sync in the loop).
STOP_CHECK_EVERY = 8


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


class JanusEngine:
    def __init__(
        self,
        model,
        processor,
        *,
        model_id: str = "",
        weights_hash: str = "",
        vq_batch: int = 16,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        prompt_format: str = "auto",
        **memory_settings,
    ):
        """`memory_settings`: how batches use memory (`max_batch_rows`, `kv_cache_tokens`,
        `gpu_memory_utilization`, `cuda_graphs`: see DecodeMemory).
        `vq_batch`: images per VQ decode call.
        `prompt_format`: the chat roles, "janus-pro" or "janus-1.3b" (PROMPT_ROLES); "auto": as the checkpoint
        tells (`prompt_format_of`: recorded in its config, else from its name, `model_id`)."""
        self.model, self.processor = model.eval(), processor
        self.tokenizer = tok = processor.tokenizer
        self.model_id, self.weights_hash = model_id, weights_hash
        self.vq_batch, self.system_prompt = vq_batch, system_prompt
        self.prompt_format = resolve_prompt_format(
            prompt_format, model_id, getattr(model.config, "prompt_format", None)
        )
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.memory = DecodeMemory(model, device=self.device, dtype=self.dtype, vq_batch=vq_batch, **memory_settings)

        config = model.config
        self.lm = model.model.language_model
        self.image_size = config.vision_config.image_size
        self.num_image_tokens = config.vision_config.num_image_tokens  # understanding placeholders
        grid = config.vq_config.num_patches
        self.num_gen_tokens = grid * grid  # generated tokens per image (16x downsampling)
        self.gen_image_size = grid * 2 ** (len(config.vq_config.channel_multiplier) - 1)
        self.max_positions = config.text_config.max_position_embeddings
        self.bos_id, self.eos_id, self.pad_id = tok.convert_tokens_to_ids([tok.bos_token, tok.eos_token, tok.pad_token])
        self.image_token_id = config.image_token_id
        self.reserved_tokens = reserved_tokens(tok, self.prompt_format)  # refused in prompts and questions
        self.preprocessing = Preprocessing.of(processor.image_processor)
        self.pixel_table = torch.from_numpy(value_table(self.preprocessing)).to(self.device)
        self.codes = {
            vocab: vocab_codes(vocab, self.device)
            for vocab in (config.vq_config.num_embeddings, config.text_config.vocab_size)
        }

    @classmethod
    def from_pretrained(cls, source: str, **kwargs) -> JanusEngine:
        """An engine on `load_janus(source, ...)`: the keyword arguments load_janus takes (dtype, device,
        storage_options, allow_pickle, revision: see there) go to it, the others to the engine."""
        load_args = inspect.signature(load_janus).parameters
        loaded = load_janus(source, **{k: v for k, v in kwargs.items() if k in load_args})
        engine_args = {k: v for k, v in kwargs.items() if k not in load_args}
        return cls(
            loaded.model, loaded.processor, model_id=loaded.model_id, weights_hash=loaded.weights_hash, **engine_args
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

    def check_prompt(self, prompt: object) -> str | None:
        """Why `prompt` cannot be used for image generation, or None when it can."""
        if not isinstance(prompt, str):
            return f"prompt must be a string, got {type(prompt).__name__}"
        length = len(self.generation_ids(prompt)) if prompt.strip() else 0
        return text_error(
            "prompt", prompt, self.reserved_tokens, length, self.max_positions, "image tokens", self.num_gen_tokens
        )

    def check_question(self, question: str, max_new_tokens: int) -> str | None:
        """Why `question` (or a caption instruction) cannot be asked, or None when it can."""
        length = len(self.understanding_ids(question)) if question.strip() else 0
        return text_error(
            "question", question, self.reserved_tokens, length, self.max_positions, "new tokens", max_new_tokens
        )

    # ---- image generation ----------------------------------------------------------------------------

    @torch.inference_mode()
    def generate_images(
        self, prompts: Sequence[str], sampling: ImageSampling = ImageSampling(), *, prompt_ids=None
    ) -> list[GeneratedImage]:
        """`sampling.images_per_prompt` images for each prompt, in prompt order. A prompt's id (default: the
        prompt text) keys its random numbers, with the seed and the image index."""
        ids = [str(p) for p in (prompt_ids if prompt_ids is not None else prompts)]
        if len(ids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(ids)} prompt_ids")
        for prompt in prompts:
            if (error := self.check_prompt(prompt)) is not None:
                raise ValueError(error)
        tokens = [self.generation_ids(p) for p in prompts]
        rows = [(p, i) for p in range(len(prompts)) for i in range(sampling.images_per_prompt)]

        def run(start: int, end: int) -> list[GeneratedImage]:
            chunk = rows[start:end]
            keys = [steps.sampling_key(sampling.seed, ids[p], i) for p, i in chunk]
            image_tokens = self.generate_image_tokens([tokens[p] for p, _ in chunk], keys, sampling)
            pixels = self.decode_image_tokens(image_tokens)
            return [
                GeneratedImage(ids[p], prompts[p], i, sampling.seed, toks.astype(np.int32), pix)
                for (p, i), toks, pix in zip(chunk, image_tokens.cpu().numpy(), pixels, strict=True)
            ]

        longest = max(len(t) for t in tokens)
        return self.memory.in_batches(len(rows), 2, longest + self.num_gen_tokens, run)

    @torch.inference_mode()
    def generate_image_tokens(
        self, prompt_tokens: list[list[int]], keys: list[int], sampling: ImageSampling, num_tokens: int | None = None
    ) -> torch.Tensor:
        """One image per row: [rows, num_tokens] VQ token ids, the first `num_tokens` of its num_gen_tokens (all by
        default). Rows are laid out [cond x R, uncond x R]; an unconditional row keeps the first token (BOS) and
        the last (<begin_of_image>), the rest is pad."""
        n, num_tokens = len(prompt_tokens), num_tokens or self.num_gen_tokens
        uncond = [[t[0]] + [self.pad_id] * (len(t) - 2) + [t[-1]] for t in prompt_tokens]
        ids, pad_lens = steps.left_pad(prompt_tokens + uncond, self.pad_id, self.device)
        prompt_len = ids.shape[1]
        mix = (sampling.cfg_weight, sampling.effective_temperature, sampling.top_k, sampling.top_p)
        key = ("image", n, num_tokens, *mix)
        batch = self.memory.static_batch(key, n, 2 * n, prompt_len + num_tokens, num_tokens, self.pad_id)
        batch.load(pad_lens, keys, prompt_len)
        take = partial(steps.take_image_token, self.model, self.codes[self.model.config.vq_config.num_embeddings], *mix)
        take(batch, steps.prefill(self.lm, lambda start, end: self.lm.embed_tokens(ids[start:end]), batch, prompt_len))
        if batch.run_step is None:  # its inputs are the batch's tensors and `mix`, which is part of its key
            batch.run_step = self.memory.graphed(partial(steps.image_decode_step, self.model, take, batch))
        for i in range(1, num_tokens):
            batch.run_step(decoder.kv_read_len(prompt_len + i - 1, batch.cache.max_len))
        return batch.out.clone()

    def decode_image_tokens(self, image_tokens: torch.Tensor) -> np.ndarray:
        """VQ-decode [n, num_gen_tokens] tokens to uint8 images [n, H, W, 3] (`images.vq_decode`)."""
        return vq_decode(self.model.model.vqmodel, image_tokens, self.vq_batch, self.device)

    # ---- understanding -------------------------------------------------------------------------------

    def prepare_image(self, image: Image.Image | bytes | np.ndarray) -> np.ndarray:
        """An input image as the vision tower takes it: uint8 [image_size, image_size, 3] (`images.prepare_image`)."""
        return prepare_image(image, self.image_size, self.preprocessing)

    @torch.inference_mode()
    def understand(
        self,
        images: Sequence[Image.Image | bytes | np.ndarray],
        questions: Sequence[str | None] | None = None,
        sampling: TextSampling = TextSampling(),
        *,
        instruction: str = DEFAULT_CAPTION_INSTRUCTION,
        row_ids: Sequence[str | int] | None = None,
    ) -> list[TextResult]:
        """Caption (question None: `instruction` is asked) or answer a question about each image. Sampling
        (greedy false) draws from counter-based noise keyed on (seed, row id, step); the row id defaults to the
        row's index in this call."""
        questions = list(questions) if questions is not None else [None] * len(images)
        if len(questions) != len(images):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        row_ids = list(row_ids) if row_ids is not None else list(range(len(images)))
        texts = [q if q else instruction for q in questions]
        for text in texts:
            if (error := self.check_question(text, sampling.max_new_tokens)) is not None:
                raise ValueError(error)
        prompts = [self.understanding_ids(t) for t in texts]
        pixels = [self.prepare_image(image) for image in images]

        def run(start: int, end: int) -> list[TextResult]:
            keys = [steps.sampling_key(sampling.seed, r, 0) for r in row_ids[start:end]]
            tokens = self.generate_text_tokens(prompts[start:end], np.stack(pixels[start:end]), keys, sampling)
            return [self.finish_text(row, sampling.ignore_eos) for row in tokens.tolist()]

        longest = max((len(p) for p in prompts), default=0)
        return self.memory.in_batches(len(images), 1, longest + sampling.max_new_tokens, run)

    @torch.inference_mode()
    def generate_text_tokens(
        self, prompt_tokens: list[list[int]], pixels: np.ndarray, keys: list[int], sampling: TextSampling
    ) -> torch.Tensor:
        """[rows, <= max_new_tokens] generated ids; after a row's EOS the rest of it is pad."""
        n, new_tokens = len(prompt_tokens), sampling.max_new_tokens
        ids, pad_lens = steps.left_pad(prompt_tokens, self.pad_id, self.device)
        prompt_len = ids.shape[1]
        temperature = sampling.effective_temperature
        eos_id = -1 if sampling.ignore_eos else self.eos_id
        batch = self.memory.static_batch(
            ("text", n, new_tokens, temperature, eos_id), n, n, prompt_len + new_tokens, new_tokens, self.pad_id
        )
        batch.load(pad_lens, keys, prompt_len)
        codes = self.codes[self.model.config.text_config.vocab_size]
        take = partial(steps.take_text_token, self.model, codes, temperature, eos_id, self.pad_id)
        embed = partial(steps.understanding_embeds, self.model, ids, pixels, self.pixel_table, self.image_token_id)
        take(batch, steps.prefill(self.lm, embed, batch, prompt_len))
        if batch.run_step is None:  # its inputs are the batch's tensors and `take`'s values, part of its key
            batch.run_step = self.memory.graphed(partial(steps.text_decode_step, self.lm, take, batch))
        for i in range(1, new_tokens):
            if i % STOP_CHECK_EVERY == 0 and bool(batch.done.all()):
                return batch.out[:, :i].clone()
            batch.run_step(decoder.kv_read_len(prompt_len + i - 1, batch.cache.max_len))
        return batch.out.clone()

    def finish_text(self, row: list[int], ignore_eos: bool = False) -> TextResult:
        if self.eos_id in row and not ignore_eos:
            row = row[: row.index(self.eos_id) + 1]
            reason = "eos"
        else:
            reason = "length"
        text = self.tokenizer.decode(row, skip_special_tokens=True).strip()
        return TextResult(text, len(row), reason)
