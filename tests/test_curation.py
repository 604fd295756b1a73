"""Curation's pure functions: which candidates a rule keeps, which prompts are duplicates, the score quantiles."""

from __future__ import annotations

import math
import random

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from janus_batch.curation import (
    Candidate,
    SelectionRule,
    find_duplicates,
    normalise_prompt,
    score_quantiles,
    select_candidates,
    select_table,
)

NAN = float("nan")


def kept_indices(candidates: list[Candidate], rule: SelectionRule) -> set[int]:
    selected = select_candidates(candidates, rule)
    return {c.sample_index for c, s in zip(candidates, selected, strict=True) if s.kept}


def ranks_by_index(candidates: list[Candidate], rule: SelectionRule) -> dict[int, int]:
    selected = select_candidates(candidates, rule)
    return {c.sample_index: s.rank for c, s in zip(candidates, selected, strict=True)}


# sample_index, alignment, aesthetic, score; listed out of sample order so that the order given is not the answer
PROMPT = [
    Candidate(3, 0.90, 3.0, 0.70),
    Candidate(0, 0.20, 8.0, 0.95),
    Candidate(5, 0.80, 6.0, 0.80),
    Candidate(1, 0.60, 7.0, 0.60),
    Candidate(4, 0.95, 2.0, 0.50),
    Candidate(2, 0.40, 5.0, 0.10),
]


def test_ranks_by_score_best_first():
    assert ranks_by_index(PROMPT, SelectionRule()) == {0: 1, 5: 2, 3: 3, 1: 4, 4: 5, 2: 6}


def test_top_k_keeps_the_k_best_scores():
    assert kept_indices(PROMPT, SelectionRule(keep_top=2)) == {0, 5}
    assert kept_indices(PROMPT, SelectionRule(keep_top=1)) == {0}


def test_thresholds_alone_keep_every_candidate_that_meets_all_of_them():
    assert kept_indices(PROMPT, SelectionRule(min_alignment=0.6)) == {3, 5, 1, 4}
    assert kept_indices(PROMPT, SelectionRule(min_aesthetic=6.0)) == {0, 5, 1}
    assert kept_indices(PROMPT, SelectionRule(min_alignment=0.6, min_aesthetic=6.0)) == {5, 1}


def test_thresholds_filter_then_top_k_of_what_passes():
    # The best score (sample 0) fails the alignment threshold: the top 2 come from those that pass.
    assert kept_indices(PROMPT, SelectionRule(keep_top=2, min_alignment=0.5)) == {5, 3}
    # Ranks stay over all candidates, whatever passes.
    assert ranks_by_index(PROMPT, SelectionRule(keep_top=2, min_alignment=0.5)) == ranks_by_index(
        PROMPT, SelectionRule()
    )
    # Fewer pass than k: all of those that pass.
    assert kept_indices(PROMPT, SelectionRule(keep_top=3, min_alignment=0.6, min_aesthetic=6.0)) == {5, 1}


def test_no_rule_keeps_all_and_k_beyond_the_candidates_keeps_all():
    assert kept_indices(PROMPT, SelectionRule()) == {0, 1, 2, 3, 4, 5}
    assert kept_indices(PROMPT, SelectionRule(keep_top=100)) == {0, 1, 2, 3, 4, 5}


def test_all_below_threshold_keeps_none():
    rule = SelectionRule(keep_top=2, min_alignment=0.99)
    assert kept_indices(PROMPT, rule) == set()
    assert sorted(ranks_by_index(PROMPT, rule).values()) == [1, 2, 3, 4, 5, 6]


def test_ties_break_by_sample_index_lower_first():
    tied = [Candidate(7, 0.5, 5.0, 0.5), Candidate(2, 0.5, 5.0, 0.5), Candidate(4, 0.5, 5.0, 0.9)]
    tied += [Candidate(9, 0.5, 5.0, 0.5)]
    assert ranks_by_index(tied, SelectionRule()) == {4: 1, 2: 2, 7: 3, 9: 4}
    assert kept_indices(tied, SelectionRule(keep_top=2)) == {4, 2}
    for seed in range(5):  # the order candidates arrive in changes nothing
        shuffled = random.Random(seed).sample(tied, len(tied))
        assert ranks_by_index(shuffled, SelectionRule()) == {4: 1, 2: 2, 7: 3, 9: 4}


