"""Deterministic tiny random Janus models in Hugging Face format, for tests, demos and CPU smoke runs.

Same arguments => byte-identical files. Two geometries: 64x64 images (16 image tokens) for fast tests and
384x384 (576 tokens, the real geometry). Weights are random: outputs are noise, but every code path
(tokenizer, SigLIP encoder, aligners, Llama LM, generation head, VQ decoder) is the real one.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessorPil,
    JanusProcessor,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from janus_batch.model.sources import cache_root
from janus_batch.model.tokens import BOI, BOS, EOI, EOS, IMAGE, PAD, SPECIAL_TOKENS

# Janus' tokenizer has the chat roles as single tokens too.
TOKENIZER_SPECIAL_TOKENS = [*SPECIAL_TOKENS, "<|User|>", "<|Assistant|>"]

_CORPUS = [
    "A photo of a red fox sitting in the snow, highly detailed, golden hour.",
    "Describe this image in detail. What is in the picture? How many people are there?",
    "A watercolor painting of a lighthouse on a cliff above a stormy sea.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language.",
    "a cat, a dog, a bird, a tree, a city street at night with neon lights, portrait, landscape",
    # The scorer's answer (janus_batch/engine/scoring.py): " Yes" is then a single token, so the embedded default
    # can curate. (The digits of its rating scale are in every byte-level vocabulary.)
    "Please answer yes or no. Yes",
]

GEOMETRIES = {64: 16, 384: 576}  # image size -> image tokens (16x downsampling)


def build_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline on a few sentences, with Janus' special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TOKENIZER_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        add_bos_token=True,
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI},
    )


def tiny_config(image_size: int, vocab_size: int, bos: int, eos: int, pad: int, image_id: int) -> JanusConfig:
    if image_size not in GEOMETRIES:
        raise ValueError(f"image_size must be one of {sorted(GEOMETRIES)}, got {image_size}")
    hidden = 64
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )
    vision = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=16,
        mlp_ratio=2.0,
        projection_dim=hidden,
        num_image_tokens=GEOMETRIES[image_size],
        depth=2,
    )
    vq = dict(
        embed_dim=8,
        num_embeddings=256,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=[1, 1, 1, 1, 2],  # 5 levels: 2**4 = 16x upsampling, token grid -> pixels
        num_res_blocks=1,
        projection_dim=hidden,
        image_token_embed_dim=hidden,
        num_hidden_layers=2,
    )
    return JanusConfig(
        text_config=text.to_dict(),
        vision_config=vision,
        vq_config=vq,
        image_token_id=image_id,
        tie_word_embeddings=False,
    )


def build_tiny_model(image_size: int = 64, seed: int = 0) -> tuple[JanusForConditionalGeneration, JanusProcessor]:
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = tiny_config(image_size, len(tokenizer), ids[BOS], ids[EOS], ids[PAD], ids[IMAGE])
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).eval()
    # The default init (std 0.02) gives near-uniform logits; real checkpoints are peaked. Larger output
    # heads make sampling tests sensitive to CFG weight and temperature.
    with torch.no_grad():
        model.model.generation_head.vision_head.weight.mul_(60.0)
        model.lm_head.weight.mul_(60.0)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        generation_kwargs={"boi_token_id": ids[BOI]},
        _from_model_config=False,
    )
    image_processor = JanusImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = JanusProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=GEOMETRIES[image_size],
    )
    return model, processor


def write_tiny_model(out_dir: str | Path, image_size: int = 64, seed: int = 0) -> Path:
    """Write a tiny random Janus checkpoint (safetensors + processor) to `out_dir` and return it."""
    out = Path(out_dir)
    model, processor = build_tiny_model(image_size, seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def ensure_tiny_model(image_size: int = 64, seed: int = 0) -> Path:
    """The embedded default model: written once into the cache (atomically, under a lock), then reused."""
    out = cache_root() / f"tiny-janus-{image_size}-seed{seed}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not out.exists():
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp-"))
            write_tiny_model(tmp, image_size, seed)
            tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--image-size", type=int, default=64, choices=sorted(GEOMETRIES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_model(args.out_dir, args.image_size, args.seed))


if __name__ == "__main__":
    main()
