"""The Janus engine: pure PyTorch batched image synthesis and understanding. Never imports Ray."""

from janus_batch.engine.engine import GeneratedImage, JanusEngine, TextResult
from janus_batch.engine.images import ImageInputError, decode_image, preprocess_image
from janus_batch.engine.memory import memory_share
from janus_batch.engine.options import DEFAULT_CAPTION_INSTRUCTION, ImageSampling, TextSampling
from janus_batch.engine.scoring import ImageScore, ScoreOptions, Scorer

__all__ = [
    "DEFAULT_CAPTION_INSTRUCTION",
    "GeneratedImage",
    "ImageInputError",
    "ImageScore",
    "ImageSampling",
    "JanusEngine",
    "ScoreOptions",
    "Scorer",
    "TextResult",
    "TextSampling",
    "decode_image",
    "memory_share",
    "preprocess_image",
]
