"""Model layer: resolve a source (HF id, local directory, s3:// prefix), load Janus and its processor;
convert DeepSeek's original checkpoints (convert.py); build tiny random models for tests (tiny.py)."""

from janus_batch.model.loading import (
    CorruptWeightsError,
    LoadedJanus,
    ModelLoadError,
    ModelNotFoundError,
    PickleWeightsError,
    S3AccessError,
    WrongModelTypeError,
    check_weights,
    load_janus,
)

__all__ = [
    "CorruptWeightsError",
    "LoadedJanus",
    "ModelLoadError",
    "ModelNotFoundError",
    "PickleWeightsError",
    "S3AccessError",
    "WrongModelTypeError",
    "check_weights",
    "load_janus",
]
