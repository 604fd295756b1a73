"""Storage under faults: the fault proxy itself, which errors count as transient, bounded retries in pyarrow and
s3fs, and jobs through a flaky store (20% faults: exact; an outage mid-run: a clear stop within the budget, then
an exact resume; a store down from the start: a clear stop, nothing written)."""

from __future__ import annotations

import contextlib
import errno
import http.client
import re
import runpy
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
import s3fs
import yaml
from botocore.exceptions import ClientError, EndpointConnectionError

from janus_batch.io.storage import (
    RetryPolicy,
    StorageConfig,
    StoreUnavailable,
    fs_path,
    is_transient_storage_error,
    read_bytes,
    write_bytes,
)
from janus_batch.jobs import SynthesizeJob, run
from janus_batch.jobs.cli import failure_message
from tests.fault_proxy import FaultProxy
from tests.jobs_data import SMALL_RESOURCES, read_parquet_dir, sample_images, synth_spec, write_parquet

pytest_plugins = ["tests.jobs_fixtures"]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(s3_server.endpoint_url, seed=0) as proxy:
        yield proxy


def through(proxy: FaultProxy, storage: StorageConfig, **retries) -> StorageConfig:
    """`storage`, pointed at the proxy, with a retry policy of its own."""
    return storage.model_copy(update={"endpoint_url": proxy.url, "retries": RetryPolicy(**retries)})


