"""Nothing lost or duplicated, on the session's Ray cluster and the S3-protocol server: runs damaged by hand and
rerun once, inputs changed between attempts, two drivers on one run id."""

from __future__ import annotations

import collections
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray

from janus_batch.io.commits import RunFiles, task_of
from janus_batch.io.lease import LeaseHeld
from janus_batch.io.storage import StorageConfig, fs_path
from janus_batch.jobs import SynthesizeJob, run
from janus_batch.model.tiny import write_tiny_model
from tests.fault_proxy import FaultProxy
from tests.jobs_data import synth_spec, write_parquet

pytest_plugins = ["tests.jobs_fixtures"]
REPO = Path(__file__).resolve().parents[1]


def prompts_table(n: int) -> pa.Table:
    return pa.table(
        {"prompt_id": [f"p{i:02d}" for i in range(n)], "prompt": [f"a house by a lake, {i}" for i in range(n)]}
    )


def output_pairs(run_dir: str, storage) -> collections.Counter:
    """(prompt_id, sample_index) of every output row, counted, from the data files (any format)."""
    fs = storage.filesystem(run_dir)
    listed = RunFiles(fs_path(run_dir), fs, "row_hash", pa.uint64()).list("data")
    pairs = collections.Counter()
    for relative in listed:
        path = f"{fs_path(run_dir)}/{relative}"
        if relative.endswith(".tar"):
            with fs.open_input_stream(path) as f, tarfile.open(fileobj=io.BytesIO(f.read())) as tar:
                for m in tar:
                    if m.name.endswith(".json"):
                        row = json.loads(tar.extractfile(m).read())
                        pairs[row["prompt_id"], row["sample_index"]] += 1
        else:
            for row in pq.read_table(path, columns=["prompt_id", "sample_index"], filesystem=fs).to_pylist():
                pairs[row["prompt_id"], row["sample_index"]] += 1
    return pairs


# One format end to end ('files' has the most parts); tests/test_commits.py damages every format without Ray.
@pytest.mark.parametrize("output_format", ["files"])
def test_a_damaged_run_ends_exact_after_one_rerun(ray_cluster, storage, bucket, tiny_model_dir, output_format):
    source = write_parquet(prompts_table(6), f"{bucket}/in/p.parquet", storage)
    spec = SynthesizeJob.model_validate(
        synth_spec(
            source,
            f"{bucket}/out",
            storage,
            tiny_model_dir,
            run_id="d",
            input={"path": source, "check_duplicate_ids": False},
            output={"format": output_format, "rows_per_file": 2},
            resources={"batch_size": 1},
        )
    )
    expected = collections.Counter({(f"p{i:02d}", s): 1 for i in range(6) for s in range(2)})
    first = run(spec)
    assert first["status"] == "succeeded" and output_pairs(f"{bucket}/out/d", storage) == expected

    run_dir = f"{bucket}/out/d"
    fs = storage.filesystem(run_dir)
    files = RunFiles(fs_path(run_dir), fs, "row_hash", pa.uint64())
    mains = sorted(r for r in files.list("data") if r.endswith((".parquet", ".tar")))
    assert len(mains) == 6
    files.delete([mains[0]])  # a data file lost: its prompt must be made again
    files.delete(list(files.list("_index")))  # the whole index gone: nothing may be made twice
    if output_format == "files":  # an image gone from another task: that prompt is made again too
        images = [r for r in files.list("images") if task_of(r) == task_of(mains[1]) and r.endswith("1.png")]
        files.delete(images[:1])
    with fs.open_output_stream(f"{fs_path(run_dir)}/data/{task_of(mains[0])}x.parquet.tmp-0") as f:
        f.write(b"half a file")  # a stale partial file of a crashed writer

    second = run(spec)
    remade = 2 if output_format == "files" else 1
    assert output_pairs(run_dir, storage) == expected  # all there, none twice
    assert second["status"] == "succeeded" and second["rows_written"] == 2 * remade
    assert (second["inputs_done_before"], second["rows"], second["inputs_done"]) == (6 - remade, 12, 6)
    assert not any(".tmp-" in r for r in files.list("data"))


def test_changed_inputs_outputs_and_weights_are_refused_on_rerun(ray_cluster, storage, tiny_model_dir, tmp_path):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    source = write_parquet(prompts_table(2), str(tmp_path / "in/p.parquet"), storage)
    spec = synth_spec(
        source,
        str(tmp_path / "out"),
        storage,
        model,
        run_id="c",
        output={"format": "files", "rows_per_file": 2},
        resources={"batch_size": 1},  # a data file per prompt
    )
    run(SynthesizeJob.model_validate(spec))
    with pytest.raises(ValueError, match=r"sampling.images_per_prompt 2 -> 3"):
        run(SynthesizeJob.model_validate(dict(spec, sampling={"images_per_prompt": 3})))

    # A prompt inserted at the top: row positions, and so resume keys, now name other prompts.
    original, stat = Path(source).read_bytes(), os.stat(source)
    table = pa.concat_tables([pa.table({"prompt_id": ["new"], "prompt": ["a new prompt"]}), prompts_table(2)])
    pq.write_table(table, source)
    with pytest.raises(ValueError, match=rf"input {source} changed \(size, time"):
        run(SynthesizeJob.model_validate(spec))
    Path(source).write_bytes(original)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    # The model overwritten in place, and a prompt left to make: its actor refuses the other weights.
    files = RunFiles(str(tmp_path / "out/c"), pafs.LocalFileSystem(), "row_hash", pa.uint64())
    files.delete([sorted(r for r in files.list("data"))[0]])
    write_tiny_model(model, image_size=64, seed=1)
    with pytest.raises(Exception, match="has other weights .* than those that made this run's rows"):
        run(SynthesizeJob.model_validate(spec))


