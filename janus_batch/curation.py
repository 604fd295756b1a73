"""Curation without Ray or torch: which candidates of a prompt to keep, which prompts are duplicates, and the score
quantiles of a run. Pure Python over Arrow tables, so the jobs call it from Ray Data stages and the tests call it
directly.

Selection reads the scores the scoring code wrote: `alignment` (P("Yes"), 0 to 1), `aesthetic` (the expected rating,
in the rating scale's units) and the combined `score` (the scoring options hold its weights: selection never
recombines them, so a weight has one home).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from janus_batch.io.schemas import ERROR, ROW_HASH

SAMPLE_INDEX = "sample_index"
ALIGNMENT = "alignment"
AESTHETIC = "aesthetic"
SCORE = "score"
RANK = "rank"
KEPT = "kept"
SCORE_COLUMNS = (ALIGNMENT, AESTHETIC, SCORE)
# What a curated candidate's row adds to a generated image's, in this order (the curate job's model stage and output).
CANDIDATE_FIELDS = [
    *[(name, pa.float32()) for name in SCORE_COLUMNS],
    (RANK, pa.int32()),
    (KEPT, pa.bool_()),
    ("caption", pa.string()),
]
QUANTILES = {"p05": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95}


class SelectionRule(BaseModel):
    """Which of a prompt's candidates are kept.

    The thresholds filter first (a candidate passes when every threshold set is met: value >= threshold), then
    `keep_top` keeps the k best of what passed, by combined score. Only thresholds: every candidate that passes.
    Only `keep_top`: the k best. Neither: every candidate. A NaN or missing value fails any threshold on it, and a
    candidate whose score is NaN or missing is never kept by `keep_top` (so a prompt may keep fewer than k).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True, allow_inf_nan=False)

    keep_top: int | None = Field(None, ge=1, description="keep the k best candidates per prompt by combined score")
    min_alignment: float | None = Field(None, ge=0, le=1, description="keep only alignment (P(Yes)) >= this")
    min_aesthetic: float | None = Field(None, description="keep only aesthetic (the expected rating) >= this")


class Candidate(NamedTuple):
    """One generated image of a prompt and its scores (None or NaN: not available)."""

    sample_index: int
    alignment: float | None
    aesthetic: float | None
    score: float | None


class Selected(NamedTuple):
    rank: int  # 1 = best combined score among the prompt's candidates
    kept: bool


