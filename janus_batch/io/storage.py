"""Where data lives: local paths and s3:// URIs, with S3 credentials resolved the AWS way and bounded retries.

Credentials: by default nothing is set and both pyarrow and s3fs use the AWS default chain (environment
variables, ~/.aws config and credentials, instance or pod roles). `profile` picks a named profile;
`endpoint_url` points at an S3-compatible store (MinIO, Ceph, moto). The resolved values are pickled to Ray
workers, which may not share the driver's environment, so a profile is resolved to keys once on the driver.
Keys are `SecretStr`s: reprs, dumps and validation errors show them masked. AWS's own names
(`aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`, `region_name`, `profile_name`) are
accepted too.

Retries (`StorageConfig.retries`): every request to S3 that meets a transient fault (503 SlowDown, throttling,
5xx, a reset or refused connection, a timeout) is retried by the client's AWS SDK in its standard retry mode:
jittered exponential backoff (a random share of min(2^k, 20) s before retry k), with as many attempts as
`RetryPolicy.attempts` whose longest waits fit in `max_seconds`. Retrying each request (not whole calls)
keeps a job going through scattered faults, and bounds how long an outage goes unnoticed: the first request
that runs out of attempts fails its call, and the job stops.
- pyarrow (everything Ray Data reads and writes, the driver's listings, metadata and commits): the AWS C++
  SDK's standard strategy (which also stops retrying while too many recent requests failed: its retry quota).
- s3fs (the model loader): botocore's standard mode; s3fs retries SlowDown and dropped connections up to
  S3FS_TRIES times around it, so botocore gets that share of the time.
- `read_bytes` / `write_bytes` (driver and workers: specs, summaries, image URIs) are also retried whole
  (`retry_call`), within `attempts` and `max_seconds` counted from the first try, for the faults the SDK does
  not retry: an error body that does not fit a small ranged read (the SDK's INTERNAL_FAILURE "Failed to flush
  response stream" on a 503 for a file of a few bytes), an exhausted retry quota, an expired token.
Ray Data retries matching I/O errors itself too (10 tries with waits of up to 32 s, at several nested levels:
an outage surfaced after 321 s): `leave_retries_to_the_store` turns that off, so the policy is the budget.
"""

from __future__ import annotations

import errno
import random
import re
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator

T = TypeVar("T")

SDK_MAX_WAIT_S = 20  # the AWS SDKs' cap on one wait in standard retry mode (C++ and botocore alike)
# How dumps show a key: pydantic's SecretStr, and JobSpec.public_dump (spec.json, summary.json, --dry-run).
MASKS = ("**********", "***")
S3FS_TRIES = 5  # s3fs.S3FileSystem.retries: its own tries around botocore's (a class attribute, not an option)


def is_s3(path: str) -> bool:
    return path.startswith("s3://")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


class RetryPolicy(BaseModel):
    """How long a store call is retried on transient faults before the job stops (to be resumed)."""

    model_config = ConfigDict(extra="forbid")

    attempts: int = Field(10, ge=1, le=100, description="tries of one store request, the first included")
    max_seconds: float = Field(
        180, gt=0, description="the longest one request is retried (its waits); a store down longer stops the job"
    )
    timeout_s: float = Field(20, gt=0, description="connect timeout, and how long one request may stall")

    def sdk_attempts(self, budget_s: float) -> int:
        """Attempts for an AWS SDK's standard retry mode: as many as `attempts` whose longest waits (1, 2, 4, ...
        capped at 20 s) add up to no more than `budget_s`; at least 1."""
        attempts, waits = 1, 0.0
        while attempts < self.attempts:
            waits += min(2 ** (attempts - 1), SDK_MAX_WAIT_S)
            if waits > budget_s:
                break
            attempts += 1
        return attempts


