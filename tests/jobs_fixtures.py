"""Fixtures shared by the batch-job tests (tests/test_jobs_*.py; data helpers in tests/jobs_data.py).

One local Ray cluster per test session (ray.init costs seconds on 2 cores); S3 is the session's moto
server from conftest.py (`s3_server`); the model is conftest's tiny 64x64 checkpoint (`tiny_model_dir`).
"""

from __future__ import annotations

import pytest
import ray

from janus_batch.io.storage import StorageConfig


@pytest.fixture(scope="session")
def ray_cluster():
    if not ray.is_initialized():  # shared with the other modules of the session
        ray.init(num_cpus=2, include_dashboard=False)
    return ray


@pytest.fixture(scope="session")
def storage(s3_server) -> StorageConfig:
    """Explicit endpoint, region and keys for the session's S3 server."""
    return StorageConfig(
        endpoint_url=s3_server.endpoint_url, region=s3_server.region, key=s3_server.key, secret=s3_server.secret
    )


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh, empty bucket: s3://NAME."""
    return s3_server.make_bucket()
