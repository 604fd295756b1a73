"""A checkpoint directory's files: config.json, the weight files, the weights hash, the processor and its
preprocessing settings, and the prompt format; a Hugging Face-format directory read into transformers' Janus.

Weights must be safetensors unless `allow_pickle=True` (unpickling can run code from the file); pickle weights
are then read with `torch.load(weights_only=True)`, nothing else.

Prompt format: Janus-Pro and Janus-1.3B name the chat roles differently (see the engine). `prompt_format_of`
tells a checkpoint's format from what it records (`prompt_format` in config.json, written by the converter)
or else from its name: Janus-1.3B's config.json is identical to Janus-Pro-1B's, so nothing else tells them apart.

`weights_hash` fingerprints the weight files without reading them whole: per file its name, size, its
safetensors header (every tensor's name, dtype, shape and offsets) and 64 KiB sampled evenly across it.
It costs a few reads per file, is the same wherever the files come from (hub, S3 mirror, local copy), and
changes with the weights in practice; it is not a cryptographic digest of every byte.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path

import safetensors.torch
import torch
from transformers import JanusForConditionalGeneration, JanusImageProcessorPil, JanusProcessor

from janus_batch.model.sources import (
    PICKLE_PATTERNS,
    ModelLoadError,
    ModelNotFoundError,
    PickleWeightsError,
    pickle_message,
)

log = logging.getLogger(__name__)

HF_MODEL_TYPE = "janus"
ORIGINAL_MODEL_TYPE = "multi_modality"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# Chat-role conventions (the engine holds the roles): Janus-Pro's, and Janus-1.3B's.
PROMPT_FORMATS = ("janus-pro", "janus-1.3b")
DEFAULT_PROMPT_FORMAT = "janus-pro"
_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
_SAMPLES, _SAMPLE_BYTES = 16, 4096


class WrongModelTypeError(ModelLoadError):
    """config.json describes another architecture."""


class CorruptWeightsError(ModelLoadError):
    """A weight file is truncated or not a valid safetensors / torch file."""


@dataclass(frozen=True)
class Preprocessing:
    """A checkpoint's understanding preprocessing settings (its preprocessor_config.json). DeepSeek's file and
    transformers' name them alike; transformers' adds do_rescale. The defaults, used where the file lacks a
    setting, are the published checkpoints' values."""

    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    do_rescale: bool = True  # DeepSeek's processor always rescales
    do_normalize: bool = True  # false in Janus-1.3B's first revision: pixels are then only rescaled
    min_size: int = 14  # the short side after resizing is at least this

    @property
    def background(self) -> tuple[int, ...]:
        """The padding colour as DeepSeek's processor (and transformers') derives it: int(255 x mean) per channel,
        (127, 127, 127) for mean 0.5. Both overwrite with it the background_color that their file lists."""
        return tuple(int(x * 255) for x in self.image_mean)

    @classmethod
    def of(cls, image_processor: JanusImageProcessorPil) -> Preprocessing:
        """The settings an image processor holds."""
        values = {f.name: getattr(image_processor, f.name) for f in fields(cls)}
        return cls(**{**values, "image_mean": tuple(values["image_mean"]), "image_std": tuple(values["image_std"])})


