"""The curate and score job kinds: the curation actor in-process on the tiny model (selection, kept-only images,
captions, error rows, duplicate prompts), then end to end on the session's Ray cluster and S3 server in every
output format, a run cut short by failing writes and resumed, and pipelines/score.py over a Parquet corpus."""

from __future__ import annotations

import collections
import io
import json
import tarfile
import threading
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from janus_batch import stages
from janus_batch.curation import SelectionRule
from janus_batch.engine import JanusEngine, Scorer
from janus_batch.io.storage import StorageConfig
from janus_batch.jobs import ModelSpec, run
from janus_batch.jobs.curate import CurateJob, duplicate_prompt_errors, repeated_values
from janus_batch.options import ImageSampling, ScoreOptions, TextSampling
from tests.fault_proxy import FaultProxy
from tests.helpers import encoded
from tests.jobs_data import synth_spec, write_parquet
from tests.test_jobs_e2e import download_dir
from tests.test_jobs_units import run_script

pytest_plugins = ["tests.jobs_fixtures"]

SAMPLING = ImageSampling(images_per_prompt=4)
CAPTIONS = TextSampling(max_new_tokens=3)
PROMPTS = ["a red fox in the snow", "a lighthouse on a cliff", "a bowl of ramen"]


def prompt_block(prompts: list, dropped: dict | None = None) -> pa.Table:
    """Input rows as the prepare stage makes them (row_hash 1, 2, ... and ids p0, p1, ...)."""
    n = len(prompts)
    table = pa.table(
        {
            "row_hash": pa.array(range(1, n + 1), pa.uint64()),
            "prompt_id": [f"p{i}" for i in range(n)],
            "prompt": prompts,
        }
    )
    return stages.prepare_prompts(
        table, prompt_column="prompt", id_column="prompt_id", duplicates=set(), dropped=dropped
    )


@pytest.fixture(scope="module")
def make_curator(tiny_model_dir):
    def make(selection: SelectionRule, *, write_all: bool = False, caption: bool = False) -> stages.Curator:
        return stages.Curator(
            model=ModelSpec(source=str(tiny_model_dir)).model_dump(),
            gpus=0,
            storage=StorageConfig(),
            batching=dict(max_batch_rows=16, gpu_memory_utilization=0.9),
            call_timeout_s=600,
            sampling=SAMPLING,
            scores=ScoreOptions(),
            selection=selection,
            caption_sampling=CAPTIONS if caption else None,
            caption_instruction="Describe this image.",
            write_all=write_all,
        )

    return make


@pytest.fixture(scope="module")
def all_candidates(make_curator) -> tuple[stages.Curator, list[dict]]:
    """Every candidate of PROMPTS kept, with its pixels: the scores the selections below choose by."""
    curator = make_curator(SelectionRule(), write_all=True)
    return curator, curator(prompt_block(PROMPTS)).to_pylist()


def by_prompt(rows: list[dict]) -> dict[int, list[dict]]:
    groups: dict[int, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["row_hash"], []).append(row)
    return groups


def expected_kept(rows: list[dict], rule: SelectionRule) -> set[tuple[int, int]]:
    """(row_hash, sample_index) of the rows `rule` keeps, worked out here: thresholds, then the k best by score,
    ties by sample index."""
    kept = set()
    for row_hash, group in by_prompt(rows).items():
        passed = [
            r
            for r in group
            if (rule.min_alignment is None or r["alignment"] >= rule.min_alignment)
            and (rule.min_aesthetic is None or r["aesthetic"] >= rule.min_aesthetic)
        ]
        passed.sort(key=lambda r: (-r["score"], r["sample_index"]))
        kept |= {(row_hash, r["sample_index"]) for r in passed[: rule.keep_top or len(passed)]}
    return kept


