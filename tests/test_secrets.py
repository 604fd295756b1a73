"""S3 credentials never appear in a message: given as spec fields, as AWS's own names, in YAML, through a profile
or the environment, they stay out of reprs, dumps, validation errors, `--dry-run`, `invalid job spec`, a failed
job's line, the run's files and every log of a run (the driver's output and Ray's session logs)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import ray
import yaml
from pydantic import ValidationError

from janus_batch.io.storage import StorageConfig, fs_path
from janus_batch.jobs import SynthesizeJob
from janus_batch.jobs.cli import spec_errors
from tests.fault_proxy import FaultProxy
from tests.jobs_data import SMALL_RESOURCES, write_parquet

pytest_plugins = ["tests.jobs_fixtures"]

REPO = Path(__file__).resolve().parents[1]
KEY, SECRET, TOKEN = "AKIASENTINEL0KEY0001", "sentinel-secret-9f8e7d6c", "sentinel-token-1a2b3c4d"


def assert_clean(text: str | bytes, where: str) -> None:
    for sentinel in (KEY, SECRET, TOKEN):
        found = sentinel.encode() in text if isinstance(text, bytes) else sentinel in text
        assert not found, f"{where} shows {sentinel!r}"


def test_keys_given_every_way_are_masked_but_reach_the_clients():
    ways = [
        StorageConfig(key=KEY, secret=SECRET, token=TOKEN),
        StorageConfig.model_validate({"key": KEY, "secret": SECRET, "token": TOKEN}),
        StorageConfig.model_validate(
            {"aws_access_key_id": KEY, "aws_secret_access_key": SECRET, "aws_session_token": TOKEN, "region_name": "x"}
        ),
        StorageConfig.model_validate_json(json.dumps({"aws_access_key_id": KEY, "secret": SECRET, "token": TOKEN})),
    ]
    for storage in ways:
        spec = SynthesizeJob.model_validate({"storage": storage})
        for where, text in [
            ("repr", repr(storage)),
            ("str", str(storage)),
            ("model_dump", repr(storage.model_dump())),
            ("model_dump_json", storage.model_dump_json()),
            ("the spec's repr", repr(spec)),
            ("the spec's public dump", json.dumps(spec.public_dump())),
        ]:
            assert_clean(text, where)
        options = storage.storage_options()
        assert (options["key"], options["secret"], options["token"]) == (KEY, SECRET, TOKEN)
        assert isinstance(storage.arrow_s3(), pafs.S3FileSystem)
    assert ways[2].region == "x" and StorageConfig.model_validate({"profile_name": "p"}).profile == "p"


BAD_SPECS = {
    "secret as a list": {"storage": {"secret": [SECRET]}},
    "a name and its alias": {"storage": {"aws_secret_access_key": SECRET, "secret": SECRET}},
    "a misspelt name": {"storage": {"aws_secret_key": SECRET, "key": KEY}},
    "storage as a string": {"storage": f"{KEY}:{SECRET}"},
    "another field wrong": {"storage": {"key": KEY, "secret": SECRET, "endpoint_url": "localhost:9000"}},
    "a key from a dump": {"storage": {"key": KEY, "secret": "**********"}},
    "a rule over the whole job": {
        "storage": {"key": KEY, "secret": SECRET, "token": TOKEN},
        "sampling": {"images_per_prompt": 100},
        "resources": {"batch_size": 100},
    },
}


@pytest.mark.parametrize("data", BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_validation_errors_name_the_field_never_the_secret(data):
    with pytest.raises(ValidationError) as error:
        SynthesizeJob.model_validate(data)
    for where, text in [("str", str(error.value)), ("repr", repr(error.value)), ("the CLI", spec_errors(error.value))]:
        assert_clean(text, where)
    assert "storage" in str(error.value) or "batch_size" in str(error.value)
    if isinstance(data["storage"], dict) and "sampling" not in data:  # the storage block alone is wrong
        with pytest.raises(ValidationError) as error:
            StorageConfig.model_validate(data["storage"])
        assert_clean(str(error.value), "StorageConfig's error")


def run_cli(script: str, args: list[str], monkeypatch) -> str | None:
    """`python pipelines/SCRIPT ARGS` in this process: the message it exits with (None: none)."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    try:
        runpy.run_path(str(REPO / "pipelines" / script), run_name="__main__")
    except SystemExit as e:
        return e.code
    return None


