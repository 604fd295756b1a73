"""Build and run a job: read -> CPU preprocess -> model actors -> CPU postprocess -> write, resumable.

Layout of a run (local or s3://):
    OUTPUT/RUN_ID/spec.json       the spec as run (secrets masked)
    OUTPUT/RUN_ID/inputs.json     the input files' sizes and modification times when the run started
    OUTPUT/RUN_ID/_lease.json     held by the driver running it (janus_batch.io.lease)
    OUTPUT/RUN_ID/data/           the outputs (see janus_batch.io.writers); images/ too for the 'files' format
    OUTPUT/RUN_ID/_index/         which rows each data file holds: a cache (janus_batch.io.commits)
    OUTPUT/RUN_ID/summary.json    counts, throughput, wall time (written when the run finishes)

Exactly once: the data files are the truth. Before a run, the run folder is reconciled
(`janus_batch.io.commits.reconcile`): leftovers of unfinished write tasks are deleted, and the resume keys of
every input whose output rows are all present are read. Those inputs are dropped after the read; the rest are
made and written, each write task committing its rows by writing its main data file last. After the run the
folder is reconciled again, and the run has succeeded only when every input's rows are there, counted from the
data. All images of a prompt come out of one model call as one block, and blocks are never split before the
write, so a prompt is written whole. Inputs are cut into blocks of one model batch before the model stage: an
actor task's outputs leave as one block, so this keeps commits small and frequent (a whole input file in one
block would commit only at its end).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy

from janus_batch import stages
from janus_batch.engine.engine import memory_share
from janus_batch.io import readers, schemas
from janus_batch.io.commits import DATA, Reconciled, RunFiles, reconcile
from janus_batch.io.lease import RunLease
from janus_batch.io.storage import (
    StorageConfig,
    fs_path,
    is_s3,
    join,
    leave_retries_to_the_store,
    read_bytes,
    write_bytes,
)
from janus_batch.io.writers import RunWriter
from janus_batch.jobs.specs import CaptionJob, JobSpec, SynthesizeJob
from janus_batch.model import check_weights, prompt_format_of

BUILTIN_PROMPTS = [
    "A photo of a red fox sitting in the snow, golden hour.",
    "A watercolor painting of a lighthouse on a cliff above a stormy sea.",
    "A city street at night with neon lights, cinematic.",
    "A bowl of ramen on a wooden table, studio lighting.",
]
# Ray Data splits blocks above this size; one model call's output must stay one block (see module doc).
MAX_BLOCK_BYTES = 2**30
PROGRESS_EVERY_S = 10.0


# ---- checks on the driver, before any model is loaded ------------------------------------------------


def read_model_config(source: str | None, storage: StorageConfig, revision: str | None = None) -> dict:
    """The model's config.json, read without loading the model: an unknown model fails here."""
    from janus_batch.model.tiny import ensure_tiny_model

    source = source or str(ensure_tiny_model())
    try:
        if is_s3(source):
            return json.loads(read_bytes(join(source, "config.json"), storage, 2**20))
        if Path(source).expanduser().is_dir():
            return json.loads((Path(source).expanduser() / "config.json").read_text())
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, "config.json", revision=revision)).read_text())
    except Exception as e:
        raise ValueError(f"cannot read the config of model {source!r}: {stages.describe(e)}") from None


def model_image_size(config: dict) -> int:
    """Understanding input size: HF format (vision_config.image_size) or DeepSeek's (.params.image_size)."""
    vision = config.get("vision_config", {})
    return int(vision.get("image_size") or vision.get("params", {}).get("image_size") or 384)


def count_input_rows(prepared: Prepared) -> int:
    """From the Parquet footers (or the file list of an image folder): nothing is read but metadata."""
    if isinstance(prepared.spec, CaptionJob) and prepared.spec.input.format == "images":
        return len(prepared.files)
    fs = prepared.spec.storage.filesystem(prepared.input_path)
    return sum(pq.read_metadata(f, filesystem=fs).num_rows for f in prepared.files)


def resume_key(spec: JobSpec) -> str:
    """The column that identifies an input row in the output (and says which inputs are done)."""
    if isinstance(spec, CaptionJob) and spec.input.format == "images":
        return schemas.PATH
    return schemas.ROW_HASH