def test_nan_and_missing_scores_rank_last_and_are_never_kept_by_top_k():
    candidates = [
        Candidate(0, 0.9, 5.0, NAN),
        Candidate(1, 0.3, 5.0, 0.0),  # the lowest real score still ranks above NaN
        Candidate(2, 0.9, 5.0, None),
        Candidate(3, 0.8, 5.0, 0.4),
    ]
    assert ranks_by_index(candidates, SelectionRule()) == {3: 1, 1: 2, 0: 3, 2: 4}
    assert kept_indices(candidates, SelectionRule(keep_top=3)) == {3, 1}
    # Without top-k the score is not consulted: thresholds alone, or nothing.
    assert kept_indices(candidates, SelectionRule(min_alignment=0.5)) == {0, 2, 3}
    assert kept_indices(candidates, SelectionRule()) == {0, 1, 2, 3}


def test_nan_or_missing_value_fails_its_threshold_only():
    candidates = [Candidate(0, NAN, 9.0, 0.5), Candidate(1, 0.9, None, 0.5), Candidate(2, 0.9, 9.0, 0.5)]
    assert kept_indices(candidates, SelectionRule(min_alignment=0.5)) == {1, 2}
    assert kept_indices(candidates, SelectionRule(min_aesthetic=1.0)) == {0, 2}


def test_repeated_sample_index_is_refused():
    with pytest.raises(ValueError, match="repeat a sample index"):
        select_candidates([Candidate(1, 0.5, 5.0, 0.5), Candidate(1, 0.5, 5.0, 0.4)], SelectionRule())


@pytest.mark.parametrize(
    "fields", [{"keep_top": 0}, {"min_alignment": 1.5}, {"min_alignment": NAN}, {"min_aesthetic": math.inf}, {"k": 1}]
)
def test_bad_rules_are_refused(fields):
    with pytest.raises(ValidationError):
        SelectionRule(**fields)


def candidates_table(rows: list[tuple]) -> pa.Table:
    names = ["row_hash", "sample_index", "alignment", "aesthetic", "score", "error"]
    types = [pa.uint64(), pa.int32(), pa.float32(), pa.float32(), pa.float32(), pa.string()]
    schema = pa.schema(list(zip(names, types, strict=True)))
    return pa.Table.from_pylist([dict(zip(names, row, strict=True)) for row in rows], schema=schema)


P, Q, R = 2**63 + 1, 2**63 + 2, 5  # row hashes beyond int64, as Ray Data's are
TABLE_ROWS = [
    (P, 0, 0.9, 5.0, 0.3, None),
    (Q, 0, 0.9, 5.0, 0.8, None),
    (P, 1, 0.9, 5.0, 0.7, None),
    (R, None, None, None, None, "prompt is empty"),
    (Q, 1, 0.2, 5.0, 0.9, None),
    (P, 2, 0.9, 5.0, 0.5, None),
    (Q, 2, 0.9, 5.0, 0.1, None),
]


def test_select_table_ranks_each_prompt_apart_and_leaves_error_rows_null():
    out = select_table(candidates_table(TABLE_ROWS), SelectionRule(keep_top=1, min_alignment=0.5))
    assert out.schema.field("rank").type == pa.int32() and out.schema.field("kept").type == pa.bool_()
    assert out["row_hash"].to_pylist() == [row[0] for row in TABLE_ROWS]  # the rows keep their order
    assert out["rank"].to_pylist() == [3, 2, 1, None, 1, 2, 3]
    assert out["kept"].to_pylist() == [False, True, True, None, False, False, False]


def test_select_table_does_not_depend_on_row_order():
    def selection(rows):
        out = select_table(candidates_table(rows), SelectionRule(keep_top=2))
        return {(r["row_hash"], r["sample_index"]): (r["rank"], r["kept"]) for r in out.to_pylist()}

    expected = selection(TABLE_ROWS)
    for seed in range(5):
        assert selection(random.Random(seed).sample(TABLE_ROWS, len(TABLE_ROWS))) == expected


def test_normalise_prompt_rules():
    assert normalise_prompt("  A red-apple, on\tthe TABLE!! ") == "a red apple on the table"
    assert normalise_prompt("ＡＢＣ\u00a0ﬁsh") == "abc fish"  # NFKC: fullwidth letters, no-break space, ligature
    assert normalise_prompt("Straße") == normalise_prompt("STRASSE") == "strasse"  # casefold, not lower
    assert normalise_prompt("cafe\u0301") == normalise_prompt("Café") == "café"  # one Unicode form
    assert normalise_prompt("«Hello»…world¿") == "hello world"  # every P* character, not only ASCII's
    assert normalise_prompt("$5 + 🍎 = ☺") == "$5 + 🍎 = ☺"  # symbols are kept
    assert normalise_prompt("!!! ...") == ""