def test_candidates_are_scored_on_their_generated_pixels(all_candidates):
    curator, rows = all_candidates
    assert len(rows) == len(PROMPTS) * SAMPLING.images_per_prompt
    assert all(r["error"] is None and r["kept"] and r["caption"] is None for r in rows)
    for group in by_prompt(rows).values():
        assert sorted(r["rank"] for r in group) == [1, 2, 3, 4]
        assert [r["sample_index"] for r in sorted(group, key=lambda r: r["rank"])] == [
            r["sample_index"] for r in sorted(group, key=lambda r: (-r["score"], r["sample_index"]))
        ]
    # Scored again here, on the pixels the rows carry, by a Scorer of its own.
    pixels = np.stack([np.frombuffer(r["pixels"], np.uint8).reshape(r["height"], r["width"], 3) for r in rows])
    again = Scorer(curator.engine, ScoreOptions()).score(pixels, [r["prompt"] for r in rows])
    np.testing.assert_allclose([r["alignment"] for r in rows], [s.alignment for s in again], rtol=1e-5)
    np.testing.assert_allclose([r["aesthetic"] for r in rows], [s.aesthetic for s in again], rtol=1e-5)
    np.testing.assert_allclose([r["score"] for r in rows], [s.combined for s in again], rtol=1e-5)
    assert len({r["score"] for r in rows}) > 1  # the scores tell the candidates apart


@pytest.mark.parametrize("rule_of", ["top-k", "thresholds", "both"])
def test_selection_keeps_exactly_the_right_rows_and_only_their_images(all_candidates, make_curator, rule_of):
    _, everything = all_candidates
    alignment = float(np.median([r["alignment"] for r in everything]))
    aesthetic = float(np.median([r["aesthetic"] for r in everything]))
    rule = {
        "top-k": SelectionRule(keep_top=2),
        "thresholds": SelectionRule(min_alignment=alignment, min_aesthetic=aesthetic),
        "both": SelectionRule(keep_top=1, min_aesthetic=aesthetic),
    }[rule_of]
    rows = make_curator(rule)(prompt_block(PROMPTS)).to_pylist()
    kept = {(r["row_hash"], r["sample_index"]) for r in rows if r["kept"]}
    assert kept == expected_kept(everything, rule)
    assert 0 < len(kept) < len(rows)
    assert len(rows) == len(everything)  # every candidate's row, kept or not
    assert all((r["pixels"] is not None) == r["kept"] for r in rows)  # kept-only: the others have no image
    assert all(r["caption"] is None for r in rows)


def test_captions_are_on_the_kept_rows_only(make_curator):
    curator = make_curator(SelectionRule(keep_top=1), caption=True)
    rows = curator(prompt_block(PROMPTS)).to_pylist()
    kept = [r for r in rows if r["kept"]]
    assert len(kept) == len(PROMPTS)
    assert all(r["caption"] is None for r in rows if not r["kept"])
    # The caption of a kept image is the engine's caption of its pixels, keyed on the row's output key.
    pixels = [np.frombuffer(r["pixels"], np.uint8).reshape(r["height"], r["width"], 3) for r in kept]
    keys = [stages.candidate_key(r["row_hash"], r["sample_index"]) for r in kept]
    texts = curator.engine.understand(pixels, None, CAPTIONS, instruction="Describe this image.", row_ids=keys)
    assert [r["caption"] for r in kept] == [t.text for t in texts]


def test_the_kept_duplicate_is_a_row_that_is_generated():
    # Rows 1 and 2 share an id (each an error row), row 5 has none: none of them is kept for the text, nor drops
    # another; of the rest, row 3 has the smallest hash and is the one the errors name.
    table = pa.table(
        {
            "row_hash": pa.array([1, 2, 3, 4, 5], pa.uint64()),
            "prompt": ["a fox", "a fox", "A fox", "a fox", "a fox"],
            "prompt_id": ["x", "x", "y", "z", None],
        }
    )
    assert duplicate_prompt_errors(table, "prompt", "prompt_id", {"x"}) == {
        4: "duplicate prompt: same text as 'y' once normalised"
    }
    assert duplicate_prompt_errors(table, "prompt", None, set()) == {
        2: "duplicate prompt: same text as 'a fox'",
        3: "duplicate prompt: same text as 'a fox' once normalised",
        4: "duplicate prompt: same text as 'a fox'",
        5: "duplicate prompt: same text as 'a fox'",
    }