def run_files(spec: JobSpec) -> RunFiles:
    key = resume_key(spec)
    return RunFiles(
        run_dir=fs_path(spec.run_dir),
        filesystem=spec.storage.filesystem(spec.run_dir),
        resume_key=key,
        resume_type=pa.string() if key == schemas.PATH else pa.uint64(),
    )


def reconcile_run(spec: JobSpec, prepared: Prepared) -> Reconciled:
    """The run folder made consistent, and what it holds (see janus_batch.io.commits)."""
    per_input = spec.outputs_per_input
    writer = writer_for(spec, prepared)
    return reconcile(writer.run, writer.task_reader(), lambda failed: 1 if failed else per_input)


# What may change when a run is resumed: how it runs, not what it makes.
RESUMABLE_CHANGES = ("resources.", "storage.", "lease.", "output.rows_per_file", "model.allow_pickle")


def check_resumable(spec: JobSpec, prepared: Prepared) -> None:
    """A rerun of a run id that has written data must make what the first attempts made: refuse a spec whose
    outputs would differ (another model, seed, input, format...) or input files changed in place, rather than mix
    two kinds of output. Checked before the run folder is reconciled, which judges the data by this spec."""
    files = run_files(spec)
    if not files.list(DATA):
        return
    changes = []
    try:
        stored = json.loads(read_bytes(join(spec.run_dir, "spec.json"), spec.storage, 2**24))
    except FileNotFoundError:
        stored = None
    if stored is not None:
        was, now = flatten(stored), flatten(spec.public_dump())
        changed = [k for k in sorted(was.keys() | now.keys()) if was.get(k) != now.get(k)]
        changes += [f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in changed if not k.startswith(RESUMABLE_CHANGES)]
    try:
        recorded = json.loads(read_bytes(join(spec.run_dir, "inputs.json"), spec.storage, 2**28))
    except FileNotFoundError:
        recorded = None
    if recorded is not None:
        changes += input_changes(recorded, input_fingerprint(prepared))
    if changes:
        raise ValueError(
            f"run {spec.run_id} has rows made with another spec or input ({'; '.join(changes)}): resume it with "
            f"the spec in {join(spec.run_dir, 'spec.json')} and the same input files, or start a new run id"
        )


def flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def cpu_shortfall(spec: JobSpec, cluster_cpus: float) -> str | None:
    """A warning when the job cannot start on the cluster as it is now: Ray would wait for CPUs that a fixed-size
    cluster never gets. Beside the model actors, Ray Data holds 1 CPU for listing the input files (not
    configurable)."""
    res = spec.resources
    low, _ = res.pool_size()
    need = low * res.cpus_per_actor + 1
    if need <= cluster_cpus:
        return None
    return (
        f"this run needs {need:g} CPUs to start ({low} model actors x {res.cpus_per_actor:g} CPU, 1 for Ray Data's "
        f"file listing) and the cluster has {cluster_cpus:g}: unless an autoscaler adds nodes it will wait forever. "
        "Lower --cpus-per-actor (0 is fine for GPU actors) or --actors."
    )


class Prepared:
    """What the driver learned about a job before running it."""

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


# Inputs with more files than this are fingerprinted by one digest (a change is still refused, unnamed).
FINGERPRINT_FILES_NAMED = 10_000


def input_fingerprint(prepared: Prepared) -> dict:
    """Size and modification time of every input file: a rerun refuses inputs changed in place, since resume keys
    are row positions (Parquet) or paths (image folders), not contents."""
    fs = prepared.spec.storage.filesystem(prepared.input_path)
    entries = {i.path: [i.size, i.mtime_ns] for i in fs.get_file_info(prepared.files)}
    digest = hashlib.sha256(json.dumps(sorted(entries.items())).encode()).hexdigest()
    named = entries if len(entries) <= FINGERPRINT_FILES_NAMED else None
    return {"files": len(entries), "digest": digest, "named": named}


def input_changes(was: dict, now: dict) -> list[str]:
    if was["digest"] == now["digest"]:
        return []
    if was.get("named") is None or now.get("named") is None:
        return [f"the input files changed ({was['files']} files then, {now['files']} now)"]
    old, new = was["named"], now["named"]
    changes = [f"input {p} added" for p in sorted(new.keys() - old.keys())]
    changes += [f"input {p} removed" for p in sorted(old.keys() - new.keys())]
    changes += [
        f"input {p} changed (size, time {old[p]} -> {new[p]})" for p in sorted(old) if p in new and old[p] != new[p]
    ]
    return changes