def test_normalise_prompt_is_idempotent():
    for text in ["  A red-apple, on\tthe TABLE!! ", "ＡＢＣ\u00a0ﬁsh", "Straße", "cafe\u0301", "ǰ.\u0301x", "İstanbul"]:
        once = normalise_prompt(text)
        assert normalise_prompt(once) == once


PROMPTS = [
    (40, "A cat on a mat."),
    (10, "a cat on a mat"),  # the smallest key of its normalised text: kept, though listed second
    (30, "a cat on a mat"),
    (20, "A  CAT, on a mat"),
    (50, "A  CAT, on a mat"),  # the text of 20, which is dropped too: 10 is kept for it
    (2**63 + 7, "a dog"),
    (60, "a dog"),  # 60 < 2**63 + 7: this one is kept
    (70, None),  # no prompt: the job's error, not a duplicate
    (80, "a bird"),
]


def duplicates_of(pairs: list[tuple[int, str | None]]) -> dict[int, int]:
    return find_duplicates([k for k, _ in pairs], [p for _, p in pairs])


def test_find_duplicates_keeps_the_smallest_key_of_each_normalised_text():
    assert duplicates_of(PROMPTS) == {40: 10, 30: 10, 20: 10, 50: 10, 2**63 + 7: 60}


def test_find_duplicates_is_the_same_whatever_the_order():
    expected = duplicates_of(PROMPTS)
    for seed in range(10):
        rng = random.Random(seed)
        shuffled = rng.sample(PROMPTS, len(PROMPTS))
        cut = rng.randrange(1, len(PROMPTS))
        assert duplicates_of(shuffled[cut:] + shuffled[:cut]) == expected


def test_find_duplicates_without_duplicates_drops_nothing():
    assert duplicates_of([(1, "a"), (2, "b"), (3, None), (4, None)]) == {}


def test_blank_and_punctuation_only_prompts_are_not_duplicates():
    # They normalise to nothing: each is its own error row in the job, none is kept for the others.
    assert duplicates_of([(1, ""), (2, "   "), (3, "!!!"), (4, "..."), (5, "a"), (6, "A.")]) == {6: 5}


def test_find_duplicates_refuses_repeated_keys():
    with pytest.raises(ValueError, match="unique"):
        duplicates_of([(1, "a"), (1, "b")])


def test_score_quantiles_ignore_null_and_nan():
    values = [float(v) for v in range(101)]
    table = pa.table(
        {
            "alignment": pa.array([v / 100 for v in values] + [None, NAN], pa.float64()),
            "aesthetic": pa.chunked_array(
                [pa.array(values[:50] + [None], pa.float32()), pa.array(values[50:] + [NAN], pa.float32())]
            ),
            "score": pa.array([None] * 100 + [NAN, NAN, NAN], pa.float32()),
        }
    )
    quantiles = score_quantiles(table)
    assert quantiles["aesthetic"] == {"p05": 5.0, "p25": 25.0, "p50": 50.0, "p75": 75.0, "p95": 95.0, "mean": 50.0}
    assert quantiles["alignment"] == pytest.approx(
        {"p05": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95, "mean": 0.5}
    )
    assert quantiles["score"] is None


def test_score_quantiles_match_numpy_linear_percentiles():
    rng = np.random.default_rng(0)
    values = rng.random(37)
    quantiles = score_quantiles(pa.table({"score": values}), columns=["score"])["score"]
    expected = dict(zip(["p05", "p25", "p50", "p75", "p95"], np.percentile(values, [5, 25, 50, 75, 95]), strict=True))
    assert quantiles == pytest.approx({**expected, "mean": values.mean()}, rel=1e-12)


def test_score_quantiles_of_nothing_are_none():
    no_rows = pa.table({name: pa.array([], pa.float32()) for name in ["alignment", "aesthetic", "score"]})
    assert score_quantiles(no_rows) == {"alignment": None, "aesthetic": None, "score": None}
    no_values = pa.table(
        {"alignment": pa.array([None, None], pa.float32()), "aesthetic": [None, None], "score": [NAN, None]}
    )
    assert score_quantiles(no_values) == {"alignment": None, "aesthetic": None, "score": None}
