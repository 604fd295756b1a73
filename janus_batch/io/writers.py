"""Output writers: one Ray Data datasink, one encoding per format, committed as in `janus_batch.io.commits`.

Each write task gets finished rows (an Arrow table with one of the schemas in `schemas`) and writes them as one
task of files named `{task}` = `{write_uuid}_{task_index:06}`, under the run folder:

- parquet:    `data/{task}.parquet`; the image column opens in Hugging Face `datasets` as an Image feature.
- webdataset: `data/{task}.tar` in img2dataset's layout, `{key}.{png,jpg,webp}` + `{key}.txt` + `{key}.json` per
              image or text; the task's rows that are no sample, error rows and (for outputs with an image column)
              rows without an image, such as a curation's unkept candidates, in `data/{task}.errors.parquet`,
              so that every sample in a shard has the same members (as `datasets`' webdataset loader needs); a
              task of no sample writes no shard, only `data/{task}.parquet` (that loader fails on an empty tar).
              So `data/*.tar` holds every sample and `data/*.parquet` every other row.
              Unsigned 64-bit values (`row_hash`) are written as strings in the JSON: readers parse JSON integers
              as int64.
- files:      `images/{task}/{key}.{png,jpg,webp}` per image with `images/{task}/metadata.parquet` (a
              `datasets` imagefolder: `file_name` relative to it, `row_hash` as a string as in the WebDataset
              JSON), and `data/{task}.parquet`, the task's rows without images (errors too) with `file_name`
              relative to the run folder.
"""

from __future__ import annotations

import base64
import io
import json
import tarfile
from collections.abc import Iterable
from datetime import date, time
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink

from janus_batch.io.commits import (
    DATA,
    ERRORS_SUFFIX,
    IMAGES,
    RunFiles,
    TaskReader,
    index_rows,
    is_main,
    parquet_task_reader,
)
from janus_batch.io.schemas import ERROR, with_hf_image_feature

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


def strings_for_unsigned(schema: pa.Schema) -> pa.Schema:
    """The schema with unsigned 64-bit columns as strings: `datasets`' imagefolder and webdataset loaders read
    values through int64 and overflow on them."""
    return pa.schema([pa.field(f.name, pa.string()) if pa.types.is_uint64(f.type) else f for f in schema])


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