def _known(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def _passes(candidate: Candidate, rule: SelectionRule) -> bool:
    checks = ((rule.min_alignment, candidate.alignment), (rule.min_aesthetic, candidate.aesthetic))
    return all(low is None or (_known(value) and value >= low) for low, value in checks)


def select_candidates(candidates: Sequence[Candidate], rule: SelectionRule) -> list[Selected]:
    """Rank and keep one prompt's candidates; the result is in the candidates' order.

    Rank 1 is the highest score; equal scores rank by sample index, lower first; NaN or missing scores rank last
    (worst), among themselves by sample index. Kept: as `SelectionRule` says.
    """
    indices = [c.sample_index for c in candidates]
    if len(set(indices)) != len(indices):
        raise ValueError(f"a prompt's candidates repeat a sample index: {sorted(indices)}")
    order = sorted(
        range(len(candidates)),
        key=lambda i: (0, -candidates[i].score, indices[i]) if _known(candidates[i].score) else (1, 0, indices[i]),
    )
    ranks = [0] * len(candidates)
    kept = [False] * len(candidates)
    passed = 0
    for rank, i in enumerate(order, start=1):
        ranks[i] = rank
        if not _passes(candidates[i], rule):
            continue
        if rule.keep_top is None:
            kept[i] = True
        elif _known(candidates[i].score) and passed < rule.keep_top:
            kept[i] = True
            passed += 1
    return [Selected(r, k) for r, k in zip(ranks, kept, strict=True)]


def select_table(table: pa.Table, rule: SelectionRule) -> pa.Table:
    """`table` with an int32 `rank` and a bool `kept` column appended, rows in the same order.

    A prompt's candidates are the rows that share a `row_hash`; the table must hold all of them (selection is per
    prompt, and a prompt split across tables would be ranked in parts). Rows with `error` set take no part and get
    a null rank and kept.
    """
    groups: dict[int, list[int]] = {}
    row_hashes, errors = table[ROW_HASH].to_pylist(), table[ERROR].to_pylist()
    for position, (row_hash, error) in enumerate(zip(row_hashes, errors, strict=True)):
        if error is None:
            groups.setdefault(row_hash, []).append(position)
    columns = [table[name].to_pylist() for name in (SAMPLE_INDEX, *SCORE_COLUMNS)]
    ranks: list[int | None] = [None] * table.num_rows
    kept: list[bool | None] = [None] * table.num_rows
    for row_hash, positions in groups.items():
        candidates = [Candidate(*(column[p] for column in columns)) for p in positions]
        if any(c.sample_index is None for c in candidates):
            raise ValueError(f"row_hash {row_hash}: a candidate without an error has no sample_index")
        for p, selected in zip(positions, select_candidates(candidates, rule), strict=True):
            ranks[p], kept[p] = selected
    table = table.append_column(RANK, pa.array(ranks, pa.int32()))
    return table.append_column(KEPT, pa.array(kept, pa.bool_()))


def normalise_prompt(text: str) -> str:
    """The text two prompts share when they differ only in case, whitespace, punctuation or Unicode form.

    Exactly: Unicode NFKC, then `str.casefold`, then NFKC again (casefolding can leave a decomposed form); every
    punctuation character (Unicode category P*: . , ! ? ' " - _ ( ) ...) becomes a space; then runs of whitespace (as
    `str.split` sees it) become one space and both ends are stripped. Symbols (category S*: $ + = emoji) are kept.
    E.g. "  A red-apple, on\\tthe TABLE!! " -> "a red apple on the table".
    """
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def find_duplicates(keys: Sequence[int], prompts: Sequence[str | None]) -> dict[int, int]:
    """The duplicate prompts of a whole dataset, as {dropped row's key: kept row's key}: of the rows that share a
    normalised text (`normalise_prompt`), the one with the smallest key (e.g. `row_hash`) is kept and the others
    dropped. The result depends only on the (key, prompt) pairs, never on their order, so any batching of a
    dataset gives the same rows. Rows whose prompt is null, or normalises to nothing (blank, punctuation only),
    are neither kept nor dropped: they are not duplicates of each other, and their errors belong to the job.
    """
    if None in keys or len(set(keys)) != len(keys):
        raise ValueError("prompt keys must be unique and never null to tell duplicate prompts apart")
    normalised = {key: normalise_prompt(p) for key, p in zip(keys, prompts, strict=True) if p is not None}
    kept_by_norm: dict[str, int] = {}  # normalised text -> the smallest key that has it
    for key, norm in normalised.items():
        if norm and (norm not in kept_by_norm or key < kept_by_norm[norm]):
            kept_by_norm[norm] = key
    return {key: kept_by_norm[norm] for key, norm in normalised.items() if norm and kept_by_norm[norm] != key}


def score_quantiles(table: pa.Table, columns: Sequence[str] = SCORE_COLUMNS) -> dict[str, dict[str, float] | None]:
    """Per score column: its p05, p25, p50, p75, p95 (linear interpolation between the closest ranks) and mean,
    over the values that are neither null nor NaN; None when there are none."""
    result: dict[str, dict[str, float] | None] = {}
    for name in columns:
        values = table[name].drop_null()
        if len(values) > 0:
            values = values.filter(pc.invert(pc.is_nan(values)))
        if len(values) == 0:
            result[name] = None
            continue
        points = pc.quantile(values, q=list(QUANTILES.values()), interpolation="linear").to_pylist()
        result[name] = {**dict(zip(QUANTILES, points, strict=True)), "mean": pc.mean(values).as_py()}
    return result