def resolve(spec: JobSpec) -> JobSpec:
    """The run id filled in and credentials resolved (a profile turned into keys) for the workers."""
    spec = spec.with_run_id()
    return spec.model_copy(update={"storage": spec.storage.resolved()})


def prepare(spec: JobSpec) -> Prepared:
    """Check input, model and output of a resolved spec; fail fast with a clear message. Writes nothing but the
    built-in prompts (once)."""
    if spec.run_id is None or "{" in spec.run_id:
        spec = resolve(spec)
    storage = spec.storage
    if isinstance(spec, SynthesizeJob):
        input_path = spec.input.path if spec.input else write_builtin_prompts(spec)
        files = readers.list_input_files(input_path, storage, ["parquet"])
        schema = readers.parquet_schema(input_path, storage)
        if spec.input:
            columns = {"prompt": spec.input.prompt_column, "id": spec.input.id_column}
            readers.require_columns(schema, columns, input_path)
    else:
        source = spec.input
        input_path = source.path
        if source.format == "images":
            files = readers.list_input_files(input_path, storage, readers.IMAGE_EXTENSIONS)
            schema = pa.schema([("bytes", pa.binary()), (schemas.PATH, pa.string())])
        else:
            files = readers.list_input_files(input_path, storage, ["parquet"])
            schema = readers.parquet_schema(input_path, storage)
            columns = {
                "image": source.image_column,
                "image URI": source.image_uri_column,
                "id": source.id_column,
                "question": source.question_column,
            }
            readers.require_columns(schema, columns, input_path)
    model_config = read_model_config(spec.model.source, storage, spec.model.revision)
    if spec.model.source is not None:  # pickle-only weights without the opt-in fail here, not in every actor
        try:
            check_weights(
                spec.model.source,
                allow_pickle=spec.model.allow_pickle,
                revision=spec.model.revision,
                storage_options=storage.storage_options(),
            )
        except (OSError, ValueError) as e:
            raise ValueError(f"model {spec.model.source!r}: {e}") from None
    return Prepared(spec, input_path, files, schema, model_config)


def record_run(prepared: Prepared) -> None:
    """spec.json and inputs.json, what a rerun is checked against."""
    spec = prepared.spec
    try:  # also proves the output location is writable
        write_bytes(join(spec.run_dir, "spec.json"), json.dumps(spec.public_dump(), indent=2).encode(), spec.storage)
    except OSError as e:
        raise OSError(f"cannot write to output {spec.run_dir}: {e}") from None
    write_bytes(join(spec.run_dir, "inputs.json"), json.dumps(input_fingerprint(prepared)).encode(), spec.storage)


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


# ---- the pipeline ------------------------------------------------------------------------------------


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
            gpu_memory_utilization=memory_share(res.gpu_memory_utilization, gpus),
        ),
        call_timeout_s=res.call_timeout_s,
    )


def build_pipeline(
    spec: JobSpec, prepared: Prepared | None = None, present: Reconciled | None = None, progress=None
) -> ray.data.Dataset:
    """The job's Dataset up to (not including) the write: finished output rows of the inputs that `present` (what
    the run's data hold, see reconcile_run) lacks, with the job's block-size settings on its context.
    `progress`: an optional ProgressCounter actor."""
    prepared = prepared or prepare(spec)
    spec = prepared.spec
    done = present.done if present is not None else None
    made_with = next(iter(present.weights_hashes)) if present is not None and present.weights_hashes else None
    leave_retries_to_the_store(ray.data.DataContext.get_current())  # before the datasets and the datasink copy it
    done_ref = ray.put(done) if done is not None and len(done) else None
    if isinstance(spec, SynthesizeJob):
        ds = synthesis_stages(spec, prepared, done_ref, made_with, progress)
    else:
        ds = understanding_stages(spec, prepared, done_ref, made_with, progress)
    ds.context.target_max_block_size = MAX_BLOCK_BYTES
    return ds


def drop_done(batch: pa.Table, *, resume_key: str, done: list) -> pa.Table:
    """Input rows whose outputs are not in the run's data yet. `done`: [ObjectRef of the done resume keys],
    wrapped in a list so that Ray passes the reference, fetched once per worker, not the keys per task."""
    return batch.filter(pc.invert(pc.is_in(batch[resume_key], value_set=ray.get(done[0]))))