DEFAULT_PREPROCESSING = Preprocessing()


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """`dtype` as a torch dtype: a dtype or a name ("bf16", "float32", ...); None or "auto": bf16 on CUDA, else
    fp32."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = dtype if isinstance(dtype, torch.dtype) else _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if resolved is None or not resolved.is_floating_point:
        raise ValueError(f"unsupported dtype {dtype!r}; use a floating torch.dtype or one of {sorted(_DTYPES)}")
    return resolved


# ---- config and weight files -----------------------------------------------------------------------------


def read_config(local_dir: Path) -> dict:
    """config.json, checked to be a Janus checkpoint in either format."""
    path = local_dir / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(f"no config.json in {local_dir}: not a model checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
    model_type = config.get("model_type")
    if model_type not in (HF_MODEL_TYPE, ORIGINAL_MODEL_TYPE):
        raise WrongModelTypeError(
            f"{path} has model_type {model_type!r} (architectures {config.get('architectures')}); expected "
            f"{HF_MODEL_TYPE!r} (Hugging Face Janus, e.g. deepseek-community/Janus-Pro-7B) or "
            f"{ORIGINAL_MODEL_TYPE!r} (DeepSeek's original Janus, e.g. deepseek-ai/Janus-Pro-7B)"
        )
    return config


def weight_files(local_dir: Path, allow_pickle: bool, source: str | None = None) -> list[Path]:
    """The checkpoint's weight files: safetensors when present, else pickle files if allowed. `source`: how the
    user named the checkpoint, for the error messages (default: `local_dir`)."""
    files = _shards(local_dir, ("*.safetensors",), "model.safetensors.index.json")
    if files:
        return files
    # A pickle index without its shards is what a download without allow_pickle leaves of deepseek-ai/Janus-Pro-7B.
    has_pickle_index = (local_dir / PICKLE_INDEX).is_file()
    has_pickle_files = any(next(local_dir.glob(p), None) for p in PICKLE_PATTERNS)
    if not allow_pickle and (has_pickle_index or has_pickle_files):
        raise PickleWeightsError(pickle_message(source or str(local_dir)))
    pickles = _shards(local_dir, PICKLE_PATTERNS, PICKLE_INDEX) if allow_pickle else []
    if pickles:
        return pickles
    raise ModelNotFoundError(
        f"no weights in {local_dir}: expected *.safetensors files (pickle .bin/.pt files load only with "
        "allow_pickle=True)"
    )


def _shards(local_dir: Path, patterns: tuple[str, ...], index_name: str) -> list[Path]:
    index = local_dir / index_name
    if not index.is_file():
        return sorted({path for p in patterns for path in local_dir.glob(p)})
    names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    missing = [name for name in names if not (local_dir / name).is_file()]
    if missing:
        raise ModelNotFoundError(f"{index} lists weight files that are missing: {missing}")
    return [local_dir / name for name in names]


def prompt_format_of(name: str, recorded: str | None = None) -> tuple[str, str]:
    """(prompt format, how it was told) of the checkpoint `name` (an HF id, directory or s3:// prefix):
    `recorded` (config.json's `prompt_format`) if set, else Janus-1.3B's when the last part of the name
    says Janus-1.3B (deepseek-ai/Janus-1.3B, /models/Janus-1.3B-hf, ...), else Janus-Pro's."""
    if recorded is not None:
        if recorded not in PROMPT_FORMATS:
            raise ModelLoadError(f"config.json has prompt_format {recorded!r}; expected one of {PROMPT_FORMATS}")
        return recorded, "recorded in config.json"
    if "janus-1.3b" in name.rstrip("/").rsplit("/", 1)[-1].lower():
        return "janus-1.3b", f"the name {name!r} says Janus-1.3B"
    return DEFAULT_PROMPT_FORMAT, "the default: the name does not say Janus-1.3B"


def weights_hash(files: list[Path], local_dir: Path) -> str:
    """16 hex digits identifying the weights (see the module docstring); validates safetensors files."""
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.relative_to(local_dir)}\0{size}\0".encode())
        with open(path, "rb") as f:
            if path.suffix == ".safetensors":
                digest.update(_safetensors_header(f, path, size))
            for i in range(_SAMPLES):
                f.seek(max(size - _SAMPLE_BYTES, 0) * i // (_SAMPLES - 1))
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def _safetensors_header(f, path: Path, size: int) -> bytes:
    """The JSON header, after checking that it parses and that the file holds exactly the data it lists
    (a truncated download or a stray file fails here, before any tensor is read)."""
    raw = f.read(8)
    length = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if not 0 < length <= size - 8:
        raise CorruptWeightsError(f"{path} is not a safetensors file: bad header length ({size} bytes on disk)")
    header = f.read(length)
    try:
        tensors = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise CorruptWeightsError(f"{path} is not a safetensors file: unreadable header ({e})") from e
    if 8 + length + end != size:
        raise CorruptWeightsError(
            f"{path} is corrupted: its header lists {8 + length + end} bytes but the file has {size} "
            "(truncated download?)"
        )
    return header


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of `files` on the CPU, in their stored dtype."""
    state_dict: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                part = safetensors.torch.load_file(path)
            else:
                part = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # safetensors, pickle and zip raise many types for damaged files
            raise CorruptWeightsError(f"cannot read weights from {path}: {type(e).__name__}: {e}") from e
        state_dict.update(part)
    return state_dict


def check_loading_info(info: dict, where: Path) -> None:
    """Missing weights would be randomly initialised by transformers: fail instead."""
    if info["missing_keys"] or info["mismatched_keys"]:
        missing, mismatched = sorted(info["missing_keys"]), sorted(info["mismatched_keys"])
        raise ModelLoadError(
            f"weights in {where} do not fit the model its config describes: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(mismatched)} with other shapes (e.g. {mismatched[:3]})"
        )
    if info["unexpected_keys"]:
        log.warning("ignoring %d unexpected weights in %s", len(info["unexpected_keys"]), where)


# ---- Hugging Face format and the processor ---------------------------------------------------------------


def load_hf(
    local_dir: Path, files: list[Path], dtype: torch.dtype
) -> tuple[JanusForConditionalGeneration, JanusProcessor]:
    """Model and processor from a Hugging Face-format directory (`files`: its weight files)."""
    try:
        model, info = JanusForConditionalGeneration.from_pretrained(
            local_dir,
            dtype=dtype,
            use_safetensors=files[0].suffix == ".safetensors",
            weights_only=True,  # pickle weights (allowed by then): tensors only, no code
            output_loading_info=True,
        )
    except Exception as e:  # damaged weights surface as OSError, RuntimeError, pickle errors, even IndexError
        names = ", ".join(path.name for path in files)
        raise CorruptWeightsError(f"cannot load the weights {names} in {local_dir}: {type(e).__name__}: {e}") from e
    check_loading_info(info, local_dir)
    return model, load_processor(local_dir, model.config.vision_config.image_size)


def load_processor(local_dir: Path, image_size: int) -> JanusProcessor:
    """JanusProcessor with the PIL image processor (same preprocessing on every node, no torchvision), set up
    from preprocessor_config.json with the published checkpoints' values for what it lacks."""
    image_processor = build_image_processor(read_preprocessing(local_dir), image_size)
    try:
        return JanusProcessor.from_pretrained(local_dir, image_processor=image_processor)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot load the processor / tokenizer files in {local_dir}: {e}") from e


def read_preprocessing(local_dir: Path) -> Preprocessing:
    """The settings in `local_dir`'s preprocessor_config.json (DeepSeek's, or transformers 4's), else in the
    image_processor section of processor_config.json (where transformers 5 saves them); defaults for the
    settings they lack."""
    path = local_dir / "preprocessor_config.json"
    if not path.is_file():
        path = local_dir / "processor_config.json"
    try:
        settings = json.loads(path.read_text()) if path.is_file() else {}
        if path.name == "processor_config.json":
            settings = settings.get("image_processor", {})
        given = {f.name: settings[f.name] for f in fields(Preprocessing) if f.name in settings}
        for name in ("image_mean", "image_std"):
            if name in given:
                given[name] = tuple(float(x) for x in given[name])
                if len(given[name]) != 3:
                    raise ValueError(f"{name} needs 3 values (R, G, B), got {len(given[name])}")
        return Preprocessing(**given)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{path} is not a usable preprocessor config: {e}") from e


def build_image_processor(preprocessing: Preprocessing, image_size: int) -> JanusImageProcessorPil:
    """transformers' Janus image processor (PIL) with these settings, for `image_size` pixels square."""
    return JanusImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=list(preprocessing.image_mean),
        image_std=list(preprocessing.image_std),
        rescale_factor=preprocessing.rescale_factor,
        do_rescale=preprocessing.do_rescale,
        do_normalize=preprocessing.do_normalize,
        min_size=preprocessing.min_size,
    )
