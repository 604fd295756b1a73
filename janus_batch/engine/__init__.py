"""The Janus engine: pure PyTorch batched image synthesis and understanding. Never imports Ray."""

from janus_batch.engine.engine import (
    DEFAULT_CAPTION_INSTRUCTION,
    GeneratedImage,
    JanusEngine,
    TextResult,
)
from janus_batch.engine.images import ImageInputError, decode_image, preprocess_image

__all__ = [
    "DEFAULT_CAPTION_INSTRUCTION",
    "GeneratedImage",
    "ImageInputError",
    "JanusEngine",
    "TextResult",
    "decode_image",
    "preprocess_image",
]