def skip_done(ds: ray.data.Dataset, spec: JobSpec, done_ref, num_cpus: float) -> ray.data.Dataset:
    if done_ref is None:
        return ds
    return ds.map_batches(
        drop_done,
        fn_kwargs=dict(resume_key=resume_key(spec), done=[done_ref]),
        batch_format="pyarrow",
        num_cpus=num_cpus,
    )


def synthesis_stages(spec: SynthesizeJob, prepared: Prepared, done_ref, made_with, progress) -> ray.data.Dataset:
    """read prompts -> check -> generate (actors) -> encode."""
    storage = spec.storage
    cpu = dict(num_cpus=spec.resources.cpus_per_task, batch_format="pyarrow")
    map_args, engine_args = model_stage_args(spec, made_with)
    source = spec.input
    prompt_column = source.prompt_column if source else "prompt"
    id_column = source.id_column if source else "prompt_id"
    columns = [c for c in (prompt_column, id_column) if c]
    ds = readers.read_parquet(prepared.input_path, storage, columns, spec.resources.cpus_per_task)
    check_ids = source is None or source.check_duplicate_ids
    dups = readers.duplicate_ids(ds, id_column or prompt_column) if check_ids else set()
    ds = skip_done(ds, spec, done_ref, spec.resources.cpus_per_task)
    ds = ds.map_batches(
        stages.prepare_prompts,
        fn_kwargs=dict(prompt_column=prompt_column, id_column=id_column, duplicates=dups),
        **cpu,
    )
    params = dict(
        images_per_prompt=spec.images_per_prompt,
        cfg_weight=spec.cfg_weight,
        temperature=spec.temperature,
        top_k=spec.top_k,
        top_p=spec.top_p,
        seed=spec.seed,
        greedy=spec.greedy,
    )
    ds = ds.repartition(target_num_rows_per_block=spec.resources.batch_size)
    ds = ds.map_batches(stages.Synthesizer, fn_constructor_kwargs=dict(engine_args, params=params), **map_args)
    post = dict(
        image_format=spec.output.image_format,
        run_id=spec.run_id,
        seed=spec.seed,
        cfg_weight=spec.cfg_weight,
        temperature=spec.temperature,
        schema=schemas.SYNTHESIZE,
        progress=progress,
    )
    # batch_size=None: one block in, one block out, so a prompt's images stay in one block.
    ds = ds.map_batches(stages.encode_images, fn_kwargs=post, batch_size=None, **cpu)
    return ds


def understanding_stages(spec: CaptionJob, prepared: Prepared, done_ref, made_with, progress) -> ray.data.Dataset:
    """read images -> fetch, decode, preprocess -> caption / answer (actors) -> finish rows."""
    storage = spec.storage
    cpu = dict(num_cpus=spec.resources.cpus_per_task, batch_format="pyarrow")
    map_args, engine_args = model_stage_args(spec, made_with)
    source = spec.input
    key = resume_key(spec)
    if source.format == "images":
        passthrough = [schemas.PATH]
        ds = readers.read_image_folder(prepared.input_path, storage, spec.resources.cpus_per_task)
    else:
        passthrough = [c for c in (source.id_column, source.image_uri_column) if c]
        image_columns = [source.image_column, source.image_uri_column, source.question_column]
        columns = [c for c in [*image_columns, *passthrough] if c]
        ds = readers.read_parquet(prepared.input_path, storage, columns, spec.resources.cpus_per_task)
    dups = set()
    if source.id_column and source.check_duplicate_ids:
        dups = readers.duplicate_ids(ds, source.id_column)
    ds = skip_done(ds, spec, done_ref, spec.resources.cpus_per_task)
    ds = ds.map_batches(
        stages.prepare_images,
        fn_kwargs=dict(
            resume_key=key,
            image_column=source.image_column,
            image_uri_column=source.image_uri_column,
            id_column=source.id_column,
            question_column=source.question_column,
            passthrough=passthrough,
            duplicates=dups,
            image_size=prepared.image_size,
            storage=storage,
            max_image_bytes=source.max_image_bytes,
        ),
        batch_size=spec.resources.batch_size,
        **cpu,
    )
    params = dict(
        instruction=spec.instruction,
        max_new_tokens=spec.max_new_tokens,
        greedy=spec.greedy,
        temperature=spec.temperature,
        seed=spec.seed,
    )
    ds = ds.repartition(target_num_rows_per_block=spec.resources.batch_size)
    ds = ds.map_batches(
        stages.Describer,
        fn_constructor_kwargs=dict(engine_args, params=params, resume_key=key, text_column=spec.text_column),
        **map_args,
    )
    schema = output_schema(spec, prepared)
    ds = ds.map_batches(
        stages.finish_text_rows,
        fn_kwargs=dict(run_id=spec.run_id, schema=schema, progress=progress),
        batch_size=None,
        **cpu,
    )
    return ds


