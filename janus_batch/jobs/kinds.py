"""What a job kind is: the interface between the run every job shares (pipeline.py) and each kind's module.

A kind (synthesize.py, caption.py) owns what differs between jobs: its spec class, the column that identifies an
input row in the output (its resume key), how its input is listed, checked and counted, its output schema and the
writer's text column, and its Ray stages, whose plan lines `--dry-run` prints. registry.py names the kinds;
pipeline.py never asks which kind it runs.
"""

from __future__ import annotations

import json
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy

from janus_batch.io.commits import DATA, ERRORS_SUFFIX, READ_THREADS, RunFiles, is_main
from janus_batch.jobs.specs import JobSpec, ResourceSpec
from janus_batch.model.tokens import prompt_format_of


def model_image_size(config: dict) -> int:
    """Understanding input size: HF format (vision_config.image_size) or DeepSeek's (.params.image_size)."""
    vision = config.get("vision_config", {})
    return int(vision.get("image_size") or vision.get("params", {}).get("image_size") or 384)


class Prepared:
    """What the driver learned about a job before running it (pipeline.prepare)."""

    def __init__(self, spec: JobSpec, input_path: str, files: list[str], schema: pa.Schema, model_config: dict):
        self.spec = spec
        self.input_path = input_path
        self.files = files
        self.schema = schema
        self.image_size = model_image_size(model_config)
        model = spec.model
        source = model.source or "tiny"
        recorded = model_config.get("prompt_format")
        # What the engine will use (it logs it at load): the spec's, else as the checkpoint tells.
        self.prompt_format = (
            model.prompt_format if model.prompt_format != "auto" else prompt_format_of(source, recorded)[0]
        )


def model_stage_args(spec: JobSpec, made_with: str | None = None) -> tuple[dict, dict]:
    """(map_batches arguments, actor constructor arguments) of the model stage. `made_with`: the weights hash of
    the model that made the run's rows so far: an actor whose model has other weights refuses to start."""
    res = spec.resources
    gpus = res.gpus_per_actor
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    low, high = res.pool_size()
    return dict(
        compute=ActorPoolStrategy(min_size=low, max_size=high),
        num_gpus=gpus,
        num_cpus=res.cpus_per_actor,
        batch_size=res.batch_size,
        batch_format="pyarrow",
    ), dict(
        model=dict(spec.model.model_dump(), weights_hash=made_with),
        gpus=gpus,
        storage=spec.storage,
        batching=dict(
            max_batch_rows=res.max_batch_rows,
            gpu_memory_utilization=res.gpu_memory_utilization,  # shared out in the actor (load_engine)
        ),
        call_timeout_s=res.call_timeout_s,
    )


def actor_pool(res: ResourceSpec) -> str:
    """The model stage's actors, for a plan line."""
    low, high = res.pool_size()
    gpus = "auto (1 if the cluster has GPUs, else 0)" if res.gpus_per_actor is None else res.gpus_per_actor
    pool = f"{low}" if low == high else f"{low}-{high} (autoscaling)"
    return f"({pool} actors x {gpus} GPU, {res.cpus_per_actor} CPU)"


def drop_done(batch: pa.Table, *, resume_key: str, done: list) -> pa.Table:
    """Input rows whose outputs are not in the run's data yet. `done`: [ObjectRef of the done resume keys],
    wrapped in a list so that Ray passes the reference, fetched once per worker, not the keys per task."""
    return batch.filter(pc.invert(pc.is_in(batch[resume_key], value_set=ray.get(done[0]))))


