"""The curate and score job kinds: the curation actor in-process on the tiny model (selection, kept-only images,
captions, error rows, duplicate prompts), then end to end on the session's Ray cluster and S3 server in every
output format, a run cut short by failing writes and resumed, and pipelines/score.py over a Parquet corpus."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from janus_batch import stages
from janus_batch.curation import SelectionRule
from janus_batch.engine import ImageSampling, ScoreOptions, Scorer, TextSampling
from janus_batch.io.storage import StorageConfig
from janus_batch.jobs import ModelSpec
from janus_batch.jobs.curate import duplicate_prompt_errors

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
            batching=dict(max_batch_rows=16),
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


def test_bad_and_duplicate_prompts_are_error_rows(make_curator):
    prompts = ["a red fox", "a red fox", None, "", "word " * 3000, "A  Red FOX!", "a cat"]
    block = pa.table({"row_hash": pa.array(range(1, 8), pa.uint64()), "prompt_id": [f"p{i}" for i in range(7)]})
    dropped = duplicate_prompt_errors(block.append_column("prompt", pa.array(prompts)), "prompt", "prompt_id")
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
