"""Every notebook runs top to bottom in a real Jupyter kernel on the embedded tiny model, and is stored clean."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import nbformat
import pyarrow.parquet as pq
import pytest
from nbclient import NotebookClient
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear outputs before committing"


def run_notebook(path: Path, tmp_path: Path, monkeypatch) -> list[dict]:
    monkeypatch.chdir(tmp_path)  # notebooks write under ./outputs: keep that out of the repo
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]


def test_quickstart_runs(tmp_path, monkeypatch):
    outputs = run_notebook(ROOT / "notebooks" / "quickstart.ipynb", tmp_path, monkeypatch)
    text = "".join(o.get("text", "") for o in outputs)
    assert text.count("caption (") == 3 and text.count("answer: ") == 3
    assert "16 images of (64, 64, 3)" in text
    assert "image 5 regenerated: 100.0% of its tokens equal" in text and "image 5 reproduced exactly" in text
    grids = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(grids) == 1  # the 4x4 grid is shown as a picture


def test_synthetic_corpus_runs(tmp_path, monkeypatch):
    # The kernel starts a local Ray of its own: never this process' cluster (other tests may have one running).
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("JANUS_MODEL", raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    outputs = run_notebook(ROOT / "notebooks" / "synthetic_corpus.ipynb", tmp_path, monkeypatch)
    text = "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")
    # 4 prompts x 4 images, then the same run id again: resumed, nothing redone.
    assert "wrote 16 rows (0 errors)" in text and '"expected_rows": 16' in text
    assert "rerun wrote 0 new rows; 16 were already there" in text
    assert "image feature: Image(" in text
    assert "captioned 16 images (0 errors)" in text and "16 captions" in text
    grids = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(grids) == 1  # the grid is shown as a picture: a row of 4 tiny-model (64 px) images per prompt
    assert Image.open(io.BytesIO(base64.b64decode(grids[0]["data"]["image/png"]))).size == (4 * 64, 4 * 64)
    tables = [o for o in outputs if "text/html" in o.get("data", {})]
    assert len(tables) == 2 and "sample_index" in tables[0]["data"]["text/html"]  # metadata, then captions

    corpus = pq.read_table(tmp_path / "outputs" / "synthetic-corpus" / "data")
    assert corpus.num_rows == 16 and corpus["error"].null_count == 16
    assert len(set(corpus["key"].to_pylist())) == 16
    captions = pq.read_table(tmp_path / "outputs" / "synthetic-corpus-captions" / "data")
    assert captions.num_rows == 16 and captions["caption"].null_count == 0 and captions["error"].null_count == 16
    assert sorted(captions["prompt_id"].to_pylist()) == sorted(corpus["prompt_id"].to_pylist())
