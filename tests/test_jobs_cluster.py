"""The job scripts as users run them: a driver killed mid-run and rerun with the same run id (exactly one
row per expected image at the end), and `ray job submit` to a `ray start --head` cluster."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray

from janus_batch.io.storage import fs_path
from tests.helpers import free_ports
from tests.jobs_data import read_parquet_dir, write_parquet

pytest_plugins = ["tests.jobs_fixtures"]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def synthesize_args(source: str, output: str, storage, model_dir, run_id: str) -> list[str]:
    # On 2 CPUs a resumed run holds Ray Data's checkpoint filter actor (1 CPU) and needs its file listing
    # task (1 CPU) beside the model actor: the model actor gets 0 CPUs here.
    return [
        "pipelines/synthesize.py",
        *("--input", source, "--output", output, "--run-id", run_id, "--model", str(model_dir)),
        *("--images-per-prompt", "2", "--batch-size", "1", "--rows-per-file", "1"),
        *("--actors", "1", "--gpus-per-actor", "0", "--cpus-per-actor", "0", "--cpus-per-task", "0.25"),
        *("--s3-endpoint", storage.endpoint_url, "--s3-region", storage.region),
    ]


def aws_env(storage) -> dict[str, str]:
    # Credentials the AWS way: environment variables, read by pyarrow / botocore on every node.
    return {
        "AWS_ACCESS_KEY_ID": storage.key.get_secret_value(),
        "AWS_SECRET_ACCESS_KEY": storage.secret.get_secret_value(),
    }


def committed_files(data_dir: str, storage) -> int:
    fs = storage.filesystem(data_dir)
    infos = fs.get_file_info(pafs.FileSelector(fs_path(data_dir), allow_not_found=True))
    return sum(1 for i in infos if i.path.endswith(".parquet") and ".tmp-" not in i.path)


def test_killed_job_resumes_exactly_once(ray_cluster, storage, bucket, tiny_model_dir, tmp_path):
    prompts = {f"p{i:02d}": f"prompt number {i}, a house by a lake" for i in range(10)}
    source = write_parquet(
        pa.table({"prompt_id": list(prompts), "prompt": list(prompts.values())}), f"{bucket}/in/p.parquet", storage
    )
    run_dir = f"{bucket}/out/k"
    # Keys in the job file: the session cluster's workers do not see this driver's environment.
    config = tmp_path / "job.yaml"
    storage_keys = {"key": storage.key.get_secret_value(), "secret": storage.secret.get_secret_value()}
    # A short lease: the killed driver's lasts until it expires, and the rerun waits for it (--wait-for-lease).
    spec = {"storage": storage_keys, "input": {"check_duplicate_ids": False}, "lease": {"ttl_s": 3}}
    config.write_text(json.dumps(spec))
    args = synthesize_args(source, f"{bucket}/out", storage, tiny_model_dir, "k")
    command = [sys.executable, *args, "--config", str(config)]
    # The driver joins the session's cluster; killing it kills its job's tasks and actors.
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while committed_files(f"{run_dir}/data", storage) < 2:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no output committed in time"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
    fs = storage.filesystem(run_dir)
    assert fs.get_file_info(fs_path(f"{run_dir}/summary.json")).type == pafs.FileType.NotFound  # killed mid-run
    time.sleep(3)  # let Ray reap the dead driver's workers before the rerun reads the run folder

    second = subprocess.run(
        [*command, "--wait-for-lease"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    rows = read_parquet_dir(f"{run_dir}/data", storage).select(["key", "prompt_id", "sample_index", "error"])
    pairs = [(r["prompt_id"], r["sample_index"]) for r in rows.to_pylist()]
    assert sorted(pairs) == sorted((p, i) for p in prompts for i in range(2))  # all there, none twice
    assert len(set(rows["key"].to_pylist())) == 20 and rows["error"].null_count == 20
    with fs.open_input_stream(fs_path(f"{run_dir}/summary.json")) as f:
        summary = json.loads(f.read())
    assert summary["rows_before"] >= 2 and summary["rows_written"] == 20 - summary["rows_before"]

    # Rerunning a finished run writes nothing more.
    third = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert read_parquet_dir(f"{run_dir}/data", storage).num_rows == 20


@pytest.fixture
def head_node():
    """A `ray start --head` cluster of its own (own temp dir and ports), with the dashboard for job
    submission and token auth disabled on both ends. Yields the dashboard address."""
    temp = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, client_server, dashboard_agent = free_ports(4)
    ports = {
        "--port": gcs,
        "--dashboard-port": dashboard,
        "--ray-client-server-port": client_server,
        "--dashboard-agent-listen-port": dashboard_agent,
    }
    start = [str(VENV_BIN / "ray"), "start", "--head", "--num-cpus=2", "--include-dashboard=true"]
    start += ["--dashboard-host=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats"]
    start += [f"{flag}={port}" for flag, port in ports.items()]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        # `ray stop` would stop every Ray on this machine: end this cluster's processes only, those naming its
        # temp dir and everything they started. Ray's agents and workers rename themselves (ray::DashboardAgent):
        # left behind, the orphaned dashboard agent spun a core for a minute.
        procs = {p for p in psutil.process_iter(["cmdline"]) if temp in " ".join(p.info["cmdline"] or [])}
        for p in list(procs):
            with contextlib.suppress(psutil.NoSuchProcess):
                procs.update(p.children(recursive=True))
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        _, alive = psutil.wait_procs(procs, timeout=30)
        assert not alive, f"processes of the test cluster outlived SIGKILL: {alive}"
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit(head_node, storage, bucket, tiny_model_dir):
    address, env = head_node
    source = write_parquet(
        pa.table({"prompt_id": ["a", "b"], "prompt": ["a red fox", "a blue whale"]}), f"{bucket}/in/p.parquet", storage
    )
    runtime_env = json.dumps({"env_vars": aws_env(storage)})
    submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--working-dir", "."]
    submit += ["--runtime-env-json", runtime_env, "--", "python"]
    submit += synthesize_args(source, f"{bucket}/out", storage, tiny_model_dir, "submitted")
    result = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "succeeded" in result.stdout
    table = read_parquet_dir(f"{bucket}/out/submitted/data", storage)
    assert sorted(zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist(), strict=True)) == [
        ("a", 0),
        ("a", 1),
        ("b", 0),
        ("b", 1),
    ]


def test_embedded_default_runs_with_no_arguments(tmp_path):
    """`python pipelines/synthesize.py`: tiny model, built-in prompts, a local Ray of its own, ./outputs/."""
    env = dict(os.environ, JANUS_BATCH_CACHE=str(tmp_path / "cache"))
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, str(REPO / "pipelines/synthesize.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["inputs"], summary["rows_written"], summary["errors"]) == (4, 64, 0)
    table = pa.concat_tables(pq.read_table(f) for f in sorted((run_dir / "data").glob("*.parquet")))
    assert table.num_rows == 64 and table["image"].null_count == 0
