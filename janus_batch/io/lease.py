"""One driver per run id at a time: a lease file in the run folder, taken atomically, renewed by a heartbeat.

`OUTPUT/RUN_ID/_lease.json` names its holder and when it expires. A driver takes it before it touches the run's
files and gives it back when it ends; a crashed driver stops renewing, so its lease expires after `ttl_s` and the
next driver takes it over. A second driver on a live run refuses (or, with `wait`, waits until it is free).

Taking and renewing are conditional writes, so that of two drivers racing exactly one wins:
- S3: `PutObject` with `If-None-Match: *` to create, `If-Match: <etag>` to renew or take over an expired lease,
  `DeleteObject` with `If-Match` to give it back (AWS S3 since 2024, MinIO, moto). A store that ignores these
  headers would let both writes through: the lease is read back after it is taken, which catches two drivers
  unless they start within the same fraction of a second.
- Local folders: an exclusive `flock` on the lease file, which the operating system gives back the moment its
  holder dies (on a network filesystem this holds where it supports POSIX locks, as NFSv4 does).
On S3, expiry is judged by the clocks of the drivers' machines, so they should be kept in sync (NTP).
"""

from __future__ import annotations

import _thread
import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from janus_batch.io.storage import StorageConfig, is_s3, join

LEASE_FILE = "_lease.json"


class LeaseHeld(RuntimeError):
    """Another driver holds the run's lease."""


class RunLease:
    def __init__(self, run_dir: str, storage: StorageConfig, ttl_s: float):
        self.uri = join(run_dir, LEASE_FILE)
        self.ttl_s = ttl_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.store = S3Lease(self.uri, storage) if is_s3(run_dir) else LocalLease(Path(self.uri).expanduser())
        self.stopped = threading.Event()
        self.heartbeat: threading.Thread | None = None

    def record(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "renewed_at": now, "expires_at": now + self.ttl_s}).encode()

    def acquire(self, wait: bool, poll_s: float = 2.0) -> None:
        """Take the lease, or raise LeaseHeld naming its holder (with `wait`: poll until it is free)."""
        told = False
        while True:
            holder = self.store.take(self.record(), self.owner)
            if holder is None:
                break
            left = holder.get("expires_at", 0) - time.time()
            message = (
                f"run {self.uri.rsplit('/', 2)[-2]} is being run by another driver ({holder.get('owner')}; its lease "
                f"{self.uri} expires in {left:.0f} s unless renewed)"
            )
            if not wait:
                raise LeaseHeld(f"{message}: wait for it to finish, or pass --wait-for-lease")
            if not told:
                print(f"[janus-batch] {message}: waiting", flush=True)
                told = True
            time.sleep(poll_s)
        self.heartbeat = threading.Thread(target=self.renew_until_stopped, daemon=True)
        self.heartbeat.start()

    def renew_until_stopped(self) -> None:
        """Renew every third of the ttl; a lease that cannot be renewed before it expires stops the driver."""
        expires = time.time() + self.ttl_s
        while not self.stopped.wait(self.ttl_s / 3):
            try:
                if self.store.renew(self.record()):
                    expires = time.time() + self.ttl_s
                    continue
                reason = "another driver took it over"
            except OSError as e:  # a storage fault: try again at the next beat while the lease lasts
                reason = f"cannot renew it: {e}"
                if time.time() < expires - self.ttl_s / 3:
                    continue
            print(f"[janus-batch] lost the lease {self.uri} ({reason}): stopping this driver", flush=True)
            _thread.interrupt_main()
            return

    def release(self) -> None:
        self.stopped.set()
        if self.heartbeat is not None:
            self.heartbeat.join()
            with contextlib.suppress(OSError):
                self.store.release(self.owner)

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class LocalLease:
    """An exclusive `flock` on the lease file, held while the driver lives: the operating system gives it back
    the moment the driver dies, so no expiry is needed. The file holds the holder's record, for the message."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def take(self, record: bytes, owner: str) -> dict | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                return json.loads(self.path.read_bytes())
            except ValueError:  # its holder is writing it
                return {"owner": "unknown", "expires_at": time.time() + 1}
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        self.fd = fd
        return None

    def renew(self, record: bytes) -> bool:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, record, 0)  # the lock is ours until we die; the record only tells others who holds it
        return True

    def release(self, owner: str) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # releases the lock; the file stays (deleting it would race a new holder's open)
            self.fd = None


def error_code(e: Exception) -> str | None:
    """The S3 error code of a botocore ClientError, else None."""
    response = getattr(e, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


class S3Lease:
    def __init__(self, uri: str, storage: StorageConfig):
        import botocore.config
        import botocore.session

        parsed = urlparse(uri)
        self.bucket, self.key = parsed.netloc, parsed.path.lstrip("/")
        options = storage.storage_options()
        client_kwargs = options.get("client_kwargs", {})
        self.client = botocore.session.Session(profile=options.get("profile")).create_client(
            "s3",
            endpoint_url=client_kwargs.get("endpoint_url"),
            region_name=client_kwargs.get("region_name"),
            aws_access_key_id=options.get("key"),
            aws_secret_access_key=options.get("secret"),
            aws_session_token=options.get("token"),
            config=botocore.config.Config(**storage.botocore_config()),  # the run's retry budget
        )
        self.etag: str | None = None

    def put(self, record: bytes, **condition) -> str | None:
        """The new ETag, or None when the condition failed."""
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=record, **condition)["ETag"]
        except Exception as e:
            if error_code(e) in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            raise self.store_error("writing", e) from None

    def get(self) -> tuple[dict, str] | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key)
            return json.loads(response["Body"].read()), response["ETag"]
        except Exception as e:
            if error_code(e) in ("NoSuchKey", "404"):
                return None
            raise self.store_error("reading", e) from None

    def store_error(self, doing: str, e: Exception) -> Exception:
        """A botocore error (refused, or a reset or timeout after the retry budget) as an OSError naming the call;
        anything else as it is."""
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(e, (ClientError, BotoCoreError)):
            return OSError(f"{doing} the lease s3://{self.bucket}/{self.key}: {e}")
        return e

    def take(self, record: bytes, owner: str) -> dict | None:
        while True:
            etag = self.put(record, IfNoneMatch="*")
            if etag is None:
                found = self.get()
                if found is None:
                    continue  # given back meanwhile
                holder, held_etag = found
                if holder["expires_at"] > time.time():
                    return holder
                etag = self.put(record, IfMatch=held_etag)  # take over an expired lease
                if etag is None:
                    continue
            found = self.get()  # a store that ignores conditions let another driver's write win
            if found is None or found[0]["owner"] != owner:
                return found[0] if found else {"owner": "unknown", "expires_at": time.time()}
            self.etag = found[1]
            return None

    def renew(self, record: bytes) -> bool:
        etag = self.put(record, IfMatch=self.etag)
        if etag is None:
            return False
        self.etag = etag
        return True

    def release(self, owner: str) -> None:
        """Delete the lease if it is still ours. A failure is not raised (the run's own outcome matters more): the
        lease then expires after its ttl."""
        from botocore.exceptions import BotoCoreError, ClientError

        with contextlib.suppress(ClientError, BotoCoreError):
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
