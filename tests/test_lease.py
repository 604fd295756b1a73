"""One driver per run id: the lease taken by racing processes, renewed while its holder lives, expiring after a
crash; locally and on the S3-protocol server (conditional writes)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from janus_batch.io.lease import LeaseHeld, RunLease

pytest_plugins = ["tests.jobs_fixtures"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def run_dir(request, tmp_path, s3_server):
    if request.param == "local":
        return str(tmp_path / "run")
    return f"{s3_server.make_bucket()}/out/run"


def holder(run_dir: str, storage, ttl_s: float, then: str, start_at: float = 0.0) -> subprocess.Popen:
    """A process that waits until `start_at` (epoch s), tries to take the lease, prints 'took' or 'held', then
    runs `then` ('sleep N', then print 'releasing <epoch s>' and give the lease back; or 'crash': exit without
    giving it back)."""
    revealed = json.dumps(
        dict(
            storage.model_dump(mode="json"),
            key=storage.key.get_secret_value(),
            secret=storage.secret.get_secret_value(),
        )
    )
    code = textwrap.dedent(
        f"""
        import os, sys, time
        from janus_batch.io.storage import StorageConfig
        from janus_batch.io.lease import LeaseHeld, RunLease
        time.sleep(max(0, {start_at} - time.time()))
        lease = RunLease({run_dir!r}, StorageConfig.model_validate_json({revealed!r}), {ttl_s})
        try:
            lease.acquire(wait=False)
        except LeaseHeld as e:
            print("held", e, flush=True)
            sys.exit(0)
        print("took", flush=True)
        if {then!r} == "crash":
            os._exit(0)
        time.sleep(float({then!r}.split()[1]))
        print("releasing", time.time(), flush=True)
        lease.release()
        """
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)


def test_of_racing_drivers_exactly_one_takes_the_lease(run_dir, storage):
    start_at = time.time() + 4  # all of them past their imports, then at the same moment
    racers = [holder(run_dir, storage, 30, "sleep 3", start_at) for _ in range(4)]
    outputs = [p.communicate(timeout=60)[0] for p in racers]
    assert sorted(o.split()[0] for o in outputs) == ["held", "held", "held", "took"], outputs
    assert all("is being run by another driver" in o for o in outputs if o.startswith("held"))
    # Given back at the end: the next driver takes it at once.
    lease = RunLease(run_dir, storage, 30)
    lease.acquire(wait=False)
    lease.release()


def test_a_live_lease_is_renewed_and_a_crashed_drivers_lease_expires(run_dir, storage):
    live = holder(run_dir, storage, 3, "sleep 6")  # renewed every second, so live past its ttl
    assert live.stdout.readline().strip() == "took"
    time.sleep(4)
    with pytest.raises(LeaseHeld, match="wait for it to finish, or pass --wait-for-lease"):
        RunLease(run_dir, storage, 3).acquire(wait=False)
    waiter = RunLease(run_dir, storage, 3)
    waited = time.monotonic()
    waiter.acquire(wait=True, poll_s=0.2)  # until the holder gives it back, ~2 s later
    acquired_at = time.time()
    assert time.monotonic() - waited < 10
    waiter.release()
    assert live.wait(timeout=30) == 0
    word, releasing_at = live.stdout.readline().split()
    assert word == "releasing" and float(releasing_at) <= acquired_at  # taken only once given back

    crashed = holder(run_dir, storage, 3, "crash")
    assert crashed.stdout.readline().strip() == "took" and crashed.wait(timeout=30) == 0
    if run_dir.startswith("s3://"):  # held until it expires
        with pytest.raises(LeaseHeld):
            RunLease(run_dir, storage, 3).acquire(wait=False)
        time.sleep(3.5)
    # else the operating system gave the lock back when the holder died
    successor = RunLease(run_dir, storage, 3)
    successor.acquire(wait=False)
    successor.release()


def test_a_driver_whose_lease_is_taken_over_is_stopped(storage, s3_server):
    run_dir = f"{s3_server.make_bucket()}/run"
    lease = RunLease(run_dir, storage, 3)
    lease.acquire(wait=False)
    fs = s3_server.filesystem()
    record = json.loads(fs.cat(f"{run_dir}/_lease.json"))
    fs.pipe(f"{run_dir}/_lease.json", json.dumps(dict(record, owner="someone else")).encode())
    with pytest.raises(KeyboardInterrupt):  # the heartbeat interrupts the driver's main thread
        time.sleep(5)
    lease.release()
    assert json.loads(fs.cat(f"{run_dir}/_lease.json"))["owner"] == "someone else"  # not ours to delete
