"""Where data lives: local paths and s3:// URIs, with S3 credentials resolved the AWS way.

By default nothing is set and both pyarrow and s3fs use the AWS default chain (environment variables,
~/.aws config and credentials, instance or pod roles). `profile` picks a named profile; `endpoint_url`
points at an S3-compatible store (MinIO, Ceph, moto). The resolved values are pickled to Ray workers,
which may not share the driver's environment, so a profile is resolved to keys once on the driver.
"""

from __future__ import annotations

from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, field_validator


def is_s3(path: str) -> bool:
    return path.startswith("s3://")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


class StorageConfig(BaseModel):
    """S3 access for inputs, outputs and models. Empty: the AWS default credential chain."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    region: str | None = Field(None, description="AWS region; default: from the environment / profile")
    key: str | None = Field(None, description="access key id; default: the AWS credential chain")
    secret: str | None = Field(None, description="secret access key")
    token: str | None = Field(None, description="session token, for temporary credentials")
    profile: str | None = Field(None, description="named profile from ~/.aws (resolved on the driver)")

    @field_validator("endpoint_url")
    @classmethod
    def check_endpoint(cls, url: str | None) -> str | None:
        if url is not None and urlparse(url).scheme not in ("http", "https"):
            raise ValueError(f"endpoint_url must start with http:// or https://, got {url!r}")
        return url

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
                key=self.key or frozen.access_key,
                secret=self.secret or frozen.secret_key,
                token=self.token or frozen.token,
                region=self.region or session.get_config_variable("region"),
            )
        )

    def arrow_s3(self) -> pafs.S3FileSystem:
        kwargs: dict = {}
        if self.endpoint_url:
            url = urlparse(self.endpoint_url)
            kwargs["endpoint_override"] = url.netloc
            kwargs["scheme"] = url.scheme  # pyarrow speaks https unless told (local stores are often http)
        if self.region:
            kwargs["region"] = self.region
        if self.key or self.secret:
            kwargs.update(access_key=self.key, secret_key=self.secret, session_token=self.token)
        return pafs.S3FileSystem(**kwargs)

    def filesystem(self, path: str) -> pafs.FileSystem:
        """The pyarrow filesystem for `path` (local or s3://)."""
        return self.arrow_s3() if is_s3(path) else pafs.LocalFileSystem()

    def storage_options(self) -> dict:
        """fsspec / s3fs options (for the model loader and anything fsspec-based)."""
        options: dict = {}
        if self.key or self.secret:
            options.update(key=self.key, secret=self.secret)
            if self.token:
                options["token"] = self.token
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


def fs_path(path: str) -> str:
    """A path as pyarrow filesystems want it: s3://bucket/key -> bucket/key; local paths made absolute."""
    if is_s3(path):
        return path[len("s3://") :]
    from pathlib import Path

    return str(Path(path).expanduser().resolve())


def read_bytes(path: str, storage: StorageConfig, max_bytes: int) -> bytes:
    """A whole file, refusing anything over `max_bytes` (checked before reading)."""
    fs = storage.filesystem(path)
    info = fs.get_file_info(fs_path(path))
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file: {path}")
    if info.type != pafs.FileType.File:
        raise IsADirectoryError(f"not a file: {path}")
    if info.size is not None and info.size > max_bytes:
        raise ValueError(f"file of {info.size} bytes exceeds the limit of {max_bytes}: {path}")
    with fs.open_input_stream(fs_path(path)) as f:
        return f.read()


def write_bytes(path: str, data: bytes, storage: StorageConfig) -> None:
    fs = storage.filesystem(path)
    target = fs_path(path)
    if not is_s3(path):
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(target) as f:
        f.write(data)
