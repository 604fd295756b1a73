"""Batch jobs end to end on the session's local Ray cluster and the moto S3 server: synthesize, caption and
VQA from s3:// Parquet to s3:// outputs in every format, outputs re-read with the tools users have
(`datasets`, `webdataset`), reproducible seeds, and a corpus of bad rows."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from janus_batch.engine import JanusEngine
from janus_batch.io.storage import fs_path
from janus_batch.jobs import CaptionJob, SynthesizeJob, pipeline, run
from janus_batch.options import ImageSampling, TextSampling
from tests.jobs_data import SMALL_RESOURCES, read_parquet_dir, sample_images, synth_spec, write_parquet

pytest_plugins = ["tests.jobs_fixtures"]

PROMPTS = {"fox": "a red fox in the snow", "sea": "a lighthouse above a stormy sea", "city": "a city street at night"}


def prompts_table(prompts: dict[str, str] = PROMPTS) -> pa.Table:
    return pa.table({"prompt_id": list(prompts), "prompt": list(prompts.values())})


def download_dir(uri: str, storage, local: Path) -> list[Path]:
    """Copy every file under `uri` (s3:// or local) into `local`, at the same relative path; returns the local
    paths, sorted."""
    fs = storage.filesystem(uri)
    root = fs_path(uri).rstrip("/")
    out = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type == pafs.FileType.File:
            target = local / info.path[len(root) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as f:
                target.write_bytes(f.read())
            out.append(target)
    return sorted(out)


def summary_of(run_dir: str, storage) -> dict:
    fs = storage.filesystem(run_dir)
    with fs.open_input_stream(fs_path(f"{run_dir}/summary.json")) as f:
        return json.loads(f.read())


@pytest.mark.parametrize("output_format", ["parquet", "webdataset", "files"])
def test_synthesize_s3_to_s3(ray_cluster, storage, bucket, tiny_model_dir, tmp_path, output_format):
    """Outputs open in the readers users have: `datasets`' parquet, webdataset and imagefolder loaders, and the
    `webdataset` library; error rows included (an empty prompt), and ids beyond int64 (row_hash)."""
    table = pa.concat_tables([prompts_table(), pa.table({"prompt_id": ["empty"], "prompt": [""]})])
    source = write_parquet(table, f"{bucket}/prompts/part-0.parquet", storage)
    spec = synth_spec(
        f"{bucket}/prompts/",
        f"{bucket}/out",
        storage,
        tiny_model_dir,
        run_id="r1",
        output={"format": output_format, "image_format": "webp" if output_format == "files" else "png"},
        input={"path": source, "check_duplicate_ids": output_format == "parquet"},
    )
    summary = run(SynthesizeJob.model_validate(spec))
    assert (summary["inputs"], summary["rows_written"], summary["errors"]) == (4, 7, 1)
    assert summary["expected_rows"] == 7 and summary_of(f"{bucket}/out/r1", storage)["rows_written"] == 7
    assert summary["prompt_format"] == "janus-pro"
    files = download_dir(f"{bucket}/out/r1/data", storage, tmp_path / "data")
    expected = {(pid, i) for pid in PROMPTS for i in range(2)}
    engine_model = JanusEngine.from_pretrained(str(tiny_model_dir)).model_id

    def check_rows(rows: list[dict]) -> None:
        assert {(r["prompt_id"], r["sample_index"]) for r in rows} == expected and len(rows) == 6
        for r in rows:
            assert r["prompt"] == PROMPTS[r["prompt_id"]] and r["error"] is None
            assert (r["width"], r["height"], r["seed"], r["cfg_weight"], r["run_id"]) == (64, 64, 0, 5.0, "r1")
            assert r["model_id"] == engine_model and r["key"].endswith(f"_{r['sample_index']:04d}")

    if output_format == "parquet":
        ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
        assert isinstance(ds.features["image"], datasets.Image)
        rows = list(ds)
        check_rows([r for r in rows if r["error"] is None])
        assert all(r["image"].size == (64, 64) and r["image"].mode == "RGB" for r in rows if r["error"] is None)
        assert [r["prompt_id"] for r in rows if r["error"]] == ["empty"]
    elif output_format == "webdataset":
        shards = [str(f) for f in files if f.suffix == ".tar"]
        samples = list(wds.WebDataset(shards, shardshuffle=False))
        metas = [json.loads(s["json"]) for s in samples]
        check_rows(metas)
        for s, meta in zip(samples, metas, strict=True):
            assert s["__key__"] == meta["key"] and s["txt"].decode() == PROMPTS[meta["prompt_id"]]
            assert Image.open(io.BytesIO(s["png"])).size == (64, 64)
        hf = datasets.load_dataset("webdataset", data_files=shards, split="train")  # overflowed on uint64 ids
        assert sorted(r["__key__"] for r in hf) == sorted(m["key"] for m in metas)
        assert all(r["png"].size == (64, 64) and int(r["json"]["row_hash"]) > 0 for r in hf)
        errors = pq.read_table([f for f in files if f.name.endswith(".errors.parquet")]).to_pylist()
        assert [(e["prompt_id"], e["error"] is not None) for e in errors] == [("empty", True)]
    else:
        meta = pq.read_table(tmp_path / "data").to_pylist()  # data/ holds Parquet only
        check_rows([m for m in meta if m["error"] is None])
        local = tmp_path / "imagefolder"  # the images/ folder as it is, images/{task}/...
        images = download_dir(f"{bucket}/out/r1/images", storage, local)
        assert {Path(m["file_name"]).name for m in meta if m["file_name"]} == {
            f.name for f in images if f.suffix == ".webp"
        }
        folder = datasets.load_dataset("imagefolder", data_dir=str(local), split="train")
        check_rows(list(folder))
        assert all(r["image"].format == "WEBP" and r["image"].size == (64, 64) for r in folder)


def caption_inputs(bucket: str, storage) -> tuple[str, list[bytes]]:
    images = sample_images(3)
    table = pa.table(
        {
            "image_id": ["a", "b", "c"],
            "image": images,
            "url": [write_bytes_s3(f"{bucket}/img/{i}.bin", b, storage) for i, b in enumerate(images)],
            "question": ["What is this?", "Which colour?", "How many?"],
        }
    )
    return write_parquet(table, f"{bucket}/in/images.parquet", storage), images


def write_bytes_s3(uri: str, data: bytes, storage) -> str:
    from janus_batch.io.storage import write_bytes

    write_bytes(uri, data, storage)
    return uri


def test_caption_s3_bytes_to_webdataset_and_vqa_s3_uris_to_parquet(
    ray_cluster, storage, bucket, tiny_model_dir, tmp_path
):
    source, _ = caption_inputs(bucket, storage)
    common = dict(
        model={"source": str(tiny_model_dir)},
        resources=dict(SMALL_RESOURCES, batch_size=2),
        storage=storage.model_dump(),
        sampling={"max_new_tokens": 6},
    )
    caption = CaptionJob.model_validate(
        dict(common, input={"path": source}, output={"path": f"{bucket}/cap", "format": "webdataset"}, run_id="c")
    )
    summary = run(caption)
    assert (summary["rows_written"], summary["errors"]) == (3, 0)
    files = download_dir(f"{bucket}/cap/c/data", storage, tmp_path / "cap")
    samples = list(wds.WebDataset([str(f) for f in files], shardshuffle=False))
    metas = [json.loads(s["json"]) for s in samples]
    assert sorted(m["image_id"] for m in metas) == ["a", "b", "c"]
    for s, m in zip(samples, metas, strict=True):
        assert s["txt"].decode() == m["caption"] and m["finish_reason"] in ("eos", "length")
        assert 1 <= m["num_tokens"] <= 6 and m["question"] is None and m["error"] is None

    vqa = CaptionJob.model_validate(
        dict(
            common,
            task="vqa",
            input={
                "path": source,
                "image_uri_column": "url",
                "question_column": "question",
                "check_duplicate_ids": False,
            },
            output={"path": f"{bucket}/vqa"},
            run_id="v",
        )
    )
    run(vqa)
    rows = read_parquet_dir(f"{bucket}/vqa/v/data", storage).to_pylist()
    assert sorted((r["image_id"], r["question"]) for r in rows) == [
        ("a", "What is this?"),
        ("b", "Which colour?"),
        ("c", "How many?"),
    ]
    assert all(r["url"].startswith(f"{bucket}/img/") and isinstance(r["answer"], str) for r in rows)
    assert all(r["model_id"] and r["run_id"] == "v" and r["error"] is None for r in rows)

    # The same answers as the engine gives directly: the pipeline adds nothing and loses nothing.
    engine = JanusEngine.from_pretrained(str(tiny_model_dir))
    by_id = {r["image_id"]: r for r in rows}
    direct = engine.understand(
        sample_images(3),
        ["What is this?", "Which colour?", "How many?"],
        TextSampling(max_new_tokens=6),
        row_ids=[by_id[i]["key"] for i in "abc"],
    )
    assert [by_id[i]["answer"] for i in "abc"] == [d.text for d in direct]


def test_caption_image_folder(ray_cluster, storage, tiny_model_dir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, data in enumerate(sample_images(2)):
        (folder / f"{i}.png").write_bytes(data)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    job = CaptionJob.model_validate(
        dict(
            input={"path": str(folder), "format": "images"},
            model={"source": str(tiny_model_dir)},
            resources=SMALL_RESOURCES,
            output={"path": str(tmp_path / "out")},
            sampling={"max_new_tokens": 4},
            run_id="f",
        )
    )
    summary = run(job)
    assert (summary["inputs"], summary["rows_written"], summary["errors"]) == (3, 3, 1)
    rows = {Path(r["path"]).name: r for r in read_parquet_dir(str(tmp_path / "out/f/data"), job.storage).to_pylist()}
    assert sorted(rows) == ["0.png", "1.png", "broken.jpg"]
    for name in ("0.png", "1.png"):  # captioned
        assert rows[name]["error"] is None and rows[name]["caption"] is not None and 1 <= rows[name]["num_tokens"] <= 4
    broken = rows["broken.jpg"]  # an error row with its reason, and no caption
    assert broken["error"].startswith(("not a decodable image", "corrupt or truncated")) and broken["caption"] is None


def synth_images(run_dir: Path) -> dict[tuple[str, int], bytes]:
    table = pq.read_table(run_dir / "data")
    return {(r["prompt_id"], r["sample_index"]): r["image"]["bytes"] for r in table.to_pylist()}


def test_seeds_reproducible_across_batch_sizes_and_actor_counts(ray_cluster, storage, tiny_model_dir, tmp_path):
    prompts = {f"p{i}": f"prompt number {i}, a small red house" for i in range(5)}
    source = write_parquet(prompts_table(prompts), str(tmp_path / "prompts.parquet"), storage)
    runs = {"one": dict(batch_size=1, actors=1), "two": dict(batch_size=3, actors=2, cpus_per_actor=0.25)}
    results = {}
    for name, resources in runs.items():
        spec = synth_spec(
            source,
            str(tmp_path / "out"),
            storage,
            tiny_model_dir,
            run_id=name,
            sampling={"images_per_prompt": 3, "seed": 7},
            input={"path": source, "check_duplicate_ids": False},
            resources=resources,
        )
        run(SynthesizeJob.model_validate(spec))
        results[name] = synth_images(tmp_path / "out" / name)
    assert len(results["one"]) == 15 and results["one"] == results["two"]  # byte for byte

    # ... and the same pixels as the engine called directly, in one batch.
    engine = JanusEngine.from_pretrained(str(tiny_model_dir))
    sampling = ImageSampling(images_per_prompt=3, seed=7)
    direct = engine.generate_images(list(prompts.values()), sampling, prompt_ids=list(prompts))
    for image in direct:
        decoded = np.asarray(Image.open(io.BytesIO(results["one"][(image.prompt_id, image.sample_index)])))
        np.testing.assert_array_equal(decoded, image.pixels)


def test_bad_row_corpus(ray_cluster, storage, bucket, tiny_model_dir, tmp_path, monkeypatch):
    # Prompts as a binary column (Parquet written without a string type): UTF-8 is text; invalid UTF-8 was a crash.
    # Images: tests/test_hostile_rows.py::test_caption_job_over_the_hostile_corpus.
    prompts = pa.table(
        {
            "prompt_id": ["good1", "empty", "long", "null_prompt", None, "dup", "dup", "good2", "bad_utf8"],
            "prompt": pa.array(
                [b"a fox", b"   ", b"x " * 3000, None, b"no id", b"first", b"second", b"a cat", b"\xff\xfe a fox"]
            ),
        }
    )
    source = write_parquet(prompts, f"{bucket}/bad/prompts.parquet", storage)
    summary = run(
        SynthesizeJob.model_validate(synth_spec(source, str(tmp_path / "out"), storage, tiny_model_dir, run_id="b"))
    )
    rows = pq.read_table(tmp_path / "out/b/data").to_pylist()
    errors = {(r["prompt_id"], r["prompt"]): r["error"] for r in rows if r["error"] is not None}
    too_long = errors.pop(("long", "x " * 3000))
    assert too_long.startswith("prompt too long")
    assert errors == {
        ("empty", "   "): "empty prompt",
        ("null_prompt", None): "prompt is null",
        (None, "no id"): "prompt_id is null",
        ("dup", "first"): "duplicate prompt_id 'dup': more than one input row has it",
        ("dup", "second"): "duplicate prompt_id 'dup': more than one input row has it",
        ("bad_utf8", None): "prompt is not valid UTF-8 text (byte 0xff at offset 0)",
    }
    assert all(r["image"] is None and r["sample_index"] is None for r in rows if r["error"])
    good = {(r["prompt_id"], r["sample_index"]): r for r in rows if r["error"] is None}
    assert set(good) == {("good1", 0), ("good1", 1), ("good2", 0), ("good2", 1)}
    assert (summary["rows_written"], summary["errors"]) == (4 + 7, 7)

    # Rerun: every input row has its rows (an error row stands for its prompt's images), so nothing runs.
    spec = synth_spec(source, str(tmp_path / "out"), storage, tiny_model_dir, run_id="b")
    with monkeypatch.context() as m:
        m.setattr(pipeline, "write_outputs", lambda *a: pytest.fail("a finished run was run again"))
        again = run(SynthesizeJob.model_validate(spec))
    assert (again["inputs_done_before"], again["rows_before"], again["rows_written"]) == (9, 11, 0)
    # Resuming with settings that change the outputs would mix two kinds of rows: refused, naming the changes.
    changes = r"sampling.images_per_prompt 2 -> 3; sampling.seed 0 -> 5\): resume it with the spec in"
    with pytest.raises(ValueError, match=changes):
        run(SynthesizeJob.model_validate({**spec, "sampling": {"images_per_prompt": 3, "seed": 5}}))
    assert (
        run(SynthesizeJob.model_validate({**spec, "resources": {**SMALL_RESOURCES, "batch_size": 3}}))["rows_written"]
        == 0
    )  # how it runs may change

    engine = JanusEngine.from_pretrained(str(tiny_model_dir))
    for image in engine.generate_images(
        ["a fox", "a cat"], ImageSampling(images_per_prompt=2), prompt_ids=["good1", "good2"]
    ):
        decoded = np.asarray(Image.open(io.BytesIO(good[(image.prompt_id, image.sample_index)]["image"]["bytes"])))
        np.testing.assert_array_equal(decoded, image.pixels)