def test_the_cli_prints_no_secret(tmp_path, monkeypatch, capsys):
    config = tmp_path / "job.yaml"
    storage = {"aws_access_key_id": KEY, "aws_secret_access_key": SECRET, "aws_session_token": TOKEN}
    config.write_text(yaml.safe_dump({"storage": storage}))
    assert run_cli("synthesize.py", ["--config", str(config), "--dry-run"], monkeypatch) is None
    out = capsys.readouterr().out
    assert_clean(out, "--dry-run")
    assert json.loads(out[: out.index("plan (")])["storage"]["secret"] == "***"

    config.write_text(yaml.safe_dump({"storage": {"key": KEY, "secret": [SECRET]}}))
    message = run_cli("synthesize.py", ["--config", str(config)], monkeypatch)
    assert message.startswith("invalid job spec:\n  storage.secret: Input should be a valid string")
    assert_clean(message, "invalid job spec")

    config.write_text(f"storage:\n  key: {KEY}\n  secret: {SECRET}: oops\n")  # not YAML: PyYAML would quote it
    message = run_cli("synthesize.py", ["--config", str(config)], monkeypatch)
    assert (
        message
        == f"invalid job spec: {config} is not valid YAML: mapping values are not allowed here (line 3, column 35)"
    )
    assert_clean(message + capsys.readouterr().err, "a YAML error")


def write_profile(tmp_path: Path, monkeypatch) -> None:
    """A profile `sentinel` holding the sentinel keys, found the AWS way (its file named by the environment)."""
    (tmp_path / "credentials").write_text(
        f"[sentinel]\naws_access_key_id = {KEY}\naws_secret_access_key = {SECRET}\naws_session_token = {TOKEN}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))


def run_files(run_dir: str, storage: StorageConfig) -> dict[str, bytes]:
    fs = storage.filesystem(run_dir)
    infos = fs.get_file_info(pafs.FileSelector(fs_path(run_dir), recursive=True, allow_not_found=True))
    out = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[info.path] = f.read()
    return out


def ray_logs() -> dict[str, bytes]:
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return {str(p): p.read_bytes() for p in logs.rglob("*") if p.is_file()}


def test_a_run_and_a_failed_run_show_the_keys_nowhere(
    ray_cluster, s3_server, storage, bucket, tiny_model_dir, tmp_path, monkeypatch, capfd
):
    # moto takes any keys: the sentinels sign every request of these runs.
    source = write_parquet(pa.table({"prompt_id": ["a"], "prompt": ["a red fox"]}), f"{bucket}/in/p.parquet", storage)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)  # in the driver's environment as well: the AWS chain's first place
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    write_profile(tmp_path, monkeypatch)
    common = {
        "input": {"path": source},
        "model": {"source": str(tiny_model_dir)},
        "sampling": {"images_per_prompt": 1},
        "resources": SMALL_RESOURCES,
        "output": {"path": f"{bucket}/out"},
    }
    endpoint = ["--s3-endpoint", s3_server.endpoint_url, "--s3-region", s3_server.region]

    # A run with the keys from the profile (resolved on the driver, pickled to the workers).
    config = tmp_path / "profile.yaml"
    config.write_text(yaml.safe_dump({**common, "run_id": "profile"}))
    args = ["--config", str(config), *endpoint, "--aws-profile", "sentinel"]
    assert run_cli("synthesize.py", args, monkeypatch) is None

    # A run with the keys in the YAML file, under AWS's names, against a store that is down.
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.set(rate=1.0, path_regex=r"^(?!.*_lease\.json)")
        keys = {"aws_access_key_id": KEY, "aws_secret_access_key": SECRET, "aws_session_token": TOKEN}
        storage_block = {**keys, "endpoint_url": proxy.url, "retries": {"attempts": 2, "max_seconds": 5}}
        config = tmp_path / "down.yaml"
        config.write_text(yaml.safe_dump({**common, "run_id": "down", "storage": storage_block}))
        message = run_cli("synthesize.py", ["--config", str(config), "--s3-region", s3_server.region], monkeypatch)
    assert message.startswith("job failed: ")
    assert_clean(message, "the failed job's line")

    out, err = capfd.readouterr()
    assert "[janus-batch]" in out  # the runs' own lines are among what is checked
    assert_clean(out, "the driver's stdout")
    assert_clean(err, "the driver's stderr")
    files = run_files(f"{bucket}/out", storage)
    assert any(path.endswith("profile/summary.json") for path in files) and len(files) >= 3
    for path, data in files.items():
        assert_clean(data, path)
    logs = ray_logs()
    assert any("worker" in path for path in logs)
    for path, data in logs.items():
        assert_clean(data, path)