def test_bad_and_duplicate_prompts_are_error_rows(make_curator):
    prompts = ["a red fox", "a red fox", None, "", "word " * 3000, "A  Red FOX!", "a cat"]
    block = pa.table({"row_hash": pa.array(range(1, 8), pa.uint64()), "prompt_id": [f"p{i}" for i in range(7)]})
    dropped = duplicate_prompt_errors(block.append_column("prompt", pa.array(prompts)), "prompt", "prompt_id", set())
    assert dropped == {
        2: "duplicate prompt: same text as 'p0'",
        6: "duplicate prompt: same text as 'p0' once normalised",
    }
    rows = make_curator(SelectionRule(keep_top=2))(prompt_block(prompts, dropped)).to_pylist()
    errors = {r["prompt_id"]: r["error"] for r in rows if r["error"] is not None}
    assert set(errors) == {"p1", "p2", "p3", "p4", "p5"}
    assert errors["p2"] == "prompt is null" and errors["p3"] == "empty prompt" and "too long" in errors["p4"]
    for row in rows:
        if row["error"] is not None:  # one row, nothing generated
            assert [row[c] for c in ("sample_index", "pixels", "score", "rank", "kept")] == [None] * 5
    made = by_prompt([r for r in rows if r["error"] is None])
    assert sorted(made) == [1, 7] and all(len(g) == 4 and sum(r["kept"] for r in g) == 2 for g in made.values())


def test_repeated_ids_are_found_as_the_distributed_count_finds_them():
    # The curate kind counts its ids on the driver, from the pass that reads its prompts: NaN is one id, as in Ray's
    # group-by (readers.duplicate_ids); nulls are nobody's duplicates.
    assert repeated_values(pa.chunked_array([["a", "b", "a", None, None, "c"]])) == {"a"}
    assert repeated_values(pa.chunked_array([[float("nan"), 1.0, float("nan"), 2.0]])) == {"NaN"}


# ---- end to end: the session's Ray cluster, the S3 server ------------------------------------------------

E2E_PROMPTS = {
    "fox": "a red fox in the snow",
    "sea": "a lighthouse above a stormy sea",
    "city": "a city street at night",
    "fox2": "a red fox in the snow",  # an exact duplicate of fox
    "fox3": "A red fox, in the SNOW!",  # a duplicate of fox once normalised
}


def curate_spec(source: str, output: str, storage, model_dir, output_format: str, **overrides) -> CurateJob:
    spec = synth_spec(
        source,
        output,
        storage,
        model_dir,
        sampling={"images_per_prompt": 4},
        selection={"keep_top": 2},
        caption=True,
        caption_sampling={"max_new_tokens": 3},
        output={"format": output_format, "rows_per_file": 4},
        **overrides,
    )
    return CurateJob.model_validate(spec)


def data_rows(run_dir: str, storage, local: Path) -> tuple[list[dict], list[Path]]:
    """Every output row's columns (image aside), from the data files of any format: Parquet, tar JSONs and the
    side files."""
    files = download_dir(f"{run_dir}/data", storage, local)
    rows = []
    for f in files:
        if f.suffix == ".tar":
            with tarfile.open(f) as tar:
                rows += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
        else:
            rows += [{k: v for k, v in r.items() if k != "image"} for r in pq.read_table(f).to_pylist()]
    return rows, files


