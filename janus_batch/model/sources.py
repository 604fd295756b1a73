"""Model sources: a Hugging Face id, a local directory or an s3:// prefix, resolved to a local directory.

    resolve_source("deepseek-community/Janus-Pro-7B")      # a snapshot in the HF hub cache (HF_HUB_OFFLINE respected)
    resolve_source("/models/janus-pro-7b")                  # the directory itself
    resolve_source("s3://bucket/models/janus-pro-7b", storage_options={"endpoint_url": ...})  # a node-local mirror

Only the files a checkpoint needs are fetched (FILE_PATTERNS; pickle weights only with `allow_pickle`). Before
anything is downloaded the source's file list is checked, so a pickle-only repo or prefix (deepseek-ai/Janus-Pro-7B
and -1B on their main branch) fails at once unless pickle is allowed.

s3:// prefixes are mirrored once per node into `$JANUS_BATCH_CACHE/s3/<bucket>/<prefix>-<hash>` (default
cache root ~/.cache/janus_batch). The hash covers the endpoint and the listing (keys, sizes, ETags), so
changed objects land in a new directory instead of mixing with the old files. One process downloads under a
file lock into a temporary directory that is renamed into place complete; the others wait, then reuse it.

`weight_files` lists a local checkpoint's weight files; `check_weights` fails on a source without usable weights
from its file list alone, for a job's driver (no torch is imported here).
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
from pathlib import Path

from filelock import FileLock
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

log = logging.getLogger(__name__)

PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth")
PICKLE_INDEX = "pytorch_model.bin.index.json"
# Files a checkpoint needs: config, weights, tokenizer and processor settings. Nothing else is fetched.
FILE_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model")
S3_MARKER = ".janus_batch_complete"
# Hugging Face-format copies of the pickle-only deepseek-ai checkpoints, with safetensors weights.
HF_FORMAT_REPOS = ("deepseek-community/Janus-Pro-7B", "deepseek-community/Janus-Pro-1B")
# owner/name, each starting with a letter, digit or _ as the Hub requires: "./x" and "../x" are local paths.
_HF_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")


class ModelLoadError(ValueError):
    """A model source that cannot be loaded; the message says what was found and what is expected."""


class ModelNotFoundError(ModelLoadError):
    """The directory, files, HF id or s3:// prefix does not exist (or is not cached while offline)."""


class PickleWeightsError(ModelLoadError):
    """Only pickle weights were found and `allow_pickle` was not set."""


class S3AccessError(ModelLoadError):
    """S3 refused access (credentials) or could not be reached."""


def cache_root() -> Path:
    """janus-batch's node-local cache: $JANUS_BATCH_CACHE, else ~/.cache/janus_batch."""
    return Path(os.environ.get("JANUS_BATCH_CACHE", Path.home() / ".cache" / "janus_batch"))


def resolve_source(
    source: str,
    *,
    allow_pickle: bool = False,
    cache_dir: str | None = None,
    revision: str | None = None,
    storage_options: dict | None = None,
) -> Path:
    """The local directory holding `source`'s files, downloading them first for HF ids and s3:// prefixes."""
    _check_revision(source, revision)
    if source.startswith("s3://"):
        return fetch_s3(source, allow_pickle=allow_pickle, storage_options=storage_options, cache_dir=cache_dir)
    if _is_hf_id(source):
        return fetch_hf(source, allow_pickle=allow_pickle, cache_dir=cache_dir, revision=revision)
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(f"model directory {source!r} does not exist (or is not a directory)")
    return path


def is_remote(source: str) -> bool:
    """Whether `source` is an s3:// prefix or an HF id (rather than a local directory)."""
    return source.startswith("s3://") or _is_hf_id(source)


