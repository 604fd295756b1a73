"""The synthesize job kind: prompts in Parquet -> `images_per_prompt` images each.

read prompts -> check prompts and ids -> generate (model actors) -> encode (PNG/JPEG/WebP).
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from pydantic import Field, model_validator

from janus_batch import stages
from janus_batch.io import readers, schemas
from janus_batch.io.storage import fs_path, join, write_bytes
from janus_batch.jobs.kinds import Build, JobKind, Prepared, Stage, actor_pool
from janus_batch.jobs.specs import JobSpec, OptionalColumn, Spec
from janus_batch.options import ImageSampling

BUILTIN_PROMPTS = [
    "A photo of a red fox sitting in the snow, golden hour.",
    "A watercolor painting of a lighthouse on a cliff above a stormy sea.",
    "A city street at night with neon lights, cinematic.",
    "A bowl of ramen on a wooden table, studio lighting.",
]


class PromptInput(Spec):
    path: str = Field(description="Parquet file or folder, local or s3://")
    prompt_column: str = "prompt"
    id_column: OptionalColumn = Field("prompt_id", description="None: the prompt text is the id")
    check_duplicate_ids: bool = Field(
        True, description="report rows sharing an id (or, without id_column, a prompt text): one pass over that column"
    )


class SynthesizeJob(JobSpec):
    kind: Literal["synthesize"] = "synthesize"
    input: PromptInput | None = Field(None, description="None: a small built-in prompt set")
    sampling: ImageSampling = Field(default_factory=ImageSampling)

    @property
    def outputs_per_input(self) -> int:
        return self.sampling.images_per_prompt

    @model_validator(mode="after")
    def check_block_size(self) -> SynthesizeJob:
        # All images of a prompt must land in one write task (one commit); Ray Data splits blocks larger
        # than the context's target_max_block_size, which the job raises to 1 GiB: keep a batch below it.
        images = self.resources.batch_size * self.sampling.images_per_prompt
        if images > 1024:
            raise ValueError(f"batch_size x images_per_prompt = {images} images per model call; keep it <= 1024")
        return self


def write_builtin_prompts(spec: SynthesizeJob) -> str:
    """The built-in prompts as the run's input file, written once (a rerun finds the same file)."""
    path = join(spec.run_dir, "input", "prompts.parquet")
    fs = spec.storage.filesystem(path)
    if fs.get_file_info(fs_path(path)).type == pafs.FileType.File:
        return path
    table = pa.table({"prompt_id": [f"p{i}" for i in range(len(BUILTIN_PROMPTS))], "prompt": BUILTIN_PROMPTS})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(path, sink.getvalue().to_pybytes(), spec.storage)
    return path


def prompt_columns(spec: SynthesizeJob) -> tuple[str, str | None]:
    """(prompt column, id column) of the input; the built-in prompts have both."""
    source = spec.input
    return (source.prompt_column, source.id_column) if source else ("prompt", "prompt_id")


def read_prompts(build: Build, _) -> ray.data.Dataset:
    spec = build.spec
    columns = [c for c in prompt_columns(spec) if c]
    return readers.read_parquet(build.prepared.input_path, spec.storage, columns, spec.resources.cpus_per_task)


def check_prompts(build: Build, ds: ray.data.Dataset) -> ray.data.Dataset:
    spec = build.spec
    prompt_column, id_column = prompt_columns(spec)
    check_ids = spec.input is None or spec.input.check_duplicate_ids
    # Over the whole input, done rows included: a rerun finds the same duplicates as the first attempt.
    dups = readers.duplicate_ids(ds, id_column or prompt_column) if check_ids else set()
    ds = build.skip_done(ds)
    return ds.map_batches(
        stages.prepare_prompts,
        fn_kwargs=dict(prompt_column=prompt_column, id_column=id_column, duplicates=dups),
        **build.cpu,
    )


def generate(build: Build, ds: ray.data.Dataset) -> ray.data.Dataset:
    return build.model_stage(ds, stages.Synthesizer, sampling=build.spec.sampling)


def encode(build: Build, ds: ray.data.Dataset, *, schema: pa.Schema) -> ray.data.Dataset:
    """The model stage's rows -> the output `schema`'s, their pixels encoded."""
    spec = build.spec
    post = dict(
        image_format=spec.output.image_format,
        run_id=spec.run_id,
        sampling=spec.sampling,
        schema=schema,
        progress=build.progress,
    )
    # batch_size=None: one block in, one block out, so a prompt's images stay in one block.
    return ds.map_batches(stages.encode_images, fn_kwargs=post, batch_size=None, **build.cpu)


class Synthesize(JobKind):
    spec = SynthesizeJob

    def resume_key(self, spec: SynthesizeJob) -> pa.Field:
        return pa.field(schemas.ROW_HASH, pa.uint64())

    def list_input(self, spec: SynthesizeJob) -> tuple[str, list[str], pa.Schema]:
        input_path = spec.input.path if spec.input else write_builtin_prompts(spec)
        files = readers.list_input_files(input_path, spec.storage, ["parquet"])
        schema = readers.parquet_schema(input_path, spec.storage)
        if spec.input:
            columns = {"prompt": spec.input.prompt_column, "id": spec.input.id_column}
            readers.require_columns(schema, columns, input_path)
        return input_path, files, schema

    def output_schema(self, prepared: Prepared) -> pa.Schema:
        return schemas.SYNTHESIZE

    def text_column(self, spec: SynthesizeJob) -> str:
        return "prompt"

    def stages(self, spec: SynthesizeJob) -> list[Stage]:
        res = spec.resources
        source = spec.input.path if spec.input else "built-in prompts"
        per_call = f"{spec.sampling.images_per_prompt} images per prompt, {res.batch_size} prompts per call"
        return [
            Stage("read", f"Parquet prompts from {source} (resume key: row_hash)", read_prompts),
            Stage("prepare", f"check prompts and ids (CPU tasks, {res.cpus_per_task} CPU each)", check_prompts),
            Stage("generate", f"{per_call} {actor_pool(res)}", generate),
            Stage("encode", f"{spec.output.image_format} (CPU tasks)", partial(encode, schema=schemas.SYNTHESIZE)),
        ]
