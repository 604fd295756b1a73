"""Load a Janus model and its processor from a Hugging Face id, a local directory or an s3:// prefix.

    loaded = load_janus("deepseek-community/Janus-Pro-7B")          # HF hub cache (HF_HUB_OFFLINE respected)
    loaded = load_janus("/models/janus-pro-7b", dtype="bf16")       # local directory
    loaded = load_janus("s3://bucket/models/janus-pro-7b", storage_options={"endpoint_url": ...})

The source is made a local directory first (sources.py), whose files are then read (checkpoint.py): Hugging
Face checkpoints (config.json `model_type: "janus"`) load with transformers; DeepSeek's original checkpoints
(`model_type: "multi_modality"`, e.g. deepseek-ai/Janus-Pro-7B) are converted on load (convert.py, which also
converts them once, to disk). Those modules import none of this one: sources <- checkpoint <- convert <- load.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import JanusForConditionalGeneration, JanusProcessor

from janus_batch.model.checkpoint import (
    HF_MODEL_TYPE,
    load_hf,
    read_config,
    resolve_dtype,
    weights_hash,
)
from janus_batch.model.convert import load_original
from janus_batch.model.sources import resolve_source, weight_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedJanus:
    model: JanusForConditionalGeneration  # eval mode, on the requested device and dtype
    processor: JanusProcessor  # with the PIL image processor
    source: str  # as given to load_janus
    model_id: str  # the HF id, or the directory / URI as given (without a trailing slash)
    weights_hash: str  # see checkpoint.py
    local_dir: Path  # where the files were read from


def load_janus(
    source: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
    cache_dir: str | None = None,
    revision: str | None = None,
    storage_options: dict | None = None,
) -> LoadedJanus:
    """Load `source` (HF id, local directory or s3:// prefix) in either checkpoint format.

    `dtype`: torch dtype or name ("bf16", "float32", ...); default bf16 on CUDA, fp32 otherwise.
    `device`: default cuda when available. `cache_dir`: the HF hub cache for HF ids (default: HF_HUB_CACHE /
    HF_HOME), the mirror root for s3:// (default: $JANUS_BATCH_CACHE). `revision`: HF ids only.
    `storage_options`: s3fs options (endpoint_url, key, secret, client_kwargs...); default: AWS chain.
    """
    source = os.fspath(source)
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(dtype, device)
    local_dir = resolve_source(
        source, allow_pickle=allow_pickle, cache_dir=cache_dir, revision=revision, storage_options=storage_options
    )
    config = read_config(local_dir)
    files = weight_files(local_dir, allow_pickle, source)
    digest = weights_hash(files, local_dir)
    if config.get("model_type") == HF_MODEL_TYPE:
        model, processor = load_hf(local_dir, files, dtype)
    else:
        model, processor = load_original(local_dir, config, files, dtype)
    model = model.to(device).eval()
    log.info("loaded %s from %s (%s, %s, weights %s)", source, local_dir, dtype, device, digest)
    return LoadedJanus(model, processor, source, source.rstrip("/"), digest, local_dir)
