"""Load a Janus model and its processor from a Hugging Face id, a local directory or an s3:// prefix.

    loaded = load_janus("deepseek-community/Janus-Pro-7B")          # HF hub cache (HF_HUB_OFFLINE respected)
    loaded = load_janus("/models/janus-pro-7b", dtype="bf16")       # local directory
    loaded = load_janus("s3://bucket/models/janus-pro-7b", storage_options={"endpoint_url": ...})

Formats: Hugging Face checkpoints (config.json `model_type: "janus"`) load with transformers;
DeepSeek's original checkpoints (`model_type: "multi_modality"`, e.g. deepseek-ai/Janus-Pro-7B) are
converted on load (see convert.py, which also converts them once, to disk). Weights must be safetensors
unless `allow_pickle=True` (unpickling can run code from the file); pickle weights are then read with
`torch.load(weights_only=True)`, nothing else. For an HF id the repo's file list is checked first, so a
pickle-only repo (deepseek-ai/Janus-Pro-7B and -1B on their main branch) fails before any download.

Prompt format: Janus-Pro and Janus-1.3B name the chat roles differently (see the engine). `prompt_format_of`
tells a checkpoint's format from what it records (`prompt_format` in config.json, written by the converter)
or else from its name: Janus-1.3B's config.json is identical to Janus-Pro-1B's, so nothing else tells them apart.

s3:// prefixes are mirrored once per node into `$JANUS_BATCH_CACHE/s3/<bucket>/<prefix>-<hash>` (default
cache root ~/.cache/janus_batch). The hash covers the endpoint and the listing (keys, sizes, ETags), so
changed objects land in a new directory instead of mixing with the old files. One process downloads under a
file lock into a temporary directory that is renamed into place complete; the others wait, then reuse it.

`weights_hash` fingerprints the weight files without reading them whole: per file its name, size, its
safetensors header (every tensor's name, dtype, shape and offsets) and 64 KiB sampled evenly across it.
It costs a few reads per file, is the same wherever the files come from (hub, S3 mirror, local copy), and
changes with the weights in practice; it is not a cryptographic digest of every byte.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import safetensors.torch
import torch
from filelock import FileLock
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from transformers import JanusForConditionalGeneration, JanusImageProcessorPil, JanusProcessor

from janus_batch.model.tiny import cache_root

log = logging.getLogger(__name__)

HF_MODEL_TYPE = "janus"
ORIGINAL_MODEL_TYPE = "multi_modality"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth")
# Files a checkpoint needs: config, weights, tokenizer and processor settings. Nothing else is fetched.
FILE_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model")
S3_MARKER = ".janus_batch_complete"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# Chat-role conventions (the engine holds the roles): Janus-Pro's, and Janus-1.3B's.
PROMPT_FORMATS = ("janus-pro", "janus-1.3b")
DEFAULT_PROMPT_FORMAT = "janus-pro"
# Hugging Face-format copies of the pickle-only deepseek-ai checkpoints, with safetensors weights.
HF_FORMAT_REPOS = ("deepseek-community/Janus-Pro-7B", "deepseek-community/Janus-Pro-1B")
_HF_ID = re.compile(r"[\w.-]+/[\w.-]+")
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


class ModelLoadError(ValueError):
    """A model source that cannot be loaded; the message says what was found and what is expected."""


class ModelNotFoundError(ModelLoadError):
    """The directory, files, HF id or s3:// prefix does not exist (or is not cached while offline)."""


class WrongModelTypeError(ModelLoadError):
    """config.json describes another architecture."""


class CorruptWeightsError(ModelLoadError):
    """A weight file is truncated or not a valid safetensors / torch file."""


class PickleWeightsError(ModelLoadError):
    """Only pickle weights were found and `allow_pickle` was not set."""


class S3AccessError(ModelLoadError):
    """S3 refused access (credentials) or could not be reached."""


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


@dataclass(frozen=True)
class LoadedJanus:
    model: JanusForConditionalGeneration  # eval mode, on the requested device and dtype
    processor: JanusProcessor  # with the PIL image processor
    source: str  # as given to load_janus
    model_id: str  # the HF id, or the directory / URI as given (without a trailing slash)
    weights_hash: str  # see the module docstring
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
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device)
    local_dir = resolve_source(
        source, allow_pickle=allow_pickle, cache_dir=cache_dir, revision=revision, storage_options=storage_options
    )
    config = read_config(local_dir)
    files = weight_files(local_dir, allow_pickle, source)
    digest = weights_hash(files, local_dir)
    if config.get("model_type") == HF_MODEL_TYPE:
        model, processor = _load_hf(local_dir, files, dtype)
    else:
        from janus_batch.model.convert import load_original  # convert.py imports this module

        model, processor = load_original(local_dir, config, files, dtype)
    model = model.to(device).eval()
    log.info("loaded %s from %s (%s, %s, weights %s)", source, local_dir, dtype, device, digest)
    return LoadedJanus(model, processor, source, source.rstrip("/"), digest, local_dir)


