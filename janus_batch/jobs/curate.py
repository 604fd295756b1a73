"""The curate job kind: synthesis that keeps the best candidates. Per prompt, `images_per_prompt` candidates are
generated, scored by the same model (janus_batch.engine.scoring), ranked and selected (janus_batch.curation), and
the kept ones optionally captioned, all in one model actor on one model load.

read prompts -> check prompts and ids, drop duplicate prompts -> generate, score, select, caption (model actors)
-> encode the images that are written.

Every candidate's row is written (its scores, rank and `kept`): an input always makes `images_per_prompt` rows,
which exactly-once resumption counts on. By default only the kept rows carry an image (`image` null for the
others); `write_all` writes every candidate's image.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import ray
from pydantic import Field, field_validator, model_validator

from janus_batch import stages
from janus_batch.curation import (
    CANDIDATE_FIELDS,
    SCORE_COLUMNS,
    SelectionRule,
    find_duplicates,
    score_quantiles,
)
from janus_batch.io import readers, schemas
from janus_batch.io.commits import RunFiles
from janus_batch.jobs.kinds import Build, Prepared, Stage, actor_pool, read_data_columns
from janus_batch.jobs.synthesize import Synthesize, SynthesizeJob, encode, prompt_columns, read_prompts
from janus_batch.options import DEFAULT_CAPTION_INSTRUCTION, ScoreOptions, TextSampling

DUPLICATE = "duplicate prompt: same text as "
ONCE_NORMALISED = " once normalised"

_COMMON = {name for name, _ in schemas.COMMON}
CURATE = pa.schema(
    [
        *[f for f in schemas.SYNTHESIZE if f.name not in _COMMON],
        *CANDIDATE_FIELDS,
        *schemas.COMMON,
    ]
)


class CurateJob(SynthesizeJob):
    """A synthesis job that scores its candidates and keeps the best (see the module doc)."""

    kind: Literal["curate"] = "curate"  # type: ignore[assignment]
    scores: ScoreOptions = Field(default_factory=ScoreOptions)
    selection: SelectionRule = Field(default_factory=SelectionRule)
    caption: bool = Field(False, description="caption the kept images, into the `caption` column")
    caption_instruction: str = Field(DEFAULT_CAPTION_INSTRUCTION, min_length=1)
    caption_sampling: TextSampling = Field(default_factory=TextSampling)
    write_all: bool = Field(False, description="write every candidate's image, not only the kept ones'")

    @field_validator("caption_instruction")
    @classmethod
    def check_instruction(cls, instruction: str) -> str:
        if not instruction.strip():
            raise ValueError("caption_instruction is empty")
        return instruction

    @model_validator(mode="after")
    def min_aesthetic_on_the_scale(self) -> CurateJob:
        # The expected rating lies on the scale: a threshold off it keeps every candidate or none.
        low, high, threshold = self.scores.aesthetic_low, self.scores.aesthetic_high, self.selection.min_aesthetic
        if threshold is not None and not low <= threshold <= high:
            raise ValueError(
                f"min_aesthetic {threshold:g} is off the rating scale {low}..{high} (scores.aesthetic_low/high)"
            )
        return self


def read_prompt_columns(ds: ray.data.Dataset, prompt_column: str, id_column: str | None) -> pa.Table:
    """The row_hash, prompt (and id) columns of the whole input, done rows included, on the driver: one pass."""
    columns = list(dict.fromkeys([schemas.ROW_HASH, prompt_column, *([id_column] if id_column else [])]))
    batches = list(ds.select_columns(columns).iter_batches(batch_format="pyarrow", batch_size=None))
    return pa.concat_tables(batches) if batches else pa.table({c: [] for c in columns})


def repeated_values(column: pa.ChunkedArray) -> set:
    """The values held by more than one row, as readers.duplicate_ids finds them (NaN one value, nulls none)."""
    counts = Counter(readers.id_key(v) for v in column.to_pylist() if v is not None)
    return {value for value, n in counts.items() if n > 1}


def duplicate_prompt_errors(
    table: pa.Table, prompt_column: str, id_column: str | None, duplicate_ids: set
) -> dict[int, str]:
    """row_hash -> its error, for the rows whose prompt repeats another row's, exactly or once normalised
    (curation.find_duplicates: of a text, the row with the smallest row_hash is kept). The error names the kept
    row (by its id, else its prompt). Only rows that would be generated take part: a row whose prompt or id has
    an error of its own (stages.prompt_row) neither is kept nor drops another."""
    keys, prompts, names = [], [], []
    ids = table[id_column or prompt_column].to_pylist()
    for key, raw, raw_id in zip(
        table[schemas.ROW_HASH].to_pylist(), table[prompt_column].to_pylist(), ids, strict=True
    ):
        prompt, _, error = stages.prompt_row(raw, raw_id, prompt_column, id_column, duplicate_ids)
        if error is None:
            keys.append(key)
            prompts.append(prompt)
            names.append(raw_id)
    kept_for = find_duplicates(keys, prompts)
    name_of = dict(zip(keys, names, strict=True))
    prompt_of = dict(zip(keys, prompts, strict=True))
    return {
        key: DUPLICATE + stages.short(name_of[kept]) + ("" if prompt_of[key] == prompt_of[kept] else ONCE_NORMALISED)
        for key, kept in kept_for.items()
    }


def check_prompts(build: Build, ds: ray.data.Dataset) -> ray.data.Dataset:
    spec = build.spec
    prompt_column, id_column = prompt_columns(spec)
    check_ids = id_column is not None and (spec.input is None or spec.input.check_duplicate_ids)
    # Over the whole input, done rows included: a rerun finds the same duplicates as the first attempt. Without
    # an id column, repeated prompt texts are the prompt duplicates, of which one is kept.
    table = read_prompt_columns(ds, prompt_column, id_column)
    dups = repeated_values(table[id_column]) if check_ids else set()
    dropped = duplicate_prompt_errors(table, prompt_column, id_column, dups)
    ds = build.skip_done(ds)
    return ds.map_batches(
        stages.prepare_prompts,
        fn_kwargs=dict(prompt_column=prompt_column, id_column=id_column, duplicates=dups, dropped=dropped),
        **build.cpu,
    )


def curate(build: Build, ds: ray.data.Dataset) -> ray.data.Dataset:
    spec = build.spec
    return build.model_stage(
        ds,
        stages.Curator,
        sampling=spec.sampling,
        scores=spec.scores,
        selection=spec.selection,
        caption_sampling=spec.caption_sampling if spec.caption else None,
        caption_instruction=spec.caption_instruction,
        write_all=spec.write_all,
    )


def count(mask: pa.ChunkedArray) -> int:
    return pc.sum(mask).as_py() or 0


def selection_summary(spec: CurateJob) -> dict:
    weights = {"alignment": spec.scores.alignment_weight, "aesthetic": spec.scores.aesthetic_weight}
    return {**spec.selection.model_dump(), "score_weights": weights}


class Curate(Synthesize):
    spec = CurateJob

    def output_schema(self, prepared: Prepared) -> pa.Schema:
        return CURATE

    def stages(self, spec: CurateJob) -> list[Stage]:
        res = spec.resources
        source = spec.input.path if spec.input else "built-in prompts"
        per_call = f"{spec.sampling.images_per_prompt} candidates per prompt, {res.batch_size} prompts per call"
        rule = ", ".join(f"{k} {v:g}" for k, v in spec.selection.model_dump().items() if v is not None) or "keep all"
        weights = f"{spec.scores.alignment_weight:g} alignment + {spec.scores.aesthetic_weight:g} aesthetic"
        caption = f", caption the kept ({spec.caption_sampling.max_new_tokens} new tokens)" if spec.caption else ""
        written = "every candidate's image" if spec.write_all else "the kept candidates' images"
        return [
            Stage("read", f"Parquet prompts from {source} (resume key: row_hash)", read_prompts),
            Stage(
                "prepare",
                f"check prompts and ids, drop duplicate prompts (exact, normalised) (CPU tasks, {res.cpus_per_task} "
                "CPU each)",
                check_prompts,
            ),
            Stage(
                "curate",
                f"generate {per_call}, score ({weights}), select ({rule}){caption} {actor_pool(res)}",
                curate,
            ),
            Stage("encode", f"{spec.output.image_format} of {written} (CPU tasks)", partial(encode, schema=CURATE)),
        ]

    def summary(self, prepared: Prepared, files: RunFiles) -> dict:
        spec = prepared.spec
        columns = ["sample_index", "kept", *SCORE_COLUMNS, schemas.ERROR]
        table = read_data_columns(files, spec.output.format, CURATE, columns)
        errors = table[schemas.ERROR]
        duplicates = pc.fill_null(pc.starts_with(errors, DUPLICATE), False)
        normalised = pc.and_(duplicates, pc.fill_null(pc.ends_with(errors, ONCE_NORMALISED), False))
        return dict(
            candidates=table.num_rows - table["sample_index"].null_count,
            kept=count(table["kept"]),
            duplicates_exact=count(duplicates) - count(normalised),
            duplicates_normalised=count(normalised),
            selection=selection_summary(spec),
            score_quantiles=score_quantiles(table),
        )
