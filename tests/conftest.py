"""Fixtures shared by the test modules: the tiny checkpoints, an engine on the tiny model and a local S3 server."""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest
import s3fs
import torch
from moto.server import ThreadedMotoServer

from janus_batch.engine import JanusEngine
from janus_batch.model.tiny import build_tiny_model, write_tiny_model
from tests.helpers import free_port

# Ray Data reads Parquet footers with a pool of 32 actors per read (its default), each a new worker process: on
# this suite's 2 cores those dominated a small job's start. One is plenty for the tests' few files. Set before any
# Ray cluster or pipeline subprocess starts, which inherit it.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
# A pytest-xdist worker computes on one thread, and so do the processes it starts (kernels, drivers; Ray gives its
# workers one thread a CPU anyway): torch's default, a thread per core in every process, has the workers fight for
# the 2 cores (the engine, image and loading test files on 2 workers: 71 s so, 48 s on one thread each).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


# The longest files first (seconds each on 2 workers, 2026-12-02): with `--dist loadfile` a worker takes
# the next whole file when it is done, and pytest-xdist's default order (most tests first) dealt these last, so one
# worker ran alone for the last minute. Each worker starts with two files, the 1st and 3rd or the 2nd and 4th:
# listed so, the two pairs take about as long. The Makefile's main run keeps this order (--no-loadscope-reorder);
# files not named follow, in collection order.
LONGEST_FILES_FIRST = [
    "test_jobs_integrity.py",  # 106
    "test_storage_faults.py",  # 97
    "test_jobs_e2e.py",  # 86
    "test_jobs_cluster.py",  # 98
    "test_curate_job.py",  # 64
    "test_notebooks.py",  # 50
    "test_lease.py",  # 39
    "test_hostile_rows.py",  # 30
    "test_serve.py",  # 23
    "test_secrets.py",  # 9
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny 64x64 Janus checkpoint (HF format), written once per session. Read-only: copy to change it."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-janus-64"), image_size=64)


@pytest.fixture(scope="session")
def tiny_model_dir_384(tmp_path_factory) -> Path:
    """The tiny checkpoint at the real 384x384 geometry (576 image tokens). Read-only."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-janus-384"), image_size=384)


@pytest.fixture(scope="module")
def engine() -> JanusEngine:
    """An engine on the tiny 64x64 model (CPU, default settings), one per test module: tests may change its
    memory state (KV cache, kept batch shapes)."""
    model, processor = build_tiny_model(64)
    return JanusEngine(model, processor)


@dataclass(frozen=True)
class S3Server:
    """A real S3-protocol server (moto) on 127.0.0.1. Any key / secret is accepted."""

    endpoint_url: str
    key: str = "testing"
    secret: str = "testing"
    # Not us-east-1: there S3 rejects an explicit LocationConstraint, which s3fs' mkdir sends.
    region: str = "us-west-2"

    @property
    def storage_options(self) -> dict:
        """For s3fs.S3FileSystem(**options) / fsspec / load_janus(storage_options=...)."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"region_name": self.region},
        }

    @property
    def pyarrow_options(self) -> dict:
        """For pyarrow.fs.S3FileSystem(**options)."""
        return {
            "endpoint_override": urlparse(self.endpoint_url).netloc,
            "scheme": "http",
            "access_key": self.key,
            "secret_key": self.secret,
            "region": self.region,
        }

    def filesystem(self) -> s3fs.S3FileSystem:
        return s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True)

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique one by default) and return its s3:// URI."""
        name = name or f"bucket-{next(_bucket_numbers)}"
        self.filesystem().mkdir(name)
        return f"s3://{name}"


_bucket_numbers = itertools.count()


@pytest.fixture(scope="session")
def s3_server():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield S3Server(endpoint_url=f"http://{host}:{port}")
    server.stop()
