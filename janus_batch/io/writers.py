"""Output writers, one per format, all with the same interface (Ray Data file datasinks).

Each write task gets a block of finished rows (an Arrow table with one of the schemas in `schemas`) and
writes it as one file named `{write_uuid}_{task_index}`: Ray Data's checkpointing commits a task's rows
in two phases and, on resume, deletes files whose name starts with an uncommitted task's prefix.

- parquet:    `{task}.parquet`; the image column opens in Hugging Face `datasets` as an Image feature.
- webdataset: `{task}.tar` in img2dataset's layout: `{key}.{png,jpg,webp}` + `{key}.txt` + `{key}.json`.
- files:      `{key}.{png,jpg,webp}` per image (deterministic names: a redone task rewrites the same bytes
              to the same file) + `{task}.parquet` with the metadata of the task's rows and a `file_name`.
"""

from __future__ import annotations

import base64
import io
import json
import posixpath
import tarfile
from datetime import date, time
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import BlockAccessor
from ray.data.datasource import BlockBasedFileDatasink

from janus_batch.io.schemas import with_hf_image_feature

OutputFormat = Literal["parquet", "webdataset", "files"]
IMAGE_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def json_value(value: object) -> object:
    """What `json` cannot write itself, from an id column passed through: dates and times as ISO 8601, bytes
    as base64, anything else (decimals, ...) as its string."""
    if isinstance(value, (date, time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)


class ParquetWriter(BlockBasedFileDatasink):
    def __init__(self, path: str, *, schema: pa.Schema, has_image: bool, **kwargs):
        super().__init__(path, file_format="parquet", **kwargs)
        self.schema = with_hf_image_feature(schema) if has_image else schema

    def write_block_to_file(self, block: BlockAccessor, file: pa.NativeFile) -> None:
        pq.write_table(block.to_arrow().cast(self.schema), file)


class WebDatasetWriter(BlockBasedFileDatasink):
    def __init__(self, path: str, *, text_column: str, image_format: str, **kwargs):
        super().__init__(path, file_format="tar", **kwargs)
        self.text_column = text_column
        self.image_ext = IMAGE_EXTENSIONS[image_format]

    def write_block_to_file(self, block: BlockAccessor, file: pa.NativeFile) -> None:
        with tarfile.open(fileobj=file, mode="w|") as tar:
            for row in block.to_arrow().to_pylist():
                key = row["key"]
                image = row.pop("image", None)
                members = []
                if image is not None:
                    members.append((self.image_ext, image["bytes"]))
                if row.get(self.text_column) is not None:
                    members.append(("txt", row[self.text_column].encode()))
                members.append(("json", json.dumps(row, default=json_value).encode()))
                for ext, data in members:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))


class ImageFilesWriter(BlockBasedFileDatasink):
    def __init__(self, path: str, *, schema: pa.Schema, image_format: str, **kwargs):
        super().__init__(path, file_format="parquet", **kwargs)
        self.image_ext = IMAGE_EXTENSIONS[image_format]
        self.schema = schema.remove(schema.get_field_index("image")).append(pa.field("file_name", pa.string()))

    def write_block(self, block: BlockAccessor, block_index: int, ctx) -> None:
        table = block.to_arrow()
        names = []
        for key, image in zip(table["key"].to_pylist(), table["image"].to_pylist(), strict=True):
            if image is None:
                names.append(None)
                continue
            name = f"{key}.{self.image_ext}"
            with self.open_output_stream(posixpath.join(self.path, name)) as f:
                f.write(image["bytes"])
            names.append(name)
        meta = table.drop_columns(["image"]).append_column("file_name", pa.array(names, pa.string()))
        # The metadata file last: it is what names the task (and is deleted with it on an unfinished commit).
        super().write_block(BlockAccessor.for_block(meta.cast(self.schema)), block_index, ctx)

    def write_block_to_file(self, block: BlockAccessor, file: pa.NativeFile) -> None:
        pq.write_table(block.to_arrow(), file)


def make_writer(
    output_format: OutputFormat,
    path: str,
    *,
    schema: pa.Schema,
    filesystem: pa.fs.FileSystem,
    rows_per_file: int,
    text_column: str,
    image_format: str = "png",
) -> BlockBasedFileDatasink:
    common = dict(filesystem=filesystem, min_rows_per_file=rows_per_file)
    has_image = "image" in schema.names
    if output_format == "parquet":
        return ParquetWriter(path, schema=schema, has_image=has_image, **common)
    if output_format == "webdataset":
        return WebDatasetWriter(path, text_column=text_column, image_format=image_format, **common)
    if output_format == "files":
        if not has_image:
            raise ValueError("output format 'files' writes images; use parquet or webdataset for text outputs")
        return ImageFilesWriter(path, schema=schema, image_format=image_format, **common)
    raise ValueError(f"unknown output format {output_format!r}")