def check_weights(
    source: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    revision: str | None = None,
    storage_options: dict | None = None,
) -> None:
    """Fail as `load_janus` would on a checkpoint without usable weights (pickle only and `allow_pickle` not set;
    none at all), from its file list alone: nothing is downloaded. For a driver, before any model loads. An HF
    id is checked from the Hub's list (not at all offline: the cache then decides, at load)."""
    source = os.fspath(source)
    if revision is not None and not _is_hf_id(source):
        raise ValueError(f"revision={revision!r} applies to Hugging Face ids only, not to {source!r}")
    if source.startswith("s3://"):
        import s3fs

        bucket, _, prefix = source.removeprefix("s3://").strip("/").partition("/")
        base = f"{bucket}/{prefix}/" if prefix else f"{bucket}/"
        _check_listing(source, _list_s3(s3fs.S3FileSystem(**(storage_options or {})), source, base), allow_pickle)
    elif _is_hf_id(source):
        offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")
        names = None if offline else hub_files(source, revision)
        if names is not None:
            check_weights_listed(source, names, allow_pickle)
    else:
        weight_files(resolve_source(source), allow_pickle, source)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = dtype if isinstance(dtype, torch.dtype) else _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if resolved is None or not resolved.is_floating_point:
        raise ValueError(f"unsupported dtype {dtype!r}; use a floating torch.dtype or one of {sorted(_DTYPES)}")
    return resolved


# ---- sources ---------------------------------------------------------------------------------------------


def resolve_source(
    source: str,
    *,
    allow_pickle: bool = False,
    cache_dir: str | None = None,
    revision: str | None = None,
    storage_options: dict | None = None,
) -> Path:
    """The local directory holding `source`'s files, downloading them first for HF ids and s3:// prefixes."""
    if revision is not None and not _is_hf_id(source):
        raise ValueError(f"revision={revision!r} applies to Hugging Face ids only, not to {source!r}")
    if source.startswith("s3://"):
        return fetch_s3(source, allow_pickle=allow_pickle, storage_options=storage_options, cache_dir=cache_dir)
    if _is_hf_id(source):
        return fetch_hf(source, allow_pickle=allow_pickle, cache_dir=cache_dir, revision=revision)
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(f"model directory {source!r} does not exist (or is not a directory)")
    return path


def _is_hf_id(source: str) -> bool:
    # A path that exists locally wins over an HF id of the same shape ("models/janus").
    return bool(_HF_ID.fullmatch(source)) and not Path(source).expanduser().exists()


def _wanted(name: str, allow_pickle: bool) -> bool:
    patterns = FILE_PATTERNS + (PICKLE_PATTERNS if allow_pickle else ())
    return any(fnmatch.fnmatch(Path(name).name, p) for p in patterns)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def fetch_hf(repo_id: str, *, allow_pickle: bool, cache_dir: str | None, revision: str | None) -> Path:
    """Snapshot of `repo_id` in the standard HF cache. The environment is read now, not at import, so a
    Ray runtime_env or a test can set HF_HUB_OFFLINE / HF_HUB_CACHE / HF_HOME late."""
    offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")
    if cache_dir is None and os.environ.get("HF_HUB_CACHE"):
        cache_dir = os.environ["HF_HUB_CACHE"]
    elif cache_dir is None and os.environ.get("HF_HOME"):
        cache_dir = os.path.join(os.environ["HF_HOME"], "hub")
    patterns = list(FILE_PATTERNS + (PICKLE_PATTERNS if allow_pickle else ()))
    where = f"{repo_id!r} (revision {revision or 'main'})"
    try:
        names = None if offline else hub_files(repo_id, revision)
        if names is not None:
            check_weights_listed(repo_id, names, allow_pickle)  # before downloading anything
        path = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=offline, allow_patterns=patterns
        )
    except RevisionNotFoundError as e:
        raise ModelNotFoundError(f"{where}: the Hugging Face Hub has no such revision") from e
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if offline else f"the Hub could not be reached ({e})"
        raise ModelNotFoundError(
            f"{where} is not in the Hugging Face cache {cache_dir or '(default)'} and {why}; "
            "no local directory of that name exists either"
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(
            f"{where} does not exist on the Hugging Face Hub (or needs a token), nor as a local directory"
        ) from e
    except HfHubHTTPError as e:
        raise ModelLoadError(f"cannot download {where}: {e}") from e
    return Path(path)


def hub_files(repo_id: str, revision: str | None) -> list[str] | None:
    """The names of the files in a Hub repo, or None when the Hub cannot be reached (the cache then decides).
    Missing repos and revisions raise as snapshot_download would."""
    try:
        return HfApi().list_repo_files(repo_id, revision=revision)
    except HfHubHTTPError as e:
        if isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError)):
            raise
        return None
    except Exception:  # no connection: the network libraries' errors, or offline mode
        return None


