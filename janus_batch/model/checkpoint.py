"""A checkpoint directory's files: config.json, the weight files, the weights hash, the processor and its
preprocessing settings (model/preprocessing.py); a Hugging Face-format directory read into transformers' Janus.

Weights must be safetensors unless `allow_pickle=True` (unpickling can run code from the file); pickle weights
are then read with `torch.load(weights_only=True)`, nothing else.

`weights_hash` fingerprints the weight files without reading them whole: per file its name, size, its
safetensors header (every tensor's name, dtype, shape and offsets) and 64 KiB sampled evenly across it.
It costs a few reads per file, is the same wherever the files come from (hub, S3 mirror, local copy), and
changes with the weights in practice; it is not a cryptographic digest of every byte.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import fields
from pathlib import Path

import safetensors.torch
import torch
from transformers import JanusForConditionalGeneration, JanusImageProcessorPil, JanusProcessor

from janus_batch.model.preprocessing import Preprocessing
from janus_batch.model.sources import (
    ModelLoadError,
    ModelNotFoundError,
)

log = logging.getLogger(__name__)

HF_MODEL_TYPE = "janus"
ORIGINAL_MODEL_TYPE = "multi_modality"
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
