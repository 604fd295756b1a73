"""Test data and spec helpers for the batch-job tests."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from janus_batch import stages
from janus_batch.io.storage import StorageConfig, fs_path
from tests.helpers import encoded

# CPU-only settings that fit a 2-CPU cluster: one model actor, fractional CPU stages.
SMALL_RESOURCES = {"actors": 1, "cpus_per_actor": 0.5, "cpus_per_task": 0.25, "gpus_per_actor": 0}


def write_parquet(table: pa.Table, uri: str, storage: StorageConfig) -> str:
    fs = storage.filesystem(uri)
    if not uri.startswith("s3://"):
        fs.create_dir(fs_path(uri).rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, fs_path(uri), filesystem=fs)
    return uri


def read_parquet_dir(uri: str, storage: StorageConfig) -> pa.Table:
    fs = storage.filesystem(uri)
    return pq.read_table(fs_path(uri), filesystem=fs)


def sample_images(n: int, seed: int = 0) -> list[bytes]:
    """Valid images of assorted sizes, modes and formats."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if i % 3 == 1:
            image = image.convert("L")
        out.append(encoded(image, "JPEG" if i % 2 else "PNG"))
    return out


def synth_spec(input_uri: str | None, output_path: str, storage: StorageConfig, model_dir, **overrides) -> dict:
    spec = {
        "input": None if input_uri is None else {"path": input_uri},
        "model": {"source": str(model_dir)},
        "sampling": {"images_per_prompt": 2},
        "resources": dict(SMALL_RESOURCES, batch_size=2),
        "output": {"path": output_path, "rows_per_file": 4},
        "storage": storage.model_dump(),
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            spec[key] = {**(spec.get(key) or {}), **value}
        else:
            spec[key] = value
    return spec


def prepared_images(batch: pa.Table, storage: StorageConfig, **kwargs) -> pa.Table:
    """`stages.prepare_images` with a Parquet caption job's arguments (`kwargs` override them); a `row_hash`
    column is added when the batch has none."""
    if "row_hash" not in batch.column_names:
        batch = batch.append_column("row_hash", pa.array(range(len(batch)), pa.uint64()))
    args = dict(
        resume_key="row_hash",
        image_column="image",
        image_uri_column=None,
        id_column="image_id",
        question_column=None,
        passthrough=["image_id"],
        duplicates=set(),
        image_size=64,
        storage=storage,
        max_image_bytes=100_000,
    )
    return stages.prepare_images(batch, **{**args, **kwargs})
