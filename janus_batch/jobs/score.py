"""The score job kind: an existing image corpus (Parquet with image bytes or URIs, or an image folder, as captioning
reads it), made by any generator, scored with the curation's Scorer: the aesthetic rating, and with a prompt per
row (`input.prompt_column`) the alignment too.

read images -> fetch, decode, resize/pad (CPU) -> score (model actors) -> finish rows.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
import ray
from pydantic import Field, model_validator

from janus_batch import stages
from janus_batch.curation import SCORE_COLUMNS, score_quantiles
from janus_batch.io import schemas
from janus_batch.io.commits import RunFiles
from janus_batch.jobs.caption import (
    Caption,
    ImageInput,
    check_passthrough_names,
    passthrough,
    prepare_images,
    read_images,
)
from janus_batch.jobs.kinds import Build, Prepared, Stage, actor_pool, read_data_columns
from janus_batch.jobs.specs import JobSpec, OptionalColumn
from janus_batch.options import ScoreOptions

SCORE_FIELDS = [(name, pa.float32()) for name in SCORE_COLUMNS]


class ScoreInput(ImageInput):
    prompt_column: OptionalColumn = Field(
        None, description="what each image should show, for the alignment; None: none"
    )

    @property
    def text_column(self) -> tuple[str | None, str]:
        return self.prompt_column, "prompt"  # the prompts travel where captioning's questions do


class ScoreJob(JobSpec):
    kind: Literal["score"] = "score"
    input: ScoreInput
    scores: ScoreOptions = Field(default_factory=ScoreOptions)

    @model_validator(mode="after")
    def check_job(self) -> ScoreJob:
        if self.input.question_column is not None:
            raise ValueError("input.question_column: a score job reads prompts, from input.prompt_column")
        if self.input.format == "images" and self.input.prompt_column is not None:
            raise ValueError("input.prompt_column needs Parquet input (an image folder has no prompts)")
        if self.input.prompt_column is None and self.scores.aesthetic_weight == 0:
            raise ValueError("scores.aesthetic_weight is 0 and there is no input.prompt_column: no combined score")
        if self.output.format != "parquet":
            raise ValueError("a score job writes Parquet rows (output.format parquet)")
        check_passthrough_names(self.input, output_schema_of(self, schemas.ROW_HASH, []))
        return self


def output_schema_of(spec: ScoreJob, resume_key: str, ids: list[tuple[str, pa.DataType]]) -> pa.Schema:
    resume_type = pa.uint64() if resume_key == schemas.ROW_HASH else pa.string()
    return pa.schema(
        [
            ("key", pa.string()),
            (resume_key, resume_type),
            *[(name, typ) for name, typ in ids if name != resume_key],
            *SCORE_FIELDS,
            *schemas.COMMON,
        ]
    )


def output_schema(prepared: Prepared) -> pa.Schema:
    spec = prepared.spec
    if spec.input.format == "images":
        return output_schema_of(spec, schemas.PATH, [])
    ids = [(c, prepared.schema.field(c).type) for c in passthrough(spec)]
    return output_schema_of(spec, schemas.ROW_HASH, ids)


def score(build: Build, ds: ray.data.Dataset) -> ray.data.Dataset:
    return build.model_stage(ds, stages.ImageScorer, scores=build.spec.scores, resume_key=build.resume_key)


def finish(build: Build, ds: ray.data.Dataset) -> ray.data.Dataset:
    fn_kwargs = dict(run_id=build.spec.run_id, schema=output_schema(build.prepared), progress=build.progress)
    return ds.map_batches(stages.finish_text_rows, fn_kwargs=fn_kwargs, batch_size=None, **build.cpu)


class Score(Caption):
    """Lists, checks and counts its input as captioning does; scores instead of captioning."""

    spec = ScoreJob

    def output_schema(self, prepared: Prepared) -> pa.Schema:
        return output_schema(prepared)

    def text_column(self, spec: ScoreJob) -> str:
        return "score"  # unused: the output is Parquet

    def stages(self, spec: ScoreJob) -> list[Stage]:
        res = spec.resources
        scores = spec.scores
        if spec.input.prompt_column:
            what = "alignment and aesthetic"
            weights = f"score = {scores.alignment_weight:g} alignment + {scores.aesthetic_weight:g} aesthetic"
        else:
            what, weights = "aesthetic only (no prompt column)", "score = the aesthetic"
        return [
            Stage("read", f"{spec.input.format} from {spec.input.path}", read_images),
            Stage(
                "prepare", f"fetch, decode, resize/pad images (CPU tasks, {res.cpus_per_task} CPU each)", prepare_images
            ),
            Stage("score", f"{what}, {weights}; {res.batch_size} images per call {actor_pool(res)}", score),
            Stage("finish", "score rows with the run's columns (CPU tasks)", finish),
        ]

    def summary(self, prepared: Prepared, files: RunFiles) -> dict:
        table = read_data_columns(files, prepared.spec.output.format, output_schema(prepared), list(SCORE_COLUMNS))
        return {"score_quantiles": score_quantiles(table)}