@dataclass(frozen=True)
class Build:
    """What a job's stages are built with, on the driver (pipeline.build_pipeline)."""

    prepared: Prepared
    resume_key: str
    done: ray.ObjectRef | None  # the resume keys of the inputs whose rows are all in the run's data; None: none
    made_with: str | None  # the weights hash of the model that made the run's rows so far (model_stage_args)
    progress: ray.actor.ActorHandle | None  # a ProgressCounter, told about finished rows

    @property
    def spec(self) -> JobSpec:
        return self.prepared.spec

    @property
    def cpu(self) -> dict:
        """map_batches arguments of a CPU stage."""
        return dict(num_cpus=self.spec.resources.cpus_per_task, batch_format="pyarrow")

    def skip_done(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        if self.done is None:
            return ds
        return ds.map_batches(drop_done, fn_kwargs=dict(resume_key=self.resume_key, done=[self.done]), **self.cpu)

    def model_stage(self, ds: ray.data.Dataset, stage: type, **kwargs) -> ray.data.Dataset:
        """`stage` (a model actor class of janus_batch.stages) on the job's actor pool, one model call per block of
        batch_size input rows; `kwargs` go to its constructor beside the engine's."""
        map_args, engine_args = model_stage_args(self.spec, self.made_with)
        ds = ds.repartition(target_num_rows_per_block=self.spec.resources.batch_size)
        return ds.map_batches(stage, fn_constructor_kwargs=dict(engine_args, **kwargs), **map_args)


@dataclass(frozen=True)
class Stage:
    """One step of a job's pipeline: `plan` says what it does and with what resources (a `--dry-run` line, built
    without I/O); `apply(build, ds)` adds it to the Dataset (`ds` is None for the first stage, the read)."""

    name: str
    plan: str
    apply: Callable[[Build, ray.data.Dataset | None], ray.data.Dataset]


class JobKind(ABC):
    """What differs between job kinds. One instance per kind, in registry.KINDS under its spec's `kind`."""

    spec: type[JobSpec]  # the kind's spec class; its `kind` field names the kind

    @abstractmethod
    def resume_key(self, spec: JobSpec) -> pa.Field:
        """The column (and its type) that identifies an input row in the output and says which inputs are done."""

    @abstractmethod
    def list_input(self, spec: JobSpec) -> tuple[str, list[str], pa.Schema]:
        """(input path, its files, their schema), the columns the job reads checked: a bad input fails here,
        naming the file, before any model loads."""

    def count_inputs(self, prepared: Prepared) -> int:
        """Input rows, from the Parquet footers: nothing is read but metadata."""
        fs = prepared.spec.storage.filesystem(prepared.input_path)
        return sum(pq.read_metadata(f, filesystem=fs).num_rows for f in prepared.files)

    @abstractmethod
    def output_schema(self, prepared: Prepared) -> pa.Schema: ...

    @abstractmethod
    def text_column(self, spec: JobSpec) -> str:
        """The output column a WebDataset sample's `.txt` holds."""

    @abstractmethod
    def stages(self, spec: JobSpec) -> list[Stage]:
        """The job's stages up to the write (pipeline.py adds it), in order: what runs, and what --dry-run shows."""

    def summary(self, prepared: Prepared, files: RunFiles) -> dict:
        """The kind's own keys of summary.json, from the run's committed data (read after the final reconcile)."""
        return {}


def read_data_columns(files: RunFiles, output_format: str, schema: pa.Schema, columns: list[str]) -> pa.Table:
    """`columns` (of the output `schema`) of every row in the run's data files: the Parquet files' columns alone
    (formats parquet and files); for webdataset, the samples' JSON members (the images are skipped, not read)
    and the side Parquet files. Called after a reconcile, when every data file is committed."""
    wanted = pa.schema([schema.field(c) for c in columns])
    relatives = [r for r in files.list(DATA) if is_main(r) or r.endswith(ERRORS_SUFFIX)]

    def read(relative: str) -> pa.Table:
        path = files.path(relative)
        if not relative.endswith(".tar"):
            return pq.read_table(path, columns=columns, filesystem=files.filesystem).cast(wanted)
        rows = []
        with files.filesystem.open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    row = json.loads(tar.extractfile(member).read())
                    rows.append({c: row.get(c) for c in columns})
        return pa.Table.from_pylist(rows, schema=wanted)

    with ThreadPoolExecutor(READ_THREADS) as pool:
        tables = list(pool.map(read, relatives))
    return pa.concat_tables(tables) if tables else wanted.empty_table()