def raw_request(proxy: FaultProxy, method: str, path: str, body: bytes | None = None) -> http.client.HTTPResponse:
    """A plain, unsigned HTTP request (moto lets anyone read what was written public-read)."""
    connection = http.client.HTTPConnection("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]), timeout=10)
    connection.request(method, path, body=body, headers={"x-amz-acl": "public-read"} if method == "PUT" else {})
    response = connection.getresponse()
    response.data = response.read()
    connection.close()
    return response


# ---- the proxy -------------------------------------------------------------------------------------------


def test_fault_proxy_injects_each_kind_where_told(proxy, bucket):
    name = bucket.removeprefix("s3://")
    assert raw_request(proxy, "PUT", f"/{name}/k.txt", b"x" * 10_000).status == 200  # forwarded, body intact
    assert raw_request(proxy, "GET", f"/{name}/k.txt").data == b"x" * 10_000

    proxy.set(rate=1.0, kinds=["slowdown"], methods={"GET"}, path_regex=r"k\.txt")
    response = raw_request(proxy, "GET", f"/{name}/k.txt")
    assert response.status == 503 and b"<Code>SlowDown</Code>" in response.data
    assert raw_request(proxy, "HEAD", f"/{name}/k.txt").status == 200  # another method: forwarded
    assert raw_request(proxy, "GET", f"/{name}/other.txt").status == 404  # another path: forwarded

    proxy.set(rate=1.0, kinds=["reset"])
    with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
        raw_request(proxy, "GET", f"/{name}/k.txt")
    proxy.set(rate=1.0, kinds=["reset_mid"])
    connection = http.client.HTTPConnection("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]), timeout=10)
    connection.request("GET", f"/{name}/k.txt")
    response = connection.getresponse()  # the status and headers arrive, then half the body, then a reset
    assert (response.status, response.getheader("Content-Length")) == (200, "10000")
    with pytest.raises((http.client.IncompleteRead, ConnectionResetError)):
        response.read()
    connection.close()

    proxy.set(rate=1.0, kinds=["slowdown"], max_faults=2)
    assert [raw_request(proxy, "GET", f"/{name}/k.txt").status for _ in range(3)] == [503, 503, 200]
    assert proxy.faults == 5 and proxy.requests == 10
    assert proxy.count("GET", r"k\.txt", faulted=True) == 5 and proxy.count("PUT") == 1


def test_fault_proxy_is_deterministic_for_a_seed(s3_server, bucket):
    def kinds(seed: int) -> list[str | None]:
        with FaultProxy(s3_server.endpoint_url, seed=seed) as proxy:
            proxy.set(rate=0.5)
            for _ in range(20):
                with contextlib.suppress(OSError, http.client.HTTPException):
                    raw_request(proxy, "GET", f"/{bucket.removeprefix('s3://')}/")
            return [kind for _, _, kind in proxy.log]

    assert kinds(1) == kinds(1) != kinds(2)
    assert {"slowdown", "reset", "reset_mid", None} == set(kinds(1))


# ---- which errors are retried ----------------------------------------------------------------------------


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def test_transient_storage_errors_are_the_network_throttling_and_5xx(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    local = []
    for path in [tmp_path / ("x" * 5000), loop, tmp_path / "missing"]:
        try:
            path.read_bytes()
        except OSError as e:
            local.append(e)
    assert [e.errno for e in local] == [errno.ENAMETOOLONG, errno.ELOOP, errno.ENOENT]

    with_cause = OSError(errno.EBUSY, "Service Unavailable")  # how s3fs reports a 503 (botocore's error as cause)
    with_cause.__cause__ = client_error("503", 503)
    transient = [
        OSError("When reading 'k': AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate."),
        OSError("AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body."),
        OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 56, Recv failure"),
        OSError("AWS Error UNKNOWN (HTTP status 400) during GetObject operation: ExceptionName: ExpiredToken Message"),
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        TimeoutError("timed out"),
        OSError(errno.ETIMEDOUT, "Connection timed out"),
        client_error("SlowDown", 503),
        client_error("InternalError", 500),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
        with_cause,
        StoreUnavailable("read s3://b/k: ..."),
    ]
    permanent = [
        *local,
        FileNotFoundError("no such file: s3://b/k"),
        PermissionError("AccessDenied"),
        OSError("When reading 'k': AWS Error ACCESS_DENIED during GetObject operation: Access Denied"),
        OSError("AWS Error UNKNOWN (HTTP status 404) during HeadObject operation: No response body."),
        OSError("AWS Error NO_SUCH_BUCKET during ListObjectsV2 operation: The specified bucket does not exist"),
        client_error("AccessDenied", 403),
        client_error("NoSuchKey", 404),
        ValueError("file of 9 bytes exceeds the limit of 3"),
    ]
    assert [is_transient_storage_error(e) for e in transient] == [True] * len(transient)
    assert [is_transient_storage_error(e) for e in permanent] == [False] * len(permanent)


def test_retry_policy_gives_the_sdks_the_attempts_whose_waits_fit():
    # Standard retry mode waits up to 1, 2, 4, 8, 16, 20, 20... s before retries 1, 2, 3...
    assert RetryPolicy().sdk_attempts(180) == 10  # 111 s of waits at most
    assert RetryPolicy(attempts=10).sdk_attempts(10) == 4  # 1 + 2 + 4 s; a fourth wait (8 s) would pass 10 s
    assert RetryPolicy(attempts=3).sdk_attempts(1000) == 3
    assert RetryPolicy(attempts=5).sdk_attempts(0.5) == 1
    options = StorageConfig(retries={"attempts": 10, "max_seconds": 50, "timeout_s": 7}).storage_options()
    assert options["config_kwargs"] == {  # s3fs tries up to 5 times around botocore: 10 s each
        "retries": {"mode": "standard", "total_max_attempts": 4},
        "connect_timeout": 7,
        "read_timeout": 7,
    }


# ---- clients through the proxy ---------------------------------------------------------------------------


def test_pyarrow_and_s3fs_ride_out_scattered_faults(proxy, storage, bucket):
    flaky = through(proxy, storage, attempts=10, max_seconds=60)
    fs = flaky.filesystem(bucket)
    s3 = s3fs.S3FileSystem(**flaky.storage_options(), skip_instance_cache=True)
    table = pa.table({"i": list(range(1000)), "s": [f"row {i}" for i in range(1000)]})
    proxy.set(rate=0.3)
    for i in range(4):
        write_bytes(f"{bucket}/bytes/{i}.bin", bytes([i]) * 70_000, flaky)
        pq.write_table(table, fs_path(f"{bucket}/tables/{i}.parquet"), filesystem=fs)
        s3.pipe(f"{bucket}/s3fs/{i}.bin", bytes([i]) * 70_000)
    for i in range(4):
        assert read_bytes(f"{bucket}/bytes/{i}.bin", flaky, 10**6) == bytes([i]) * 70_000
        assert pq.read_table(fs_path(f"{bucket}/tables/{i}.parquet"), filesystem=fs).equals(table)
        assert s3.cat(f"{bucket}/s3fs/{i}.bin") == bytes([i]) * 70_000
    listing = fs.get_file_info(pafs.FileSelector(fs_path(f"{bucket}/tables")))
    assert len(listing) == 4
    assert proxy.faults >= 10 and {kind for *_, kind in proxy.log} == {"slowdown", "reset", "reset_mid", None}


def test_a_store_down_fails_each_call_within_its_budget_naming_the_store(proxy, storage, bucket):
    flaky = through(proxy, storage, attempts=3, max_seconds=4)
    write_bytes(f"{bucket}/small.bin", b"data", flaky)  # a 503's XML body does not fit its ranged read
    write_bytes(f"{bucket}/large.bin", b"d" * 100_000, flaky)
    for name, kind in [("small", "slowdown"), ("large", "reset"), ("large", "reset_mid")]:
        proxy.set(rate=1.0, kinds=[kind], methods={"GET"})
        before, start = proxy.count("GET"), time.monotonic()
        with pytest.raises(StoreUnavailable) as error:
            read_bytes(f"{bucket}/{name}.bin", flaky, 10**6)
        assert time.monotonic() - start < 4 + 3  # the budget, and the SDK's waits (1 + 2 s) of the last try
        assert proxy.count("GET") - before >= 3, kind
        message = str(error.value)
        assert message.startswith(f"read {bucket}/{name}.bin: AWS Error ") and "during GetObject operation" in message
        assert re.search(rf"\(S3 store {proxy.url}; tried [23] times in \d+\.\d s\)$", message)

    proxy.set(rate=1.0, kinds=["slowdown"])
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"write .*(SLOW_DOWN|503)"):
        write_bytes(f"{bucket}/other.bin", b"data", flaky)
    assert time.monotonic() - start < 4 + 3
    start = time.monotonic()
    with pytest.raises(OSError):
        s3fs.S3FileSystem(**flaky.storage_options(), skip_instance_cache=True).cat(f"{bucket}/large.bin")
    assert time.monotonic() - start < 4 + 3


def test_permanent_errors_are_not_retried(proxy, storage, bucket):
    flaky = through(proxy, storage, attempts=5, max_seconds=60)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_bytes(f"{bucket}/missing.bin", flaky, 100)
    with pytest.raises(FileNotFoundError):
        read_bytes("s3://no-such-bucket-here/k.bin", flaky, 100)
    with pytest.raises(FileNotFoundError):
        s3fs.S3FileSystem(**flaky.storage_options(), skip_instance_cache=True).cat(f"{bucket}/missing.bin")
    assert time.monotonic() - start < 2 and proxy.faults == 0
    assert proxy.requests <= 6  # one request each (s3fs may look twice), never five


def test_a_store_not_listening_fails_within_the_budget(storage):
    down = storage.model_copy(update={"endpoint_url": "http://127.0.0.1:9", "retries": RetryPolicy(attempts=2)})
    start = time.monotonic()  # nothing listens on port 9: connections refused, a transient fault
    with pytest.raises(StoreUnavailable, match=r"read s3://b/k: .*NETWORK_CONNECTION.*S3 store http://127.0.0.1:9"):
        read_bytes("s3://b/k", down, 100)
    assert time.monotonic() - start < 1 + 2


# ---- the line a failed job prints ------------------------------------------------------------------------


def raise_store_unavailable(batch):
    try:
        raise OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.")
    except OSError as e:
        raise StoreUnavailable(
            "read s3://b/img/1.png: AWS Error SLOW_DOWN ... (S3 store http://s3.local; tried 3 times)"
        ) from e


def raise_pyarrow_error(batch):
    raise OSError("When uploading part for key 'k' in bucket 'b': AWS Error SLOW_DOWN during UploadPart operation: x")


@ray.remote
class FailsToStart:
    def __init__(self):
        raise FileNotFoundError("no config.json under s3://b/model")

    def ping(self) -> None:
        pass


def test_a_failed_job_reports_its_own_error_not_rays(ray_cluster):
    storage = StorageConfig(endpoint_url="http://s3.local")

    def message_of(fn) -> str:
        with pytest.raises(Exception) as error:
            ray.data.range(2).map_batches(fn).materialize()
        return failure_message(error.value, storage)

    # The outermost error our code raised (with the path and the store), not what it wrapped, nor Ray's wrapper.
    assert message_of(raise_store_unavailable) == (
        "StoreUnavailable: read s3://b/img/1.png: AWS Error SLOW_DOWN ... (S3 store http://s3.local; tried 3 times)"
    )
    assert message_of(raise_pyarrow_error) == (  # pyarrow's own text names the call: the store is added
        "OSError: When uploading part for key 'k' in bucket 'b': AWS Error SLOW_DOWN during UploadPart operation: x "
        "(S3 store http://s3.local)"
    )
    with pytest.raises(ray.exceptions.RayActorError) as error:  # a model actor that cannot load its model
        ray.get(FailsToStart.remote().ping.remote())
    assert failure_message(error.value, storage) == "FileNotFoundError: no config.json under s3://b/model"
    assert failure_message(ValueError("input path does not exist: s3://b/x"), storage) == (
        "input path does not exist: s3://b/x"
    )


# ---- jobs through a flaky store ----------------------------------------------------------------------------


# The run's lease (jobs/lease.py: botocore, its own retries) is spared: a lease left behind by a driver that could
# not give it back would make the next run wait for it to expire.
NOT_THE_LEASE = r"^(?!.*_lease\.json)"


def proxied(proxy: FaultProxy, s3_server, **retries) -> dict:
    """The `storage:` block of a job file for the session's S3 server behind `proxy` (AWS's key names)."""
    return {
        "endpoint_url": proxy.url,
        "region_name": s3_server.region,
        "aws_access_key_id": s3_server.key,
        "aws_secret_access_key": s3_server.secret,
        "retries": retries,
    }


def run_cli(script: str, config: dict, tmp_path: Path, monkeypatch, *args: str) -> str | None:
    """`python pipelines/SCRIPT --config JOB.yaml ARGS` in this process: the message it exits with (None: none)."""
    path = tmp_path / f"{script}.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(sys, "argv", [script, "--config", str(path), *args])
    try:
        runpy.run_path(str(REPO / "pipelines" / script), run_name="__main__")
    except SystemExit as e:
        return e.code
    return None


def prompts_input(bucket: str, storage: StorageConfig, n: int) -> str:
    prompts = pa.table(
        {"prompt_id": [f"p{i}" for i in range(n)], "prompt": [f"a lighthouse, take {i}" for i in range(n)]}
    )
    return write_parquet(prompts, f"{bucket}/in/prompts.parquet", storage)


def test_synthesis_through_20_percent_faults_is_exact(ray_cluster, proxy, storage, bucket, tiny_model_dir):
    source = prompts_input(bucket, storage, 6)
    flaky = through(proxy, storage, attempts=8, max_seconds=60)
    spec = synth_spec(source, f"{bucket}/out", flaky, tiny_model_dir, run_id="f20", output={"rows_per_file": 2})
    proxy.set(rate=0.2)
    summary = run(SynthesizeJob.model_validate(spec))
    proxy.set(rate=0.0)
    rows = read_parquet_dir(f"{bucket}/out/f20/data", storage).select(["prompt_id", "sample_index", "error"])
    pairs = sorted((r["prompt_id"], r["sample_index"]) for r in rows.to_pylist())
    assert pairs == sorted((f"p{i}", s) for i in range(6) for s in range(2))  # every image, once
    assert rows["error"].null_count == 12 and summary["status"] == "succeeded"
    assert proxy.faults >= 10 and {kind for *_, kind in proxy.log} == {"slowdown", "reset", "reset_mid", None}


def test_outages_stop_a_job_within_its_budget_and_the_resume_is_exact(
    ray_cluster, proxy, s3_server, storage, bucket, tiny_model_dir, tmp_path, monkeypatch
):
    # Captions of images fetched by URI: the store is read by the CPU stage and written by the writer.
    urls = [f"{bucket}/img/{i}.png" for i in range(8)]
    for url, data in zip(urls, sample_images(8), strict=True):
        write_bytes(url, data, storage)
    table = pa.table({"image_id": [f"i{i}" for i in range(8)], "url": urls})
    config = {
        "input": {"path": write_parquet(table, f"{bucket}/in/i.parquet", storage), "image_uri_column": "url"},
        "model": {"source": str(tiny_model_dir)},
        "resources": dict(SMALL_RESOURCES, batch_size=2),
        "output": {"path": f"{bucket}/cap", "rows_per_file": 2},
        "storage": proxied(proxy, s3_server, attempts=3, max_seconds=10),
        "sampling": {"max_new_tokens": 4},
        "run_id": "outage",
    }

    def assert_clear(message: str) -> None:
        assert message.startswith("job failed: ") and "\n" not in message, message
        assert f"S3 store {proxy.url}" in message and re.search(
            r"SLOW_DOWN|SERVICE_UNAVAILABLE|503|SlowDown", message
        ), message
        assert "ray::" not in message and "UserCodeException" not in message, message

    # 1. Writes fail from just after the first data file (Ray Data's own write retries took 321 s to give up).
    outage = {}

    def writes_go_down() -> None:
        deadline = time.monotonic() + 300
        while proxy.count("PUT", r"/cap/outage/data/") == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        proxy.set(rate=1.0, kinds=["slowdown"], path_regex=r"/cap/outage/data/")
        outage["at"] = time.monotonic()

    trigger = threading.Thread(target=writes_go_down, daemon=True)
    trigger.start()
    message = run_cli("caption.py", config, tmp_path, monkeypatch)
    stopped = time.monotonic()
    trigger.join()
    assert stopped - outage["at"] < 10 + 60  # the budget, plus a minute
    assert_clear(message)

    # 2. The rerun meets an image store that is down (the CPU stage's retries used to go on forever).
    proxy.set(rate=1.0, kinds=["slowdown"], methods={"GET"}, path_regex=r"/img/")
    start = time.monotonic()
    message = run_cli("caption.py", config, tmp_path, monkeypatch)
    assert time.monotonic() - start < 10 + 60
    assert_clear(message)
    assert "/img/" in message  # names what it could not read

    # 3. The store is back: the resume makes every row once.
    proxy.set(rate=0.0)
    assert run_cli("caption.py", config, tmp_path, monkeypatch) is None
    rows = read_parquet_dir(f"{bucket}/cap/outage/data", storage).select(["image_id", "caption", "error"])
    assert sorted(rows["image_id"].to_pylist()) == [f"i{i}" for i in range(8)]  # all there, none twice
    assert rows["error"].null_count == 8 and all(rows["caption"].to_pylist())


def test_reads_by_ray_data_failing_stop_the_job_within_its_budget(
    ray_cluster, proxy, s3_server, storage, bucket, tiny_model_dir, tmp_path, monkeypatch
):
    # An image folder is read by Ray Data's own reader (the driver only lists it). Ray Data retries such reads
    # itself, 10 times with waits of up to 32 s, unless told not to (storage.leave_retries_to_the_store).
    for i, data in enumerate(sample_images(2)):
        write_bytes(f"{bucket}/photos/{i}.png", data, storage)
    config = {
        "input": {"path": f"{bucket}/photos", "format": "images"},
        "model": {"source": str(tiny_model_dir)},
        "resources": SMALL_RESOURCES,
        "output": {"path": f"{bucket}/folder"},
        "storage": proxied(proxy, s3_server, attempts=3, max_seconds=10),
        "sampling": {"max_new_tokens": 2},
        "run_id": "folder",
    }
    proxy.set(rate=1.0, kinds=["slowdown"], methods={"GET"}, path_regex=r"/photos/")
    start = time.monotonic()
    message = run_cli("caption.py", config, tmp_path, monkeypatch)
    assert time.monotonic() - start < 10 + 60
    assert message.startswith("job failed: ") and "\n" not in message, message
    assert "GetObject" in message and f"S3 store {proxy.url}" in message, message


def test_a_store_down_from_the_start_stops_the_job_with_one_clear_line(
    ray_cluster, proxy, s3_server, storage, bucket, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    source = prompts_input(bucket, storage, 2)
    config = {
        "input": {"path": source},
        "model": {"source": str(tiny_model_dir)},
        "sampling": {"images_per_prompt": 1},
        "resources": SMALL_RESOURCES,
        "output": {"path": f"{bucket}/down"},
        "storage": proxied(proxy, s3_server, attempts=3, max_seconds=10),
        "run_id": "down",
    }
    proxy.set(rate=1.0, path_regex=NOT_THE_LEASE)
    start = time.monotonic()
    message = run_cli("synthesize.py", config, tmp_path, monkeypatch, "--verbose")
    assert time.monotonic() - start < 10 + 60
    assert message.startswith("job failed: ") and "\n" not in message, message
    assert f"S3 store {proxy.url}" in message and re.search(r"\b[A-Z][a-z]+[A-Z]\w* operation", message), message
    assert "Traceback (most recent call last)" in capsys.readouterr().err  # --verbose: and the traceback
    proxy.set(rate=0.0)
    written = storage.filesystem(bucket).get_file_info(
        pafs.FileSelector(fs_path(f"{bucket}/down"), recursive=True, allow_not_found=True)
    )
    assert [i.base_name for i in written if i.type == pafs.FileType.File] in ([], ["_lease.json"])  # nothing else
