"""Inputs: Parquet (local or s3://) and image folders, read as streaming Ray Datasets.

Parquet rows are keyed by Ray Data's `row_hash` (a hash of the file path and the row's position), image
folder rows by their `path`: both exist in every input row whatever the user's columns hold (null or
duplicate ids included), which is what Ray Data's checkpointing needs to skip finished rows on a rerun.
Checks that can fail a job (path missing, credentials refused, columns absent) run on the driver first.
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor

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
# Ray Data's file listing skips files whose path below the input folder starts with one of these (`.hidden.png`,
# `_SUCCESS`, `.cache/x.png`; not `sub/.x.png`): ray/data/datasource/file_meta_provider.py, _expand_directory.
# Counting a file Ray skips would make a run that never finishes.
HIDDEN_PREFIXES = (".", "_")
SCHEMA_READERS = 16  # Parquet footers read in parallel on the driver


def list_input_files(path: str, storage: StorageConfig, extensions: list[str]) -> list[str]:
    """The input files under `path` (a file or a folder) that Ray Data reads, sorted, raising a clear error when
    there are none."""
    fs = storage.filesystem(path)
    root = fs_path(path)
    try:
        info = fs.get_file_info(root)
        is_dir = info.type == pafs.FileType.Directory
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True)) if is_dir else []
    except OSError as e:  # pyarrow reports S3 access and credential errors as OSError
        raise OSError(f"cannot read input {path}: {e}") from None
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input path does not exist: {path}")

    def wanted(file: str) -> bool:  # as Ray Data's extension filter: a query part ("?versionId=...") is not the name
        return file.split("?", 1)[0].lower().endswith(tuple(f".{e}" for e in extensions))

    if info.type == pafs.FileType.File:
        if not wanted(info.path):
            raise ValueError(f"input {path} is not a {'/'.join(extensions)} file (by its extension)")
        return [info.path]
    files = [
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and wanted(i.path)
        and not i.path[len(root) :].lstrip("/").startswith(HIDDEN_PREFIXES)
    ]
    if not files:
        raise FileNotFoundError(f"no {'/'.join(extensions)} files under {path} (hidden files, .* and _*, not counted)")
    return sorted(files)


def parquet_schema(path: str, storage: StorageConfig) -> pa.Schema:
    """The schema of the Parquet files under `path`. Ray Data reads a folder as one table, so every file's footer
    is read here: a file that is not Parquet, or whose columns differ from the first file's, refuses the job
    before any model loads, naming the file (Ray's read would fail later with an Arrow error that names none)."""
    files = list_input_files(path, storage, ["parquet"])
    fs = storage.filesystem(path)

    def read_schema(file: str) -> pa.Schema:
        try:
            return pq.read_schema(file, filesystem=fs)
        except pa.ArrowInvalid as e:  # no Parquet footer: another format, truncated or empty
            raise ValueError(f"input file {file} is not a Parquet file: {e}") from None
        except OSError as e:
            raise OSError(f"cannot read input file {file}: {e}") from None

    with ThreadPoolExecutor(SCHEMA_READERS) as pool:
        schemas = list(pool.map(read_schema, files))
    first = schemas[0]
    for file, schema in zip(files[1:], schemas[1:], strict=True):
        if difference := schema_difference(first, schema):
            raise ValueError(
                f"input files {files[0]} and {file} have different columns ({difference}): all Parquet files of an "
                "input are read as one table"
            )
    return without_dictionaries(first)


def without_dictionaries(schema: pa.Schema) -> pa.Schema:
    """`schema` with dictionary-encoded columns (a pandas category saved to Parquet) as their values' type: ids
    and texts are grouped and compared by value, which Arrow does not do on dictionaries."""
    fields = [f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in schema]
    return pa.schema(fields, metadata=schema.metadata)


def decode_dictionaries(batch: pa.Table) -> pa.Table:
    if not any(pa.types.is_dictionary(f.type) for f in batch.schema):  # the usual input: nothing to cast
        return batch
    return batch.cast(without_dictionaries(batch.schema))


def schema_difference(a: pa.Schema, b: pa.Schema) -> str:
    """What differs between two schemas' column names and types ('' if nothing), as 'first / second'."""
    types_a = {f.name: f.type for f in a}
    types_b = {f.name: f.type for f in b}
    differences = []
    for name in dict.fromkeys([*a.names, *b.names]):
        if name not in types_a or name not in types_b or not types_a[name].equals(types_b[name]):
            differences.append(f"{name!r}: {types_a.get(name, 'absent')} / {types_b.get(name, 'absent')}")
    return ", ".join(differences)


def require_columns(schema: pa.Schema, columns: dict[str, str | None], path: str) -> None:
    """`columns`: role -> column name (None: not used). Raises naming every missing column at once."""
    missing = {role: name for role, name in columns.items() if name and name not in schema.names}
    if missing:
        named = ", no ".join(f"{role} column {name!r}" for role, name in missing.items())
        hint = " (an id column is optional: --id-column '' or id_column: null goes without)" if "id" in missing else ""
        raise ValueError(f"input {path} has no {named}; its columns are {schema.names}{hint}")
    id_column = columns.get("id")
    if id_column and pa.types.is_nested(id_type := schema.field(id_column).type):
        raise ValueError(
            f"input {path}: id column {id_column!r} is {id_type}, not a single value (text, a number, ...) that rows "
            "can be told apart by; use another column, or --id-column '' for none"
        )


def read_parquet(path: str, storage: StorageConfig, columns: list[str], num_cpus: float) -> ray.data.Dataset:
    ds = ray.data.read_parquet(path, filesystem=storage.filesystem(path), include_row_hash=True, num_cpus=num_cpus)
    ds = ds.select_columns([*dict.fromkeys(columns), ROW_HASH])
    # As parquet_schema gives the columns' types; fused into the read tasks.
    return ds.map_batches(decode_dictionaries, batch_format="pyarrow", batch_size=None, num_cpus=num_cpus)


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
    return {id_key(row[column]) for row in dups if row[column] is not None}


def id_key(value: object) -> object:
    """An id as duplicates are looked up: NaN ids are one value, as Ray's group-by counts them (in a Python set,
    NaN != NaN)."""
    return "NaN" if isinstance(value, float) and math.isnan(value) else value


def row_key(resume_value: int | str) -> str:
    """A short, file-name-safe, deterministic key for an input row from its resume key."""
    if isinstance(resume_value, (int, np.integer)):
        return f"{int(resume_value):016x}"
    return hashlib.sha1(str(resume_value).encode()).hexdigest()[:16]
