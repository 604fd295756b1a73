"""Random Janus-Pro models at the real dims (1B, 7B), for benchmarks and the memory planner's tests: nothing to
download, any device (the meta device too: shapes without memory). Their tokenizer is the tiny model's, so the
vocabulary is the real size but most ids never occur; the weights are random, so the outputs are noise.
"""

from __future__ import annotations

import torch
from transformers import (
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessorPil,
    JanusProcessor,
    LlamaConfig,
)

from janus_batch.model.tiny import build_tiny_model
from janus_batch.model.tokens import IMAGE

# Janus-Pro LLM dims (DeepSeek's configs): layers, hidden, heads, FFN.
LLM_DIMS = {"1b": (24, 2048, 16, 5632), "7b": (30, 4096, 32, 11008)}
SIZES = ("tiny", *LLM_DIMS)


def janus_pro_config(size: str) -> JanusConfig:
    """transformers' JanusConfig of Janus-Pro-1B or -7B: SigLIP-L/16 at 384 px, VQ-16, the Llama of that size."""
    layers, hidden, heads, ffn = LLM_DIMS[size]
    text = LlamaConfig(
        vocab_size=102400,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=16384,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    vision = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=384, patch_size=16)
    vision.update(projection_dim=hidden, num_image_tokens=576, depth=2)
    vq = dict(embed_dim=8, num_embeddings=16384, projection_dim=hidden, image_token_embed_dim=hidden)
    return JanusConfig(text_config=text.to_dict(), vision_config=vision, vq_config=vq, tie_word_embeddings=False)


def build_random_model(
    size: str, device: torch.device, dtype: torch.dtype, quick: bool = False
) -> tuple[JanusForConditionalGeneration, JanusProcessor]:
    """A random Janus-Pro of `size` ("1b", "7b"), made on `device` in `dtype` (seed 0), with the tiny model's
    tokenizer; or for "tiny" the tiny model (384 px, or 64 px when `quick`)."""
    if size == "tiny":
        model, processor = build_tiny_model(64 if quick else 384)
        return model.to(device, dtype).eval(), processor
    _, tiny = build_tiny_model(64)
    image_processor = JanusImageProcessorPil(
        size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = JanusProcessor(image_processor=image_processor, tokenizer=tiny.tokenizer, num_image_tokens=576)
    config = janus_pro_config(size)
    config.image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in `dtype` directly: a 7B model in fp32 first would need 30 GB
    try:
        with torch.device(device):
            model = JanusForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return model, processor


def weight_bytes(module: torch.nn.Module) -> int:
    """The bytes of `module`'s parameters."""
    return sum(p.numel() * p.element_size() for p in module.parameters())