@pytest.mark.parametrize("output_format", ["parquet", "webdataset", "files"])
def test_curate_s3_to_s3(ray_cluster, storage, bucket, tiny_model_dir, tmp_path, output_format):
    table = pa.table({"prompt_id": list(E2E_PROMPTS), "prompt": list(E2E_PROMPTS.values())})
    source = write_parquet(table, f"{bucket}/prompts/p.parquet", storage)
    spec = curate_spec(source, f"{bucket}/out", storage, tiny_model_dir, output_format, run_id="c")
    summary = run(spec)
    assert (summary["status"], summary["candidates"], summary["kept"]) == ("succeeded", 12, 6)
    assert summary["errors"] == 2  # the duplicates of fox, counted by kind below
    assert summary["selection"] == {
        "keep_top": 2,
        "min_alignment": None,
        "min_aesthetic": None,
        "score_weights": {"alignment": 1.0, "aesthetic": 1.0},
    }
    assert set(summary["score_quantiles"]) == {"alignment", "aesthetic", "score"}
    assert 0 <= summary["score_quantiles"]["score"]["p05"] <= summary["score_quantiles"]["score"]["p95"] <= 1

    rows, files = data_rows(f"{bucket}/out/c", storage, tmp_path / "data")
    candidates = [r for r in rows if r["error"] is None]
    assert len(candidates) == 12 and sum(r["kept"] for r in candidates) == 6
    assert all((r["caption"] is not None) == r["kept"] for r in candidates)
    assert all(0 <= r["alignment"] <= 1 and 1 <= r["aesthetic"] <= 9 for r in candidates)
    # Of a normalised text, the row with the smallest row_hash is kept (a hash of file and position: the same on a
    # rerun); each dropped row names it, "once normalised" where its text is not the kept row's very text.
    fox = {r["prompt_id"]: r for r in rows if r["prompt_id"].startswith("fox")}
    smallest = min(fox, key=lambda p: int(fox[p]["row_hash"]))
    assert {p for p, r in fox.items() if r["error"] is None} == {smallest}
    exact = {p for p in fox if p != smallest and E2E_PROMPTS[p] == E2E_PROMPTS[smallest]}
    want = {
        p: f"duplicate prompt: same text as {smallest!r}" + ("" if p in exact else " once normalised")
        for p in set(fox) - {smallest}
    }
    assert {r["prompt_id"]: r["error"] for r in rows if r["error"]} == want
    assert (summary["duplicates_exact"], summary["duplicates_normalised"]) == (len(exact), 2 - len(exact))
    kept_keys = {r["key"] for r in candidates if r["kept"]}
    if output_format == "parquet":
        ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
        assert isinstance(ds.features["image"], datasets.Image)
        assert {r["key"] for r in ds if r["image"] is not None} == kept_keys
        assert all(r["image"].size == (64, 64) and r["caption"] for r in ds if r["image"] is not None)
    elif output_format == "webdataset":
        shards = [str(f) for f in files if f.suffix == ".tar"]
        samples = list(wds.WebDataset(shards, shardshuffle=False))
        assert {s["__key__"] for s in samples} == kept_keys  # the unkept and error rows are in the side files
        assert all(Image.open(io.BytesIO(s["png"])).size == (64, 64) for s in samples)
        hf = datasets.load_dataset("webdataset", data_files=shards, split="train")
        assert all(r["json"]["kept"] and r["json"]["caption"] for r in hf) and len(hf) == 6
        aside = pq.read_table([f for f in files if f.suffix == ".parquet"])  # beside a shard, or of no sample
        assert aside.num_rows == 8 and "image" not in aside.column_names
    else:
        assert {Path(r["file_name"]).stem for r in rows if r["file_name"]} == kept_keys
        local = tmp_path / "imagefolder"
        download_dir(f"{bucket}/out/c/images", storage, local)
        folder = datasets.load_dataset("imagefolder", data_dir=str(local), split="train")
        assert {r["key"] for r in folder} == kept_keys and all(r["caption"] for r in folder)