def check_listed_weights(
    source: str, *, allow_pickle: bool, revision: str | None = None, storage_options: dict | None = None
) -> None:
    """For a remote source: fail from its file list, downloading nothing, where it has no usable weights (pickle
    only and `allow_pickle` not set), or for an s3:// prefix no config.json at all. An HF id is not checked
    offline: the cache then decides, at load."""
    _check_revision(source, revision)
    if source.startswith("s3://"):
        import s3fs

        _, _, base = _s3_parts(source)
        _check_listing(source, _list_s3(s3fs.S3FileSystem(**(storage_options or {})), source, base), allow_pickle)
        return
    names = None if _hub_offline() else hub_files(source, revision)
    if names is not None:
        check_weights_listed(source, names, allow_pickle)


def check_weights_listed(source: str, names: list[str], allow_pickle: bool) -> None:
    """Fail before downloading when the files `names` of `source` hold only pickle weights and pickle is not
    allowed."""
    names = [Path(name).name for name in names]
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    has_pickle = any(fnmatch.fnmatch(n, p) for n in names for p in PICKLE_PATTERNS)
    if not has_safetensors and has_pickle and not allow_pickle:
        raise PickleWeightsError(pickle_message(source))


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


def _check_revision(source: str, revision: str | None) -> None:
    if revision is not None and not _is_hf_id(source):
        raise ValueError(f"revision={revision!r} applies to Hugging Face ids only, not to {source!r}")


def _is_hf_id(source: str) -> bool:
    # A path that exists locally wins over an HF id of the same shape ("models/janus").
    return bool(_HF_ID.fullmatch(source)) and not Path(source).expanduser().exists()


def _wanted(name: str, allow_pickle: bool) -> bool:
    patterns = FILE_PATTERNS + (PICKLE_PATTERNS if allow_pickle else ())
    return any(fnmatch.fnmatch(Path(name).name, p) for p in patterns)


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE, read at each call (see fetch_hf)."""
    flags = (os.environ.get(name, "").strip().lower() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(flag in ("1", "true", "yes", "on") for flag in flags)


# ---- Hugging Face Hub ------------------------------------------------------------------------------------


def fetch_hf(repo_id: str, *, allow_pickle: bool, cache_dir: str | None, revision: str | None) -> Path:
    """Snapshot of `repo_id` in the standard HF cache. The environment is read now, not at import, so a
    Ray runtime_env or a test can set HF_HUB_OFFLINE / HF_HUB_CACHE / HF_HOME late."""
    offline = _hub_offline()
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
    except HFValidationError as e:  # "org/name--x", "org/x..y": the shape of an id, but not a valid one
        raise ModelNotFoundError(f"{repo_id!r} is not a local directory, nor a valid Hugging Face id: {e}") from e
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


# ---- S3 --------------------------------------------------------------------------------------------------


def fetch_s3(uri: str, *, allow_pickle: bool, storage_options: dict | None, cache_dir: str | None = None) -> Path:
    """Mirror the files under `uri` into the node-local cache once, and return the mirror."""
    import s3fs  # only s3:// sources need it

    options = dict(storage_options or {})
    fs = s3fs.S3FileSystem(**options)
    bucket, prefix, base = _s3_parts(uri)
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


def _s3_parts(uri: str) -> tuple[str, str, str]:
    """(bucket, prefix, the listing base "bucket/prefix/") of an s3:// URI."""
    bucket, _, prefix = uri.removeprefix("s3://").strip("/").partition("/")
    return bucket, prefix, f"{bucket}/{prefix}/" if prefix else f"{bucket}/"


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


def _download(fs, files: dict[str, Path], uri: str) -> None:
    for local in files.values():
        local.parent.mkdir(parents=True, exist_ok=True)
    try:
        fs.get(list(files), [str(p) for p in files.values()])
    except PermissionError as e:
        raise S3AccessError(f"access to {uri} denied while downloading: {e}") from e
    except OSError as e:
        raise S3AccessError(f"downloading {uri} failed: {type(e).__name__}: {e}") from e


# ---- weight files: which a checkpoint has, checked before any model loads -------------------------------------


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
    if is_remote(source):
        check_listed_weights(source, allow_pickle=allow_pickle, revision=revision, storage_options=storage_options)
    else:
        weight_files(resolve_source(source, revision=revision), allow_pickle, source)
