"""Build and run a job: read -> CPU preprocess -> model actors -> CPU postprocess -> write, resumable.

What every job shares lives here: the checks before a run, the run folder (record, resume checks, reconcile), the
lease, the write, progress and the summary. What differs between kinds (their input, resume key, output schema and
stages) is each kind's own, behind kinds.JobKind, found in registry.KINDS by the spec's `kind`.

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

import ray

from janus_batch import stages
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
from janus_batch.jobs.kinds import Build, Prepared
from janus_batch.jobs.registry import KINDS
from janus_batch.jobs.specs import JobSpec
from janus_batch.model.sources import check_weights
from janus_batch.progress import ProgressCounter, report_progress

# Ray Data splits blocks above this size; one model call's output must stay one block (see module doc).
MAX_BLOCK_BYTES = 2**30
PROGRESS_EVERY_S = 10.0


# ---- checks on the driver, before any model is loaded ------------------------------------------------


def read_model_config(source: str | None, storage: StorageConfig, revision: str | None = None) -> dict:
    """The model's config.json, read without loading the model: an unknown model fails here."""
    if source is None:  # the tiny default, written to the local cache if not there yet (this imports torch)
        from janus_batch.model.tiny import ensure_tiny_model

        source = str(ensure_tiny_model())
    try:
        if is_s3(source):
            return json.loads(read_bytes(join(source, "config.json"), storage, 2**20))
        if Path(source).expanduser().is_dir():
            return json.loads((Path(source).expanduser() / "config.json").read_text())
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, "config.json", revision=revision)).read_text())
    except Exception as e:
        raise ValueError(f"cannot read the config of model {source!r}: {stages.describe(e)}") from None


def run_files(spec: JobSpec) -> RunFiles:
    key = KINDS[spec.kind].resume_key(spec)
    return RunFiles(
        run_dir=fs_path(spec.run_dir),
        filesystem=spec.storage.filesystem(spec.run_dir),
        resume_key=key.name,
        resume_type=key.type,
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
    input_path, files, schema = KINDS[spec.kind].list_input(spec)
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


# ---- the pipeline ------------------------------------------------------------------------------------


def build_pipeline(
    spec: JobSpec, prepared: Prepared | None = None, present: Reconciled | None = None, progress=None
) -> ray.data.Dataset:
    """The job's Dataset up to (not including) the write: finished output rows of the inputs that `present` (what
    the run's data hold, see reconcile_run) lacks, with the job's block-size settings on its context.
    `progress`: an optional progress.ProgressCounter actor."""
    prepared = prepared or prepare(spec)
    spec = prepared.spec
    done = present.done if present is not None else None
    made_with = next(iter(present.weights_hashes)) if present is not None and present.weights_hashes else None
    leave_retries_to_the_store(ray.data.DataContext.get_current())  # before the datasets and the datasink copy it
    kind = KINDS[spec.kind]
    done_ref = ray.put(done) if done is not None and len(done) else None
    build = Build(prepared, kind.resume_key(spec).name, done_ref, made_with, progress)
    ds = None
    for stage in kind.stages(spec):
        ds = stage.apply(build, ds)
    ds.context.target_max_block_size = MAX_BLOCK_BYTES
    return ds


def writer_for(spec: JobSpec, prepared: Prepared) -> RunWriter:
    kind = KINDS[spec.kind]
    return RunWriter(
        run_files(spec),
        spec.output.format,
        schema=kind.output_schema(prepared),
        rows_per_file=spec.output.rows_per_file,
        text_column=kind.text_column(spec),
        image_format=spec.output.image_format,
    )


# ---- running -----------------------------------------------------------------------------------------


class RunIncomplete(RuntimeError):
    """A run that ended without every input's rows in its data (summary.json says which): rerun its run id."""


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
        inputs = KINDS[spec.kind].count_inputs(prepared)
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
        summary.update(KINDS[spec.kind].summary(prepared, run_files(spec)))
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
    """The stages a job would run and their resources, for --dry-run (no I/O, no Ray): the plan lines of the
    stages that build_pipeline runs, and the write."""
    run_dir = join(spec.output.path, spec.run_id or "<new run id>")
    steps = [f"{stage.name:<9} {stage.plan}" for stage in KINDS[spec.kind].stages(spec)]
    steps.append(f"write     {spec.output.format} to {run_dir}/data ({spec.output.rows_per_file} rows per file)")
    return "\n".join(f"  {i + 1}. {s}" for i, s in enumerate(steps))
