"""Job specifications: which model a batch job runs, with what resources, where it writes. What it reads and its
options are its kind's (SynthesizeJob in synthesize.py, CaptionJob in caption.py), on top of JobSpec.

Pydantic models, so a YAML file, CLI flags and Python code all build the same validated object, and a
mistake is reported with the field's name before anything runs.
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from janus_batch.io.storage import StorageConfig, join
from janus_batch.io.writers import OutputFormat

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Output rows (images, or texts) per model call by default. A call is split into forward batches as large as
# the GPU's KV cache holds (on an 80 GB card ~90 images or ~165 captions for 7B, ~270 / ~490 for 1B), so a
# call must hold several of them: a smaller call runs smaller batches and leaves the GPU underused.
ROWS_PER_CALL = 512


def resolve_run_id(template: str, now: datetime) -> str:
    """A run id, with `{now:STRFTIME}` placeholders filled in from `now` (UTC), e.g. 'nightly-{now:%Y%m%d}':
    a scheduled job gets one id per slot, so a schedule that fires twice in a slot resumes, never redoes."""
    try:
        run_id = template.format(now=now)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"run_id {template!r}: the only placeholder is {{now:STRFTIME}} ({e})") from None
    if not RUN_ID.fullmatch(run_id):
        raise ValueError(f"run_id {run_id!r} (from {template!r}): use letters, digits, '.', '_' and '-' only")
    return run_id


def no_column_if_empty(name: object) -> object:
    return None if name == "" else name


# An optional input column: None or "" (as `--id-column ''` gives it) for none.
OptionalColumn = Annotated[str | None, BeforeValidator(no_column_if_empty)]


class Spec(BaseModel):
    # Errors name the field and the rule, not the value given: a value can hold a secret (storage keys).
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), hide_input_in_errors=True)


class ModelSpec(Spec):
    source: str | None = Field(None, description="HF id, local dir or s3:// prefix; None: the embedded tiny model")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU"
    )
    allow_pickle: bool = Field(
        False, description="load pickle (.bin) weights, with torch.load(weights_only=True); only if trusted"
    )
    revision: str | None = Field(None, description="Hugging Face ids only: a branch, tag, commit or refs/pr/N")
    prompt_format: Literal["auto", "janus-pro", "janus-1.3b"] = Field(
        "auto", description="the chat roles; auto: as the checkpoint tells (Janus-1.3B by its name)"
    )


class ResourceSpec(Spec):
    actors: int = Field(1, ge=1, description="model actors (a fixed pool), unless min/max_actors are set")
    min_actors: int | None = Field(None, ge=1, description="autoscaling pool: at least this many actors")
    max_actors: int | None = Field(None, ge=1, description="autoscaling pool: at most this many actors")
    gpus_per_actor: float | None = Field(None, ge=0, description="None: 1 if the cluster has GPUs, else 0 (CPU)")
    cpus_per_actor: float = Field(1, ge=0)
    cpus_per_task: float = Field(1, gt=0, description="CPUs per CPU-stage task (decode, encode)")
    batch_size: int | None = Field(
        None,
        ge=1,
        description=f"input rows (prompts, or images) per model call and output block; None: {ROWS_PER_CALL} "
        "output rows (images or texts) per call",
    )
    max_batch_rows: int | None = Field(
        None, ge=1, description="at most this many rows per forward pass; None: as many as GPU memory holds (64 on CPU)"
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="share of a GPU's memory a model actor may use, times gpus_per_actor if < 1"
    )
    call_timeout_s: float = Field(
        1800, gt=0, description="a longer model call (hung or stopped) kills its actor: Ray restarts it and retries"
    )

    @model_validator(mode="after")
    def check_pool(self) -> ResourceSpec:
        if (self.min_actors is None) != (self.max_actors is None):
            raise ValueError("set both min_actors and max_actors for an autoscaling pool, or neither")
        if self.min_actors is not None and self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) > max_actors ({self.max_actors})")
        return self

    def pool_size(self) -> tuple[int, int]:
        if self.min_actors is not None:
            return self.min_actors, self.max_actors
        return self.actors, self.actors


class OutputSpec(Spec):
    path: str = Field("outputs", description="local dir or s3:// prefix; the run writes under PATH/RUN_ID/")
    format: OutputFormat = "parquet"
    image_format: Literal["png", "jpeg", "webp"] = "png"
    rows_per_file: int = Field(
        256, ge=1, description="at least this many rows per output file (a commit unit); a model call is never split"
    )


class LeaseSpec(Spec):
    """One driver per run id at a time (janus_batch.io.lease)."""

    wait: bool = Field(False, description="wait for another driver's lease on the run to end, instead of refusing")
    ttl_s: float = Field(60, ge=3, description="a crashed driver's lease expires after this long (renewed every third)")


class JobSpec(Spec):
    """What every job has; a kind's spec adds `kind: Literal[NAME]` (its name in registry.KINDS), its input and
    its options."""

    kind: str
    model: ModelSpec = Field(default_factory=ModelSpec)
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    lease: LeaseSpec = Field(default_factory=LeaseSpec)
    run_id: str | None = Field(
        None,
        description="rerun with the same id to resume; {now:STRFTIME} is filled in (UTC) at the start; None: new id",
    )

    @model_validator(mode="after")
    def default_batch_size(self) -> JobSpec:
        if self.resources.batch_size is None:
            rows = max(1, ROWS_PER_CALL // self.outputs_per_input)
            self.resources = self.resources.model_copy(update={"batch_size": rows})
        return self

    @property
    def outputs_per_input(self) -> int:
        """Output rows an input makes when it succeeds (one, its error row, when it fails)."""
        return 1

    @field_validator("run_id")
    @classmethod
    def check_run_id(cls, run_id: str | None) -> str | None:
        if run_id is not None:
            resolve_run_id(run_id, datetime(2000, 1, 1, tzinfo=timezone.utc))  # any date shows a bad template
        return run_id

    def with_run_id(self) -> JobSpec:
        """The spec with its run id resolved: the template filled in, or a new unique id."""
        now = datetime.now(timezone.utc)
        if self.run_id is None:
            run_id = f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        else:
            run_id = resolve_run_id(self.run_id, now)
        return self.model_copy(update={"run_id": run_id})

    @property
    def run_dir(self) -> str:
        assert self.run_id is not None, "resolve the run id first (with_run_id)"
        return join(self.output.path, self.run_id)

    def public_dump(self) -> dict:
        """The spec as a dict, secrets masked (for logs, --dry-run and summary.json)."""
        data = self.model_dump(mode="json")
        for name in ("key", "secret", "token"):
            if data["storage"].get(name):
                data["storage"][name] = "***"
        return data