def driver(spec: SynthesizeJob, tmp_path: Path, name: str, s3_server) -> subprocess.Popen:
    """A driver process of its own on the session's cluster, running `spec`."""
    config = tmp_path / f"{name}.json"
    data = spec.model_dump(mode="json")
    data["storage"].update(key=s3_server.key, secret=s3_server.secret)  # masked in dumps
    config.write_text(json.dumps(data))
    code = (
        "import sys; from janus_batch.jobs import SynthesizeJob, run; "
        f"run(SynthesizeJob.model_validate_json(open({str(config)!r}).read()))"
    )
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


# On S3; tests/test_lease.py races real processes for the lease on local folders too.
@pytest.mark.parametrize("where", ["s3"])
def test_a_second_driver_on_a_live_run_refuses_or_waits(
    ray_cluster, storage, bucket, tiny_model_dir, tmp_path, where, s3_server
):
    root = str(tmp_path) if where == "local" else bucket
    out, source = f"{root}/out", write_parquet(prompts_table(8), f"{root}/in/p.parquet", storage)
    spec = SynthesizeJob.model_validate(
        synth_spec(
            source, out, storage, tiny_model_dir, run_id="two", input={"path": source, "check_duplicate_ids": False}
        )
    )
    first = driver(spec, tmp_path, "first", s3_server)
    lease = f"{out}/two/_lease.json"
    fs = storage.filesystem(lease)
    deadline = time.monotonic() + 120
    while fs.get_file_info(fs_path(lease)).size in (None, 0):  # not taken yet (local: empty when free)
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.1)
    with pytest.raises(LeaseHeld, match="is being run by another driver"):
        run(spec)
    waited = run(spec.model_copy(update={"lease": spec.lease.model_copy(update={"wait": True})}))
    assert first.wait(timeout=240) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert waited["rows_written"] == 0 and waited["status"] == "succeeded"  # the first driver made everything
    assert output_pairs(f"{out}/two", storage) == collections.Counter(
        {(f"p{i:02d}", s): 1 for i in range(8) for s in range(2)}
    )


@pytest.mark.parametrize(
    ("output_format", "window"),
    [("webdataset", "after the data file, before its index"), ("files", "after the images, before the data file")],
)
def test_a_driver_killed_in_the_commit_window_then_a_failing_cleanup_then_a_resume(
    ray_cluster, storage, s3_server, tiny_model_dir, tmp_path, output_format, window
):
    """SIGKILL while a write task is held in its commit window by failing PUTs (the S3 copy-then-delete commit of
    Ray's checkpoint lost rows here); for 'files', then a rerun whose cleanup DELETEs fail (it must stop, losing
    nothing); then a rerun that ends exact."""
    bucket = s3_server.make_bucket()
    with FaultProxy(s3_server.endpoint_url, seed=1) as proxy:
        # A short retry budget: the faults below are meant, and each must end its call in seconds.
        faulty = StorageConfig.model_validate(
            {
                **storage.model_dump(),
                "key": s3_server.key,
                "secret": s3_server.secret,
                "endpoint_url": proxy.url,
                "retries": {"attempts": 3, "max_seconds": 10},
            }
        )
        source = write_parquet(prompts_table(8), f"{bucket}/in/p.parquet", storage)
        spec = SynthesizeJob.model_validate(
            synth_spec(
                source,
                f"{bucket}/out",
                faulty,
                tiny_model_dir,
                run_id="w",
                input={"path": source, "check_duplicate_ids": False},
                output={"format": output_format, "rows_per_file": 2},
                resources={"batch_size": 1},
                lease={"ttl_s": 3, "wait": True},
            )
        )
        held = r"/_index/" if output_format == "webdataset" else r"/data/[^/]+\.parquet"
        first = driver(spec, tmp_path, "first", s3_server)
        deadline = time.monotonic() + 240
        while proxy.count("PUT", r"/_index/") < 2:  # two tasks committed
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.05)
        proxy.set(rate=1.0, kinds=["slowdown"], methods={"PUT"}, path_regex=held)
        while proxy.count("PUT", held, faulted=True) < 1:  # a task is in the window, its PUT failing
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.05)
        first.kill()
        first.wait()
        time.sleep(3)  # Ray reaps the dead driver's workers

        if output_format == "files":  # images without their data file are left over: the cleanup cannot delete them
            proxy.set(rate=1.0, kinds=["slowdown", "reset"], methods={"DELETE"})
            with pytest.raises(OSError):
                run(spec)
            assert proxy.count("DELETE", r"/images/", faulted=True) > 0
        proxy.set(rate=0.0)
        summary = run(spec)
    assert summary["status"] == "succeeded" and summary["inputs_done"] == 8
    assert output_pairs(f"{bucket}/out/w", storage) == collections.Counter(
        {(f"p{i:02d}", s): 1 for i in range(8) for s in range(2)}
    )
