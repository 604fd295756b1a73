"""JanusEngine: batched CFG text-to-image synthesis and batched understanding (captioning / VQA).

Pure PyTorch, no Ray: used by the Ray actors, the Serve replicas, notebooks and benchmarks alike.
Prompts are formatted and the CFG rows built exactly as in DeepSeek's reference code; many prompts of
different lengths share one batch (left padding, per-row positions and masks); every sampled token comes
from counter-based noise keyed on (seed, prompt id, image index, step), so results never depend on batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from janus_batch.engine import decoder, sampling
from janus_batch.engine.images import decode_image, pixels_to_uint8, preprocess_image, to_rgb
from janus_batch.model.loading import load_janus

DEFAULT_CAPTION_INSTRUCTION = "Describe this image in detail."
# DeepSeek's VLChatProcessor system prompt, used for understanding (not for image generation).
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
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


def generation_prompt(prompt: str) -> str:
    """DeepSeek's 'deepseek' conversation template with an empty system prompt, then <begin_of_image>."""
    return f"<|User|>: {prompt}\n\n<|Assistant|>:<begin_of_image>"


def understanding_prompt(question: str, num_image_tokens: int, system_prompt: str) -> str:
    image = "<begin_of_image>" + "<image_placeholder>" * num_image_tokens + "<end_of_image>"
    system = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{system}<|User|>: {image}\n{question}\n\n<|Assistant|>:"


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
        max_batch_rows: int = 64,
        vq_batch: int = 16,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        cuda_graphs: bool = True,
    ):
        """`max_batch_rows`: images (or understanding rows) per forward batch.
        `vq_batch`: images per VQ decode call.
        `cuda_graphs`: on a GPU, replay the image decode step as CUDA graphs (one per KV bucket)."""
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model_id = model_id
        self.weights_hash = weights_hash
        self.max_batch_rows = max_batch_rows
        self.vq_batch = vq_batch
        self.system_prompt = system_prompt
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

    @classmethod
    def from_pretrained(cls, source: str, *, dtype=None, device=None, storage_options=None, **engine_kwargs):
        loaded = load_janus(source, dtype=dtype, device=device, storage_options=storage_options)
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

    def check_prompt(self, prompt: object) -> str | None:
        """Why `prompt` cannot be used for image generation, or None when it can."""
        if not isinstance(prompt, str):
            return f"prompt must be a string, got {type(prompt).__name__}"
        if not prompt.strip():
            return "empty prompt"
        length = len(self.encode(generation_prompt(prompt)))
        if length + self.num_gen_tokens > self.max_positions:
            return (
                f"prompt too long: {length} tokens + {self.num_gen_tokens} image tokens exceeds the "
                f"model's context of {self.max_positions} positions"
            )
        return None

    def check_question(self, question: str, max_new_tokens: int) -> str | None:
        """Why `question` (or a caption instruction) cannot be asked, or None when it can."""
        length = len(self.encode(understanding_prompt(question, self.num_image_tokens, self.system_prompt)))
        if length + max_new_tokens > self.max_positions:
            return (
                f"question too long: {length} prompt tokens + {max_new_tokens} new tokens exceeds the model's "
                f"context of {self.max_positions} positions"
            )
        return None

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
        tokens = [self.encode(generation_prompt(p)) for p in prompts]
        rows = [(p, i) for p in range(len(prompts)) for i in range(images_per_prompt)]
        temperature = 0.0 if greedy else temperature

        results = []
        for start in range(0, len(rows), self.max_batch_rows):
            chunk = rows[start : start + self.max_batch_rows]
            keys = [sampling.row_key(seed, sampling.id32(ids[p]), i) for p, i in chunk]
            image_tokens = self.generate_image_tokens(
                [tokens[p] for p, _ in chunk], keys, cfg_weight, temperature, top_k, top_p
            )
            pixels = self.decode_image_tokens(image_tokens)
            for (p, i), toks, pix in zip(chunk, image_tokens.cpu().numpy(), pixels, strict=True):
                results.append(GeneratedImage(ids[p], prompts[p], i, seed, toks.astype(np.int32), pix))
        return results

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
        model, lm, device = self.model, self.lm, self.device
        n = len(prompt_tokens)
        uncond = [[t[0]] + [self.pad_id] * (len(t) - 2) + [t[-1]] for t in prompt_tokens]
        ids, pad_lens = left_pad(prompt_tokens + uncond, self.pad_id, device)
        prompt_len = ids.shape[1]
        cache = decoder.KVCache.allocate(lm, 2 * n, prompt_len + self.num_gen_tokens, device, self.dtype)
        row_keys = torch.tensor(keys, dtype=torch.int64, device=device)
        codes = sampling.vocab_codes(model.config.vq_config.num_embeddings, device)

        def next_token(hidden: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
            logits = model.model.generation_head(hidden).float()
            cond, uncond_logits = logits[:n], logits[n:]
            mixed = uncond_logits + cfg_weight * (cond - uncond_logits)
            return sampling.sample(mixed, row_keys, step, codes, temperature, top_k, top_p)

        slots = torch.arange(prompt_len, device=device)
        hidden = decoder.forward(lm, lm.embed_tokens(ids), slots, pad_lens, cache, prompt_len)
        out = torch.empty((n, self.num_gen_tokens), dtype=torch.long, device=device)
        step = torch.zeros((), dtype=torch.long, device=device)  # the token being made, on the device
        out[:, 0] = next_token(hidden[:, -1], step)
        step += 1

        def decode_step(kv_len: int) -> None:
            """Token `step` of every row, then step + 1. It reads and writes only tensors made above (and the
            cache), with no host round trip: the same work can be captured once as a CUDA graph and replayed."""
            previous = out.index_select(1, step.view(1) - 1).view(n)
            embeds = model.prepare_embeddings_for_image_generation(previous.repeat(2))[:, None]
            hidden = decoder.forward(lm, embeds, (step + prompt_len - 1).view(1), pad_lens, cache, kv_len)
            out.index_copy_(1, step.view(1), next_token(hidden[:, -1], step)[:, None])
            step.add_(1)

        run_step = decoder.CudaGraphs(decode_step) if self.cuda_graphs else decode_step
        for i in range(1, self.num_gen_tokens):
            run_step(decoder.kv_read_len(prompt_len + i - 1, cache.max_len))
        return out

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
        """Encoded bytes, a PIL image or an already preprocessed array -> float32 [3, S, S] in [-1, 1]."""
        if isinstance(image, np.ndarray):
            expected = (3, self.image_size, self.image_size)
            if image.shape != expected:
                raise ValueError(f"preprocessed image must have shape {expected}, got {image.shape}")
            return image
        pil = to_rgb(image) if isinstance(image, Image.Image) else decode_image(image)
        return preprocess_image(pil, self.image_size)

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
        prompts = [self.encode(understanding_prompt(t, self.num_image_tokens, self.system_prompt)) for t in texts]
        pixels = [self.prepare_image(image) for image in images]
        temperature = 0.0 if greedy else temperature

        results: list[TextResult] = []
        for start in range(0, len(images), self.max_batch_rows):
            end = start + self.max_batch_rows
            keys = [sampling.row_key(seed, sampling.id32(r), 0) for r in row_ids[start:end]]
            tokens = self.generate_text_tokens(
                prompts[start:end], np.stack(pixels[start:end]), keys, max_new_tokens, temperature
            )
            results.extend(self.finish_text(row) for row in tokens.tolist())
        return results

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
        pixel_values = torch.from_numpy(pixels).to(device, self.dtype)
        features = model.model.aligner(model.model.vision_model(pixel_values).last_hidden_state)
        embeds = lm.embed_tokens(ids)
        image_slots = (ids == self.image_token_id)[..., None]
        embeds = embeds.masked_scatter(image_slots, features.to(embeds.dtype))

        cache = decoder.KVCache.allocate(lm, n, prompt_len + max_new_tokens, device, self.dtype)
        row_keys = torch.tensor(keys, dtype=torch.int64, device=device)
        codes = sampling.vocab_codes(model.config.text_config.vocab_size, device)
        out = torch.full((n, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        step = torch.zeros((), dtype=torch.long, device=device)  # the token being made, on the device

        hidden = decoder.forward(lm, embeds, torch.arange(prompt_len, device=device), pad_lens, cache, prompt_len)
        for i in range(max_new_tokens):
            logits = model.lm_head(hidden[:, -1])
            token = sampling.sample(logits, row_keys, step, codes, temperature)
            token = token.masked_fill(done, self.pad_id)
            out[:, i] = token
            done |= token == self.eos_id
            if i + 1 == max_new_tokens or ((i + 1) % STOP_CHECK_EVERY == 0 and bool(done.all())):
                return out[:, : i + 1]
            kv_len = decoder.kv_read_len(prompt_len + i, cache.max_len)
            slots = (step + prompt_len).view(1)
            hidden = decoder.forward(lm, lm.embed_tokens(token[:, None]), slots, pad_lens, cache, kv_len)
            step += 1
        return out

    def finish_text(self, row: list[int]) -> TextResult:
        if self.eos_id in row:
            row = row[: row.index(self.eos_id) + 1]
            reason = "eos"
        else:
            reason = "length"
        text = self.tokenizer.decode(row, skip_special_tokens=True).strip()
        return TextResult(text, len(row), reason)
