"""Model layer: resolve a source to a local directory (sources.py), read its checkpoint files (checkpoint.py),
convert DeepSeek's original checkpoints (convert.py), and load Janus and its processor (load.py); Janus' special
tokens (tokens.py); random models for tests and benchmarks: tiny (tiny.py) and at the real dims (random_init.py).
The rest of janus-batch imports the names below from here."""

from janus_batch.model.checkpoint import (
    DEFAULT_PREPROCESSING,
    DEFAULT_PROMPT_FORMAT,
    CorruptWeightsError,
    Preprocessing,
    WrongModelTypeError,
    prompt_format_of,
)
from janus_batch.model.load import LoadedJanus, check_weights, load_janus
from janus_batch.model.sources import ModelLoadError, ModelNotFoundError, PickleWeightsError, S3AccessError
from janus_batch.model.tokens import BOI, BOS, EOI, EOS, IMAGE, PAD

__all__ = [
    "BOI",
    "BOS",
    "DEFAULT_PREPROCESSING",
    "DEFAULT_PROMPT_FORMAT",
    "EOI",
    "EOS",
    "IMAGE",
    "PAD",
    "CorruptWeightsError",
    "LoadedJanus",
    "ModelLoadError",
    "ModelNotFoundError",
    "PickleWeightsError",
    "Preprocessing",
    "S3AccessError",
    "WrongModelTypeError",
    "check_weights",
    "load_janus",
    "prompt_format_of",
]