def output_schema(spec: JobSpec, prepared: Prepared) -> pa.Schema:
    if isinstance(spec, SynthesizeJob):
        return schemas.SYNTHESIZE
    source = spec.input
    if source.format == "images":
        return schemas.understanding_schema(schemas.PATH, [], spec.text_column)
    ids = [(c, prepared.schema.field(c).type) for c in (source.id_column, source.image_uri_column) if c]
    return schemas.understanding_schema(schemas.ROW_HASH, ids, spec.text_column)


def writer_for(spec: JobSpec, prepared: Prepared) -> RunWriter:
    text_column = "prompt" if isinstance(spec, SynthesizeJob) else spec.text_column
    return RunWriter(
        run_files(spec),
        spec.output.format,
        schema=output_schema(spec, prepared),
        rows_per_file=spec.output.rows_per_file,
        text_column=text_column,
        image_format=spec.output.image_format,
    )


# ---- running -----------------------------------------------------------------------------------------


@ray.remote(num_cpus=0)
class ProgressCounter:
    def __init__(self):
        self.rows = 0
        self.errors = 0

    def add(self, rows: int, errors: int) -> None:
        self.rows += rows
        self.errors += errors

    def get(self) -> tuple[int, int]:
        return self.rows, self.errors


class RunIncomplete(RuntimeError):
    """A run that ended without every input's rows in its data (summary.json says which): rerun its run id."""


def report_progress(counter, total: int, before: int, start: float, stop: threading.Event, every: float) -> None:
    """Print rows done (of about `total`: an input that fails makes one row), rows/s and ETA every `every`
    seconds until `stop` is set."""
    while not stop.wait(every):
        rows, errors = ray.get(counter.get.remote())
        elapsed = time.perf_counter() - start
        rate = rows / elapsed
        left = max(total - before - rows, 0)
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        print(f"[janus-batch] {before + rows}/{total} rows ({errors} errors), {rate:.2f} rows/s, ETA {eta}", flush=True)


def write_outputs(prepared: Prepared, before: Reconciled, inputs: int, start: float, progress_every_s: float) -> None:
    """Run the pipeline into the job's writer, reporting progress."""
    spec = prepared.spec
    counter = ProgressCounter.remote()
    ds = build_pipeline(spec, prepared, present=before, progress=counter)
    stop = threading.Event()
    total = before.rows + (inputs - len(before.done)) * spec.outputs_per_input
    thread = threading.Thread(
        target=report_progress, args=(counter, total, before.rows, start, stop, progress_every_s), daemon=True
    )
    thread.start()
    try:
        # CPU stages (read and write included) take cpus_per_task: on a small machine, 1 CPU each would
        # leave nothing beside the model actor.
        ds.write_datasink(writer_for(spec, prepared), ray_remote_args={"num_cpus": spec.resources.cpus_per_task})
    finally:
        stop.set()
        thread.join()
        ray.kill(counter)


