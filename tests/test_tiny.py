"""The tiny model builder: deterministic bytes, both geometries, a working CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from janus_batch.model.tiny import write_tiny_model


def file_bytes(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.compat
def test_same_arguments_give_identical_files(tmp_path):
    a = file_bytes(write_tiny_model(tmp_path / "a", 64, seed=0))
    b = file_bytes(write_tiny_model(tmp_path / "b", 64, seed=0))
    assert a == b
    assert "model.safetensors" in a and "tokenizer.json" in a and "config.json" in a
    assert sum(map(len, a.values())) < 8 * 2**20  # a few MB
    c = file_bytes(write_tiny_model(tmp_path / "c", 64, seed=1))
    assert c["model.safetensors"] != a["model.safetensors"]


def test_cli_writes_the_real_geometry(tmp_path):
    out = tmp_path / "tiny384"
    subprocess.run([sys.executable, "-m", "janus_batch.model.tiny", str(out), "--image-size", "384"], check=True)
    config = (out / "config.json").read_text()
    assert '"image_size": 384' in config and '"num_image_tokens": 576' in config