class RunWriter(Datasink[None]):
    """Writes each write task's rows in `output_format`, as one committed task (see janus_batch.io.commits)."""

    def __init__(
        self,
        run: RunFiles,
        output_format: OutputFormat,
        *,
        schema: pa.Schema,
        rows_per_file: int,
        text_column: str,
        image_format: str = "png",
    ):
        has_image = "image" in schema.names
        if output_format == "files" and not has_image:
            raise ValueError("output format 'files' writes images; use parquet or webdataset for text outputs")
        if output_format not in ("parquet", "webdataset", "files"):
            raise ValueError(f"unknown output format {output_format!r}")
        self.run = run
        self.output_format = output_format
        self.schema = with_hf_image_feature(schema) if has_image and output_format == "parquet" else schema
        self.rows_per_file = rows_per_file
        self.text_column = text_column
        self.image_ext = IMAGE_EXTENSIONS[image_format]

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable[Block], ctx) -> None:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        table = pa.concat_tables(tables).cast(self.schema) if tables else self.schema.empty_table()
        if table.num_rows == 0:
            return
        task = f"{ctx.kwargs[WRITE_UUID_KWARG_NAME]}_{ctx.task_idx:06}"
        encode = {"parquet": self.parquet, "webdataset": self.webdataset, "files": self.files}[self.output_format]
        aux, main = encode(task, table)
        self.run.commit_task(task, aux, main, index_rows(table, self.run.resume_key, self.run.resume_type))

    def parquet(self, task: str, table: pa.Table) -> tuple[dict, tuple[str, bytes]]:
        return {}, (f"{DATA}/{task}.parquet", parquet_bytes(table))

    def webdataset(self, task: str, table: pa.Table) -> tuple[dict, tuple[str, bytes]]:
        no_sample = pc.is_valid(table[ERROR])
        if "image" in table.column_names:
            no_sample = pc.or_(no_sample, pc.is_null(table["image"]))
        aside = table.filter(no_sample)
        without_image = aside.drop_columns([c for c in ("image",) if c in aside.column_names])
        samples = table.filter(pc.invert(no_sample))
        if samples.num_rows == 0:  # no shard: `datasets`' webdataset loader fails on a tar of no sample
            return {}, (f"{DATA}/{task}.parquet", parquet_bytes(without_image))
        aux = {f"{DATA}/{task}{ERRORS_SUFFIX}": parquet_bytes(without_image)} if aside.num_rows else {}
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for row in samples.cast(strings_for_unsigned(samples.schema)).to_pylist():
                image = row.pop("image", None)
                members = []
                if image is not None:
                    members.append((self.image_ext, image["bytes"]))
                if row.get(self.text_column) is not None:
                    members.append(("txt", row[self.text_column].encode()))
                members.append(("json", json.dumps(row, default=json_value).encode()))
                for ext, data in members:
                    info = tarfile.TarInfo(f"{row['key']}.{ext}")
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))
        return aux, (f"{DATA}/{task}.tar", buffer.getvalue())

    def files(self, task: str, table: pa.Table) -> tuple[dict, tuple[str, bytes]]:
        aux, names = {}, []
        for key, image in zip(table["key"].to_pylist(), table["image"].to_pylist(), strict=True):
            name = None if image is None else f"{key}.{self.image_ext}"
            if name is not None:
                aux[f"{IMAGES}/{task}/{name}"] = image["bytes"]
            names.append(name)
        rows = table.drop_columns(["image"])
        local = rows.append_column("file_name", pa.array(names, pa.string()))
        local = local.filter(pc.is_valid(local["file_name"])).cast(strings_for_unsigned(local.schema))
        if local.num_rows:  # a folder of no image has no metadata: `datasets` fails on an empty one
            aux[f"{IMAGES}/{task}/metadata.parquet"] = parquet_bytes(local)
        in_run = [None if n is None else f"{IMAGES}/{task}/{n}" for n in names]
        main = rows.append_column("file_name", pa.array(in_run, pa.string()))
        return aux, (f"{DATA}/{task}.parquet", parquet_bytes(main))

    def task_reader(self) -> TaskReader:
        """How to index a committed task again from its files (see commits.reconcile)."""
        resume_key, resume_type = self.run.resume_key, self.run.resume_type
        if self.output_format != "webdataset":
            return parquet_task_reader(resume_key, resume_type)

        parquet_main = parquet_task_reader(resume_key, resume_type)

        def read(files: dict[str, bytes], names: set[str]) -> pa.Table:
            ((main, data),) = [(r, d) for r, d in files.items() if is_main(r)]
            if main.endswith(".parquet"):  # a task of no sample
                return parquet_main(files, names)
            rows = []
            with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
                for member in tar:
                    if member.name.endswith(".json"):
                        row = json.loads(tar.extractfile(member).read())
                        resume = int(row[resume_key]) if pa.types.is_uint64(resume_type) else row[resume_key]
                        rows.append(
                            {resume_key: resume, "key": row["key"], ERROR: None, "weights_hash": row["weights_hash"]}
                        )
            columns = pa.schema(
                [(resume_key, resume_type), ("key", pa.string()), (ERROR, pa.string()), ("weights_hash", pa.string())]
            )
            tables = [pa.Table.from_pylist(rows, schema=columns)]
            errors = main.removesuffix(".tar") + ERRORS_SUFFIX
            if errors in files:
                tables.append(pq.read_table(io.BytesIO(files[errors]), columns=columns.names).cast(columns))
            return index_rows(pa.concat_tables(tables), resume_key, resume_type)

        return read
