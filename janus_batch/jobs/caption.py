"""The caption job kind: images (Parquet with bytes or URIs, or an image folder) -> a caption each, or with
task 'vqa' the answer to each row's question.

read images -> fetch, decode, preprocess -> caption / answer (model actors) -> finish rows.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
import ray
from pydantic import Field, field_validator, model_validator

from janus_batch import stages
from janus_batch.io import readers, schemas
from janus_batch.jobs.kinds import Build, JobKind, Prepared, Stage, actor_pool
from janus_batch.jobs.specs import JobSpec, OptionalColumn, Spec
from janus_batch.options import DEFAULT_CAPTION_INSTRUCTION, TextSampling


class ImageInput(Spec):
    path: str = Field(description="Parquet file or folder, or a folder of image files; local or s3://")
    format: Literal["parquet", "images"] = "parquet"
    image_column: OptionalColumn = Field("image", description="encoded bytes, or a {bytes, path} struct (HF Image)")
    image_uri_column: OptionalColumn = Field(None, description="local path or s3:// URI per row (instead of bytes)")
    id_column: OptionalColumn = Field("image_id", description="passed through to the output; None: none")
    question_column: OptionalColumn = Field(None, description="VQA: the question per row")
    check_duplicate_ids: bool = True
    max_image_bytes: int = Field(32 * 2**20, ge=1)

    @property
    def text_column(self) -> tuple[str | None, str]:
        """(the column of each row's text, what a row's error calls it): the question, for VQA."""
        return self.question_column, "question"

    @model_validator(mode="after")
    def one_image_source(self) -> ImageInput:
        # Columns given for one source and unused by it would be dropped without a word: refused instead.
        given = {f for f in ("image_column", "image_uri_column", "id_column") if getattr(self, f) is not None}
        if self.format == "images":
            if unused := sorted(given & self.model_fields_set):
                raise ValueError(f"format 'images' reads files, which have no columns: unset {', '.join(unused)}")
            return self.model_copy(update=dict(image_column=None, image_uri_column=None, id_column=None))
        if self.image_uri_column is not None:
            if "image_column" in self.model_fields_set and self.image_column is not None:
                raise ValueError("set image_column (bytes) or image_uri_column (paths / URIs), not both")
            return self.model_copy(update=dict(image_column=None))
        if self.image_column is None:
            raise ValueError("set image_column (bytes) or image_uri_column (paths / URIs)")
        return self


class CaptionJob(JobSpec):
    """Captioning, or visual question answering with task='vqa' (a question per row)."""

    kind: Literal["caption"] = "caption"
    task: Literal["caption", "vqa"] = "caption"
    input: ImageInput
    instruction: str = Field(DEFAULT_CAPTION_INSTRUCTION, min_length=1, description="the caption prompt (task caption)")
    sampling: TextSampling = Field(default_factory=TextSampling)

    @field_validator("instruction")
    @classmethod
    def check_instruction(cls, instruction: str) -> str:
        if not instruction.strip():
            raise ValueError("instruction is empty")
        return instruction

    @model_validator(mode="after")
    def check_task(self) -> CaptionJob:
        if self.task == "vqa" and self.input.format == "images":
            raise ValueError("task 'vqa' needs a question per row: use Parquet input with input.question_column")
        if self.task == "vqa" and self.input.question_column is None:
            raise ValueError("task 'vqa' needs input.question_column (the question per row)")
        if self.task == "vqa" and self.instruction != DEFAULT_CAPTION_INSTRUCTION:  # the default: a dumped spec
            raise ValueError("instruction is the caption prompt: task 'vqa' asks each row's question instead")
        if self.output.format == "files":
            raise ValueError("output format 'files' writes images; use parquet or webdataset for text outputs")
        if self.task == "caption" and self.input.question_column is not None:
            raise ValueError("input.question_column is set: use task 'vqa' to answer questions")
        check_passthrough_names(self.input, schemas.understanding_schema(schemas.ROW_HASH, [], self.text_column))
        return self

    @property
    def text_column(self) -> str:
        return "answer" if self.task == "vqa" else "caption"


def check_passthrough_names(source: ImageInput, output: pa.Schema) -> None:
    """Passed-through columns keep their names: one named like a column of the job's own, in the output or
    between its stages, would collide with it."""
    taken = list(dict.fromkeys([*output.names, *stages.PREPARED_COLUMNS]))
    for field in ("id_column", "image_uri_column"):
        name = getattr(source, field)
        if name in taken:
            raise ValueError(
                f"input.{field} {name!r} is passed through beside the job's own {name!r} column; use another column "
                f"(the job's columns: {', '.join(taken)})"
            )


def passthrough(spec: CaptionJob) -> list[str]:
    """The input columns copied to the output rows."""
    if spec.input.format == "images":
        return [schemas.PATH]
    return [c for c in (spec.input.id_column, spec.input.image_uri_column) if c]


def read_images(build: Build, _) -> ray.data.Dataset:
    spec, source = build.spec, build.spec.input
    cpus = spec.resources.cpus_per_task
    if source.format == "images":
        return readers.read_image_folder(build.prepared.input_path, spec.storage, cpus)
    image_columns = [source.image_column, source.image_uri_column, source.text_column[0]]
    columns = [c for c in [*image_columns, *passthrough(spec)] if c]
    return readers.read_parquet(build.prepared.input_path, spec.storage, list(dict.fromkeys(columns)), cpus)


def prepare_images(build: Build, ds: ray.data.Dataset) -> ray.data.Dataset:
    spec, source = build.spec, build.spec.input
    # Over the whole input, done rows included: a rerun finds the same duplicates as the first attempt.
    dups = set()
    if source.id_column and source.check_duplicate_ids:
        dups = readers.duplicate_ids(ds, source.id_column)
    ds = build.skip_done(ds)
    text_column, text_name = source.text_column
    return ds.map_batches(
        stages.prepare_images,
        fn_kwargs=dict(
            resume_key=build.resume_key,
            image_column=source.image_column,
            image_uri_column=source.image_uri_column,
            id_column=source.id_column,
            question_column=text_column,
            passthrough=passthrough(spec),
            duplicates=dups,
            image_size=build.prepared.image_size,
            storage=spec.storage,
            max_image_bytes=source.max_image_bytes,
            question_name=text_name,
        ),
        batch_size=spec.resources.batch_size,
        **build.cpu,
    )


def understand(build: Build, ds: ray.data.Dataset) -> ray.data.Dataset:
    spec = build.spec
    return build.model_stage(
        ds,
        stages.Describer,
        sampling=spec.sampling,
        instruction=spec.instruction,
        resume_key=build.resume_key,
        text_column=spec.text_column,
    )


def output_schema(prepared: Prepared) -> pa.Schema:
    spec = prepared.spec
    if spec.input.format == "images":
        return schemas.understanding_schema(schemas.PATH, [], spec.text_column)
    ids = [(c, prepared.schema.field(c).type) for c in passthrough(spec)]
    return schemas.understanding_schema(schemas.ROW_HASH, ids, spec.text_column)


def finish(build: Build, ds: ray.data.Dataset) -> ray.data.Dataset:
    fn_kwargs = dict(run_id=build.spec.run_id, schema=output_schema(build.prepared), progress=build.progress)
    return ds.map_batches(stages.finish_text_rows, fn_kwargs=fn_kwargs, batch_size=None, **build.cpu)


class Caption(JobKind):
    spec = CaptionJob

    def resume_key(self, spec: CaptionJob) -> pa.Field:
        if spec.input.format == "images":
            return pa.field(schemas.PATH, pa.string())
        return pa.field(schemas.ROW_HASH, pa.uint64())

    def list_input(self, spec: CaptionJob) -> tuple[str, list[str], pa.Schema]:
        source, storage = spec.input, spec.storage
        if source.format == "images":
            files = readers.list_input_files(source.path, storage, readers.IMAGE_EXTENSIONS)
            return source.path, files, pa.schema([("bytes", pa.binary()), (schemas.PATH, pa.string())])
        files = readers.list_input_files(source.path, storage, ["parquet"])
        schema = readers.parquet_schema(source.path, storage)
        text_column, text_name = source.text_column  # the question, or a score job's prompt
        columns = {
            "image": source.image_column,
            "image URI": source.image_uri_column,
            "id": source.id_column,
            text_name: text_column,
        }
        readers.require_columns(schema, columns, source.path)
        return source.path, files, schema

    def count_inputs(self, prepared: Prepared) -> int:
        if prepared.spec.input.format == "images":  # a row per file
            return len(prepared.files)
        return super().count_inputs(prepared)

    def output_schema(self, prepared: Prepared) -> pa.Schema:
        return output_schema(prepared)

    def text_column(self, spec: CaptionJob) -> str:
        return spec.text_column

    def stages(self, spec: CaptionJob) -> list[Stage]:
        res = spec.resources
        decode = f"fetch, decode, resize/pad images (CPU tasks, {res.cpus_per_task} CPU each)"
        per_call = f"{res.batch_size} images per call, up to {spec.sampling.max_new_tokens} new tokens"
        return [
            Stage("read", f"{spec.input.format} from {spec.input.path}", read_images),
            Stage("prepare", decode, prepare_images),
            Stage(spec.task, f"{per_call} {actor_pool(res)}", understand),
            Stage("finish", f"{spec.text_column} rows with the run's columns (CPU tasks)", finish),
        ]