def run(spec: JobSpec, progress_every_s: float = PROGRESS_EVERY_S) -> dict:
    """Run a job to completion (or resume it: same run id) and return its summary (also summary.json).
    Raises RunIncomplete (after writing summary.json) if some input has no output rows at the end."""
    if not ray.is_initialized():
        ray.init()
    started_at = datetime.now(timezone.utc)
    start = time.perf_counter()
    prepared = prepare(resolve(spec))  # a bad job fails here, before it takes the run's lease
    spec = prepared.spec
    with RunLease(spec.run_dir, spec.storage, spec.lease.ttl_s) as lease:
        lease.acquire(wait=spec.lease.wait)
        inputs = count_input_rows(prepared)
        check_resumable(spec, prepared)
        before = reconcile_run(spec, prepared)
        if len(before.weights_hashes) > 1:
            raise ValueError(
                f"run {spec.run_id} holds rows made by {len(before.weights_hashes)} different model weights "
                f"({', '.join(sorted(before.weights_hashes))}): start a new run id"
            )
        record_run(prepared)
        repaired = f" ({before.describe()})" if before.describe() else ""
        print(
            f"[janus-batch] {spec.kind} run {spec.run_id}: {inputs} inputs, {len(before.done)} of them already done "
            f"({before.rows} rows){repaired}",
            flush=True,
        )
        if len(before.done) < inputs:  # else a finished run: no model to load, nothing to write
            if warning := cpu_shortfall(spec, ray.cluster_resources().get("CPU", 0)):
                print(f"[janus-batch] warning: {warning}", flush=True)
            write_outputs(prepared, before, inputs, start, progress_every_s)
        after = reconcile_run(spec, prepared)
        wall = time.perf_counter() - start
        summary = summarize(spec, inputs, before, after, started_at, wall, prepared.prompt_format)
        write_bytes(join(spec.run_dir, "summary.json"), json.dumps(summary, indent=2).encode(), spec.storage)
    print(
        f"[janus-batch] {summary['status']}: {summary['rows_written']} rows written ({summary['errors_written']} "
        f"errors) in {summary['wall_time_s']:.1f} s; {summary['inputs_done']}/{inputs} inputs done -> {spec.run_dir}"
    )
    if summary["status"] != "succeeded":
        raise RunIncomplete(
            f"run {spec.run_id} ended with {inputs - summary['inputs_done']} of {inputs} inputs without output rows: "
            "rerun it with the same run id to finish it"
        )
    return summary


def summarize(
    spec: JobSpec,
    inputs: int,
    before: Reconciled,
    after: Reconciled,
    started_at: datetime,
    wall: float,
    prompt_format: str,
) -> dict:
    """summary.json: every count from the run's data (see reconcile_run), not from what the tasks reported."""
    missing = inputs - len(after.done)
    written = after.rows - before.rows
    return dict(
        run_id=spec.run_id,
        kind=spec.kind,
        status="succeeded" if missing <= 0 else "incomplete",
        output_dir=spec.run_dir,
        inputs=inputs,
        inputs_done=len(after.done),
        # An input makes outputs_per_input rows, or one row if it fails.
        expected_rows=after.rows + max(missing, 0) * spec.outputs_per_input,
        rows=after.rows,
        errors=after.errors,
        prompt_format=prompt_format,
        inputs_done_before=len(before.done),
        rows_before=before.rows,
        rows_written=written,
        errors_written=after.errors - before.errors,
        repaired_before=before.describe() or None,
        wall_time_s=round(wall, 3),
        rows_per_s=round(written / wall, 3),
        started_at=started_at.isoformat(),
        finished_at=datetime.now(timezone.utc).isoformat(),
        spec=spec.public_dump(),
    )


def describe_plan(spec: JobSpec) -> str:
    """The stages a job would run and their resources, for --dry-run (no I/O, no Ray)."""
    res = spec.resources
    low, high = res.pool_size()
    gpus = "auto (1 if the cluster has GPUs, else 0)" if res.gpus_per_actor is None else res.gpus_per_actor
    pool = f"{low}" if low == high else f"{low}-{high} (autoscaling)"
    run_dir = join(spec.output.path, spec.run_id or "<new run id>")
    if isinstance(spec, SynthesizeJob):
        source = spec.input.path if spec.input else "built-in prompts"
        steps = [
            f"read      Parquet prompts from {source} (resume key: row_hash)",
            f"prepare   check prompts and ids (CPU tasks, {res.cpus_per_task} CPU each)",
            f"generate  {spec.images_per_prompt} images per prompt, {res.batch_size} prompts per call "
            f"({pool} actors x {gpus} GPU, {res.cpus_per_actor} CPU)",
            f"encode    {spec.output.image_format} (CPU tasks)",
        ]
    else:
        steps = [
            f"read      {spec.input.format} from {spec.input.path}",
            f"prepare   fetch, decode, resize/pad images (CPU tasks, {res.cpus_per_task} CPU each)",
            f"{spec.task:<9} {res.batch_size} images per call, up to {spec.max_new_tokens} new tokens "
            f"({pool} actors x {gpus} GPU, {res.cpus_per_actor} CPU)",
        ]
    steps.append(f"write     {spec.output.format} to {run_dir}/data ({spec.output.rows_per_file} rows per file)")
    return "\n".join(f"  {i + 1}. {s}" for i, s in enumerate(steps))