def fetch_s3(uri: str, *, allow_pickle: bool, storage_options: dict | None, cache_dir: str | None = None) -> Path:
    """Mirror the files under `uri` into the node-local cache once, and return the mirror."""
    import s3fs  # only s3:// sources need it

    options = dict(storage_options or {})
    fs = s3fs.S3FileSystem(**options)
    bucket, _, prefix = uri.removeprefix("s3://").strip("/").partition("/")
    base = f"{bucket}/{prefix}/" if prefix else f"{bucket}/"
    listing = _list_s3(fs, uri, base)
    _check_listing(uri, listing, allow_pickle)
    listing = {name: meta for name, meta in listing.items() if _wanted(name, allow_pickle)}

    endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
    key = json.dumps([endpoint, bucket, prefix, sorted(listing.items())])
    root = Path(cache_dir) if cache_dir else cache_root() / "s3"
    dest = root / bucket / f"{prefix or '_'}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if (dest / S3_MARKER).exists():
            return dest
        # Holding the lock, anything left here is from a crashed download.
        for stale in [dest, *dest.parent.glob(dest.name + ".tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".tmp-"))
        try:
            log.info("downloading %d files from %s to %s", len(listing), uri, dest)
            _download(fs, {base + name: tmp / name for name in listing}, uri)
            for name, (size, _) in listing.items():
                if (tmp / name).stat().st_size != size:
                    raise ModelLoadError(f"{uri}/{name} changed while downloading; retry")
            (tmp / S3_MARKER).write_text(json.dumps({"uri": uri, "files": listing}))
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _list_s3(fs, uri: str, base: str) -> dict[str, tuple[int, str]]:
    """{path relative to `base`: (size, ETag)} for every object under `uri`."""
    try:
        fs.invalidate_cache(base)  # s3fs caches listings per instance; objects may have changed
        found = fs.find(base, detail=True)
    except FileNotFoundError as e:
        raise ModelNotFoundError(f"cannot list {uri}: the bucket does not exist ({e})") from e
    except PermissionError as e:
        raise S3AccessError(
            f"access to {uri} denied: {e}; check the credentials (storage_options, or the AWS environment / profile)"
        ) from e
    except Exception as e:  # network, endpoint or botocore errors: say which and where
        raise S3AccessError(f"cannot list {uri}: {type(e).__name__}: {e}") from e
    return {path.removeprefix(base): (info["size"], info.get("ETag", "")) for path, info in found.items()}


def _check_listing(uri: str, listing: dict, allow_pickle: bool) -> None:
    if not listing:
        raise ModelNotFoundError(f"no objects under {uri}: the prefix does not exist or is empty")
    if "config.json" not in listing:
        raise ModelNotFoundError(f"no config.json under {uri} (found {sorted(listing)[:10]})")
    check_weights_listed(uri, list(listing), allow_pickle)


def check_weights_listed(source: str, names: list[str], allow_pickle: bool) -> None:
    """Fail before downloading when the files `names` of `source` hold only pickle weights and pickle is not
    allowed."""
    names = [Path(name).name for name in names]
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    has_pickle = any(fnmatch.fnmatch(n, p) for n in names for p in PICKLE_PATTERNS)
    if not has_safetensors and has_pickle and not allow_pickle:
        raise PickleWeightsError(pickle_message(source))


def _download(fs, files: dict[str, Path], uri: str) -> None:
    for local in files.values():
        local.parent.mkdir(parents=True, exist_ok=True)
    try:
        fs.get(list(files), [str(p) for p in files.values()])
    except PermissionError as e:
        raise S3AccessError(f"access to {uri} denied while downloading: {e}") from e
    except OSError as e:
        raise S3AccessError(f"downloading {uri} failed: {type(e).__name__}: {e}") from e


# ---- files -----------------------------------------------------------------------------------------------


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


def pickle_message(source: str) -> str:
    """Why a pickle-only checkpoint is refused, and the three ways out."""
    return (
        f"{source} has only pickle weights (pytorch_model*.bin / .pt), and unpickling can run code from the file. "
        "Either (1) allow pickle if you trust the source: --allow-pickle (jobs, demo), model.allow_pickle (job "
        "spec), allow_pickle=true (Serve), allow_pickle=True (Python); the weights are then read with "
        "torch.load(weights_only=True); or (2) use a Hugging Face-format copy with safetensors weights: "
        f"{' or '.join(HF_FORMAT_REPOS)}; or (3) convert it once to safetensors, "
        f"`python -m janus_batch.model.convert {source} DIR --allow-pickle`, and load DIR (or an s3:// copy "
        "of it) from then on, without the opt-in"
    )


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


# ---- Hugging Face format ---------------------------------------------------------------------------------


def _load_hf(
    local_dir: Path, files: list[Path], dtype: torch.dtype
) -> tuple[JanusForConditionalGeneration, JanusProcessor]:
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