def test_a_curate_run_cut_short_then_resumed_keeps_what_one_uninterrupted_call_keeps(
    ray_cluster, storage, s3_server, tiny_model_dir, tmp_path, make_curator
):
    bucket = s3_server.make_bucket()
    prompts = {f"p{i}": f"a house by a lake, number {i}" for i in range(4)}
    source = write_parquet(
        pa.table({"prompt_id": list(prompts), "prompt": list(prompts.values())}), f"{bucket}/p.parquet", storage
    )
    fast = {"batch_size": 1}
    # What an uninterrupted run keeps: the curation actor's call on all four prompts at once, in this process (its
    # images are keyed on the prompt ids, p0..., whatever the batch).
    expected = make_curator(SelectionRule(keep_top=2))(prompt_block(list(prompts.values()))).to_pylist()

    with FaultProxy(s3_server.endpoint_url, seed=0) as proxy:
        faulty = StorageConfig.model_validate(
            {**storage.model_dump(), "endpoint_url": proxy.url, "retries": {"attempts": 2, "max_seconds": 5}}
        )
        spec = curate_spec(source, f"{bucket}/out", faulty, tiny_model_dir, "parquet", run_id="cut", resources=fast)
        stop = threading.Event()

        def fail_data_puts_after_one() -> None:
            while not stop.is_set() and proxy.count("PUT", r"/_index/") < 1:
                time.sleep(0.05)
            proxy.set(rate=1.0, kinds=["slowdown"], methods={"PUT"}, path_regex=r"/data/")

        watcher = threading.Thread(target=fail_data_puts_after_one, daemon=True)
        watcher.start()
        with pytest.raises(Exception):  # noqa: B017 (the write's failure, as Ray wraps it)
            run(spec)
        stop.set()
        watcher.join()
        proxy.set(rate=0.0)
        cut, _ = data_rows(f"{bucket}/out/cut", storage, tmp_path / "cut-before")
        assert 0 < len(cut) < 16  # cut short, some prompts committed
        resumed = run(spec)
    assert resumed["status"] == "succeeded" and 0 < resumed["inputs_done_before"] < 4
    again, _ = data_rows(f"{bucket}/out/cut", storage, tmp_path / "cut-after")

    def kept(rows: list[dict]) -> collections.Counter:
        return collections.Counter((r["prompt_id"], r["sample_index"]) for r in rows if r["kept"])

    assert kept(again) == kept(expected) and len(kept(expected)) == 8  # the same set, none twice
    assert len(again) == len(expected) == 16 and resumed["kept"] == 8


def test_score_pipeline_scores_a_corpus_once(ray_cluster, tiny_model_dir, tmp_path, monkeypatch, capsys):
    # `python pipelines/score.py` over a Parquet corpus made elsewhere: every row scored as the Scorer scores its
    # preprocessed pixels; a bad image, or a null in the prompt column, is the row's error; a rerun makes 0 rows.
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(3)]
    # Id and prompt dictionary-encoded, as pandas writes a category column: the duplicate-id pass crashed on them.
    table = pa.table(
        {
            "image_id": pa.array(["a", "b", "c", "bad", "null"]).dictionary_encode(),
            "image": [encoded(im) for im in images] + [b"not an image", encoded(images[0])],
            "prompt": pa.array(["a red fox", "portrait", "a lighthouse on a cliff", "x", None]).dictionary_encode(),
        }
    )
    corpus = write_parquet(table, str(tmp_path / "corpus.parquet"), StorageConfig())
    args = ["--input", corpus, "--prompt-column", "prompt", "--model", str(tiny_model_dir), "--output",
            str(tmp_path / "out"), "--run-id", "s", "--actors", "1", "--cpus-per-actor", "0.5", "--gpus-per-actor",
            "0"]  # fmt: skip
    run_script("score.py", args, monkeypatch)
    summary = json.loads((tmp_path / "out/s/summary.json").read_text())
    assert (summary["status"], summary["rows"], summary["errors"]) == ("succeeded", 5, 2)
    assert set(summary["score_quantiles"]) == {"alignment", "aesthetic", "score"}
    rows = {r["image_id"]: r for r in pq.read_table(tmp_path / "out/s/data").to_pylist()}
    assert rows["bad"]["error"].startswith("not a decodable image") and rows["bad"]["score"] is None
    assert rows["null"]["error"] == "prompt is null"

    engine = JanusEngine.from_pretrained(str(tiny_model_dir), device="cpu")
    pixels = np.stack([engine.prepare_image(encoded(im)) for im in images])
    want = Scorer(engine).score(pixels, ["a red fox", "portrait", "a lighthouse on a cliff"])
    for image_id, score in zip("abc", want, strict=True):
        got = rows[image_id]
        assert got["error"] is None and got["alignment"] == pytest.approx(score.alignment, rel=1e-5, abs=1e-7)
        assert got["aesthetic"] == pytest.approx(score.aesthetic, rel=1e-5)
        assert got["score"] == pytest.approx(score.combined, rel=1e-5, abs=1e-7)

    capsys.readouterr()
    run_script("score.py", args, monkeypatch)
    assert json.loads((tmp_path / "out/s/summary.json").read_text())["rows_written"] == 0