class StorageConfig(BaseModel):
    """S3 access for inputs, outputs and models. Empty: the AWS default credential chain."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    region: str | None = Field(
        None, validation_alias=AliasChoices("region", "region_name"), description="AWS region; default: the chain's"
    )
    key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("key", "aws_access_key_id"),
        description="access key id; default: the chain's",
    )
    secret: SecretStr | None = Field(
        None, validation_alias=AliasChoices("secret", "aws_secret_access_key"), description="secret access key"
    )
    token: SecretStr | None = Field(
        None, validation_alias=AliasChoices("token", "aws_session_token"), description="session token (temporary keys)"
    )
    profile: str | None = Field(
        None,
        validation_alias=AliasChoices("profile", "profile_name"),
        description="named profile from ~/.aws (resolved on the driver)",
    )
    retries: RetryPolicy = Field(default_factory=RetryPolicy)

    @field_validator("endpoint_url")
    @classmethod
    def check_endpoint(cls, url: str | None) -> str | None:
        if url is not None and urlparse(url).scheme not in ("http", "https"):
            raise ValueError(f"endpoint_url must start with http:// or https://, got {url!r}")
        return url

    @field_validator("key", "secret", "token")
    @classmethod
    def check_not_masked(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value() in MASKS:
            raise ValueError(
                "a masked value, as dumps of a spec show keys: give the real key, or leave it out and use the "
                "environment or a profile"
            )
        return value

    def resolved(self) -> StorageConfig:
        """A copy with a profile turned into explicit keys and region, so workers need no ~/.aws."""
        if self.profile is None:
            return self
        import botocore.session

        session = botocore.session.Session(profile=self.profile)
        creds = session.get_credentials()
        if creds is None:
            raise ValueError(f"AWS profile {self.profile!r} has no credentials")
        frozen = creds.get_frozen_credentials()
        return self.model_copy(
            update=dict(
                profile=None,
                key=self.key or SecretStr(frozen.access_key),
                secret=self.secret or SecretStr(frozen.secret_key),
                token=self.token or (SecretStr(frozen.token) if frozen.token else None),
                region=self.region or session.get_config_variable("region"),
            )
        )

    def store_name(self, path: str) -> str:
        """The store `path` lives on, for messages."""
        if not is_s3(path):
            return "local filesystem"
        return f"S3 store {self.endpoint_url}" if self.endpoint_url else "S3"

    def arrow_s3(self, budget_s: float | None = None) -> pafs.S3FileSystem:
        """pyarrow's S3 filesystem, its requests retried for up to `budget_s` (default: the policy's max_seconds)."""
        policy = self.retries
        attempts = policy.sdk_attempts(policy.max_seconds if budget_s is None else budget_s)
        kwargs: dict = dict(
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
            connect_timeout=policy.timeout_s,
            request_timeout=policy.timeout_s,
        )
        if self.endpoint_url:
            url = urlparse(self.endpoint_url)
            kwargs["endpoint_override"] = url.netloc
            kwargs["scheme"] = url.scheme  # pyarrow speaks https unless told (local stores are often http)
        if self.region:
            kwargs["region"] = self.region
        if self.key or self.secret:
            kwargs.update(
                access_key=_reveal(self.key), secret_key=_reveal(self.secret), session_token=_reveal(self.token)
            )
        return pafs.S3FileSystem(**kwargs)

    def filesystem(self, path: str, budget_s: float | None = None) -> pafs.FileSystem:
        """The pyarrow filesystem for `path` (local or s3://); `budget_s`: see arrow_s3."""
        return self.arrow_s3(budget_s) if is_s3(path) else pafs.LocalFileSystem()

    def botocore_config(self, budget_s: float | None = None) -> dict:
        """botocore.config.Config arguments: standard retries for up to `budget_s` (default: max_seconds)."""
        policy = self.retries
        attempts = policy.sdk_attempts(policy.max_seconds if budget_s is None else budget_s)
        return {
            "retries": {"mode": "standard", "total_max_attempts": attempts},
            "connect_timeout": policy.timeout_s,
            "read_timeout": policy.timeout_s,
        }

    def storage_options(self) -> dict:
        """fsspec / s3fs options (for the model loader and anything fsspec-based), retries included."""
        options: dict = {"config_kwargs": self.botocore_config(self.retries.max_seconds / S3FS_TRIES)}
        if self.key or self.secret:
            options.update(key=_reveal(self.key), secret=_reveal(self.secret))
            if self.token:
                options["token"] = _reveal(self.token)
        if self.profile:
            options["profile"] = self.profile
        client_kwargs = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        return options


def _reveal(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


# ---- transient faults and retries ------------------------------------------------------------------------

# Local and mounted filesystems' errors carry an errno: only these are the network's.
NETWORK_ERRNOS = {
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.ENETDOWN,
    errno.ENETUNREACH,
    errno.ENETRESET,
    errno.EHOSTDOWN,
    errno.EHOSTUNREACH,
    errno.ENOTCONN,
}
# pyarrow's S3 errors are OSErrors whose text names the AWS SDK's error type ("AWS Error SLOW_DOWN during
# GetObject operation: ..."), or the HTTP status and S3's error code for a type the SDK does not know
# ("AWS Error UNKNOWN (HTTP status 400) ... ExceptionName: ExpiredToken").
TRANSIENT_AWS_ERROR = re.compile(
    r"AWS Error (NETWORK_CONNECTION|SLOW_DOWN|THROTTLING|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|REQUEST_TIMEOUT"
    r"|UNKNOWN \(HTTP status (429|5\d\d)\))|ExceptionName: (ExpiredToken|RequestTimeout|SlowDown|Throttling)\b"
)
# S3's and botocore's error codes (botocore ClientError; s3fs keeps it as the __cause__ of its OSError).
TRANSIENT_S3_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "RequestLimitExceeded",
    "TooManyRequests",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "ExpiredToken",
    "500",
    "502",
    "503",
    "504",
}


def is_transient_storage_error(e: BaseException) -> bool:
    """Whether a store call failed in a way a retry may cure: the network (resets, refused connections,
    timeouts), throttling (503 SlowDown, 429), the store's own 5xx, an expired token. A missing object, a
    refused permission, a bad name or path, a file that is not what was expected are not: retrying them
    only delays the error. Looks through the exception's causes (s3fs keeps botocore's error there)."""
    while e is not None:
        if _is_transient(e):
            return True
        e = e.__cause__
    return False


def _is_transient(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError)):  # resets, refusals, broken pipes, StoreUnavailable
        return True
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno in NETWORK_ERRNOS
    if isinstance(e, OSError):
        return bool(TRANSIENT_AWS_ERROR.search(str(e)))
    module = type(e).__module__.split(".")[0]
    if module == "botocore":
        from botocore.exceptions import ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotocoreConnectionError

        if isinstance(e, ClientError):
            error = e.response.get("Error", {})
            status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            return error.get("Code") in TRANSIENT_S3_CODES or status in TRANSIENT_S3_CODES
        return isinstance(e, (BotocoreConnectionError, HTTPClientError))  # unreachable, closed, timed out
    if module == "aiohttp":
        import aiohttp

        return isinstance(e, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError))
    return False


