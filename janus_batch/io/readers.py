"""Inputs: Parquet (local or s3://) and image folders, read as streaming Ray Datasets.

Parquet rows are keyed by Ray Data's `row_hash` (a hash of the file path and the row's position), image
folder rows by their `path`: both exist in every input row whatever the user's columns hold (null or
duplicate ids included), which is what Ray Data's checkpointing needs to skip finished rows on a rerun.
Checks that can fail a job (path missing, credentials refused, columns absent) run on the driver first.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.context import ShuffleStrategy

from janus_batch.io.schemas import ROW_HASH
from janus_batch.io.storage import StorageConfig, fs_path

IMAGE_EXTENSIONS = ["png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"]


def list_input_files(path: str, storage: StorageConfig, extensions: list[str]) -> list[str]:
    """The input files under `path` (a file or a folder), raising a clear error when there are none."""
    fs = storage.filesystem(path)
    try:
        info = fs.get_file_info(fs_path(path))
        is_dir = info.type == pafs.FileType.Directory
        infos = fs.get_file_info(pafs.FileSelector(fs_path(path), recursive=True)) if is_dir else []
    except OSError as e:  # pyarrow reports S3 access and credential errors as OSError
        raise OSError(f"cannot read input {path}: {e}") from None
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input path does not exist: {path}")

    def wanted(file: str) -> bool:  # Ray Data's readers take only these extensions
        return file.rsplit(".", 1)[-1].lower() in extensions

    if info.type == pafs.FileType.File:
        if not wanted(info.path):
            raise ValueError(f"input {path} is not a {'/'.join(extensions)} file (by its extension)")
        return [info.path]
    files = [i.path for i in infos if i.type == pafs.FileType.File and wanted(i.path)]
    if not files:
        raise FileNotFoundError(f"no {'/'.join(extensions)} files under {path}")
    return sorted(files)


def parquet_schema(path: str, storage: StorageConfig) -> pa.Schema:
    """Schema of the first Parquet file under `path` (Ray Data requires them all to agree)."""
    first = list_input_files(path, storage, ["parquet"])[0]
    return pq.read_schema(first, filesystem=storage.filesystem(path))


def require_columns(schema: pa.Schema, columns: dict[str, str | None], path: str) -> None:
    """`columns`: role -> column name (None: not used). Raises naming every missing column at once."""
    missing = [f"{role} column {name!r}" for role, name in columns.items() if name and name not in schema.names]
    if missing:
        raise ValueError(f"input {path} has no {', no '.join(missing)}; its columns are {schema.names}")


def read_parquet(path: str, storage: StorageConfig, columns: list[str], num_cpus: float) -> ray.data.Dataset:
    ds = ray.data.read_parquet(path, filesystem=storage.filesystem(path), include_row_hash=True, num_cpus=num_cpus)
    return ds.select_columns([*dict.fromkeys(columns), ROW_HASH])


def read_image_folder(path: str, storage: StorageConfig, num_cpus: float) -> ray.data.Dataset:
    """Raw bytes (column `bytes`) and `path` of every image file: decoding happens per row downstream,
    so a corrupt file becomes an error row instead of failing the read."""
    return ray.data.read_binary_files(
        path,
        filesystem=storage.filesystem(path),
        include_paths=True,
        file_extensions=IMAGE_EXTENSIONS,
        num_cpus=num_cpus,
    )


def duplicate_ids(ds: ray.data.Dataset, column: str) -> set:
    """Values of `column` held by more than one row (a distributed count over that column only)."""

    def keep_duplicates(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.greater(batch["count()"], 1))

    ids = ds.select_columns([column])
    # Sort-based shuffle: tasks only. The default hash shuffle starts aggregator actors, ~5 s before the
    # first row on a small cluster, which dominates this one-column pass.
    ids.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    counts = ids.groupby(column).count()
    dups = counts.map_batches(keep_duplicates, batch_format="pyarrow", batch_size=None).take_all()
    return {row[column] for row in dups if row[column] is not None}


def row_key(resume_value: int | str) -> str:
    """A short, file-name-safe, deterministic key for an input row from its resume key."""
    if isinstance(resume_value, (int, np.integer)):
        return f"{int(resume_value):016x}"
    return hashlib.sha1(str(resume_value).encode()).hexdigest()[:16]