class StoreUnavailable(ConnectionError):
    """A store call still met transient faults after its retries. The store's fault, never a row's: the job
    stops, and a rerun with the same run id resumes once the store is back."""


def retry_call(call: Callable[[pafs.FileSystem], T], storage: StorageConfig, path: str, operation: str) -> T:
    """`call(filesystem for path)`, tried again on transient faults (with the SDKs' backoff) while the policy's
    attempts and max_seconds (from the first try) last, each try's SDK retries limited to the time left; then
    StoreUnavailable naming the operation on `path`, the last error and the store. Other errors at once."""
    policy = storage.retries
    start = time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            return call(storage.filesystem(path, budget_s=policy.max_seconds - (time.monotonic() - start)))
        except Exception as e:
            if not is_transient_storage_error(e):
                raise
            elapsed = time.monotonic() - start
            wait = random.random() * min(2 ** (attempt - 1), SDK_MAX_WAIT_S)
            if attempt == policy.attempts or elapsed + wait >= policy.max_seconds:
                where = f"{storage.store_name(path)}; tried {attempt} times in {elapsed:.1f} s"
                raise StoreUnavailable(f"{operation} {path}: {one_line(e)} ({where})") from e
            time.sleep(wait)
    raise AssertionError("unreachable")


def one_line(e: BaseException) -> str:
    """An exception as one line: its text (its type's name when it has none), whitespace runs joined."""
    text = " ".join(str(e).split())
    return text or type(e).__name__


def leave_retries_to_the_store(ctx) -> None:
    """Turn off Ray Data's own I/O retries in `ctx` (a ray.data.DataContext, set before the datasets and
    datasinks are made: they copy it): the filesystems retry within the policy already, and Ray's layers
    (10 tries with waits of up to 32 s each, nested) would multiply that budget."""
    ctx.retried_io_errors = []


# ---- paths and whole files -------------------------------------------------------------------------------


def fs_path(path: str) -> str:
    """A path as pyarrow filesystems want it: s3://bucket/key -> bucket/key; local paths made absolute."""
    if is_s3(path):
        return path[len("s3://") :]
    from pathlib import Path

    return str(Path(path).expanduser().resolve())


def read_bytes(path: str, storage: StorageConfig, max_bytes: int) -> bytes:
    """A whole file, refusing anything over `max_bytes` (checked before reading); transient faults retried."""

    def read(fs: pafs.FileSystem) -> bytes:
        info = fs.get_file_info(fs_path(path))
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no such file: {path}")
        if info.type != pafs.FileType.File:
            raise IsADirectoryError(f"not a file: {path}")
        if info.size is not None and info.size > max_bytes:
            raise ValueError(f"file of {info.size} bytes exceeds the limit of {max_bytes}: {path}")
        with fs.open_input_stream(fs_path(path)) as f:
            return f.read()

    return retry_call(read, storage, path, "read")


def write_bytes(path: str, data: bytes, storage: StorageConfig) -> None:
    """A whole file, replaced if it exists; transient faults retried (a retry writes it all again)."""
    target = fs_path(path)

    def write(fs: pafs.FileSystem) -> None:
        if not is_s3(path):
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(target) as f:
            f.write(data)

    retry_call(write, storage, path, "write")
