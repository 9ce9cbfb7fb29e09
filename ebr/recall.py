"""Exact recall@K, one tie rule for the whole project.

Place in the data flow: the lowest layer (numpy only). Every exact recall computation calls it:
`ebr evaluate` (`trainer.evaluate`), the paper tables (`experiments.paper_tables.metrics`, also
for ensembles and ANN rows) and the benches. It is not `index.evaluation.recall_at_k`, which
measures an ANN index's overlap with exact search's neighbours (a different quantity).

A held-out positive is described by two counts over the candidates: `greater`, the documents
that score strictly higher, and `ties`, the other documents that score the same. Two rules turn
them into a hit at K:

- "random" (the project's recall): the expected hit under uniform random tie-breaking, what a
  deployed index gives on average over the order in which it happens to return equal scores:
  P(hit@K) = clip((K - greater) / (ties + 1), 0, 1); the expected 0-based rank is
  greater + ties / 2.
- "against": ties count against the positive, hit iff greater + ties < K (a lower bound; shown
  beside the random rule where text-only models are compared, since a text-only model scores
  every namesake exactly like the positive).

A positive missing from the corpus (row -1), or absent from a returned list, is a miss at every
K: `greater` is `MISS`.

Scores from float matrix products are not bit-reproducible across columns: BLAS computes equal
embeddings' dot products through different kernels (block edges) and they can differ in the
last bits (measured up to 4.4 float32 eps x max|score| at D=128). Scores within
`tie_ulps` x eps(dtype) x max|finite score of the row| of the positive's therefore count as
ties (`tie_ulps=0`: bitwise equality); integer scores are compared exactly.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

RULES = ("random", "against")
TIE_RULE = ("ties broken at random in expectation: P(hit@K) = clip((K - greater) / (ties + 1), 0, 1), "
            "greater = documents scoring strictly higher than the positive, ties = other documents "
            "scoring the same (within a few float ulps); the ties-against figures count every tie "
            "as ranked above the positive (hit iff greater + ties < K)")
MISS = np.int64(2 ** 62)  # `greater` of a positive that cannot be found: a miss at every K
TIE_ULPS = 16
_SCORE_BUDGET = 16_000_000  # scores (and their comparison masks) held at once


def _tolerance(scores: np.ndarray, tie_ulps: float) -> np.ndarray:
    """Per-row tie tolerance [Q] (see the module docstring)."""
    if not np.issubdtype(scores.dtype, np.floating) or tie_ulps <= 0:
        return np.zeros(len(scores), dtype=np.float64)
    finite = np.where(np.isfinite(scores), np.abs(scores), 0.0)
    return tie_ulps * float(np.finfo(scores.dtype).eps) * finite.max(axis=1).astype(np.float64)


def _excluded(exclude, i: int, positive: int) -> np.ndarray:
    if exclude is None or exclude[i] is None or len(exclude[i]) == 0:
        return np.zeros(0, dtype=np.int64)
    rows = np.unique(np.asarray(exclude[i], dtype=np.int64))
    return rows[rows != positive]  # the positive itself is never excluded


def tie_counts(scores: np.ndarray, positives: Sequence[int], *,
               exclude: Sequence[Iterable[int] | None] | None = None,
               tie_ulps: float = TIE_ULPS) -> tuple[np.ndarray, np.ndarray]:
    """(greater [Q], ties [Q]) of each row's positive among the columns of `scores` [Q, N].

    `positives[i]`: the column of row i's positive, -1 when it is missing from the corpus
    (greater = MISS). `exclude[i]`: columns removed from row i's candidates (the searcher's
    training documents under the `exclude_train` protocol; the positive is never removed).
    Rows are compared a few at a time, so the masks stay within a bounded budget."""
    scores = np.asarray(scores)
    positives = np.asarray(positives, dtype=np.int64)
    if scores.ndim != 2 or len(positives) != len(scores):
        raise ValueError(f"scores must be [Q, N] with one positive per row: got scores "
                         f"{scores.shape}, {len(positives)} positives")
    if exclude is not None and len(exclude) != len(scores):
        raise ValueError(f"{len(exclude)} exclusion lists for {len(scores)} rows")
    n = scores.shape[1]
    if (positives >= n).any():
        raise ValueError(f"positive column {int(positives.max())} outside the {n} scored documents")
    greater = np.full(len(scores), MISS, dtype=np.int64)
    ties = np.zeros(len(scores), dtype=np.int64)
    step = max(1, _SCORE_BUDGET // max(1, n))
    for s in range(0, len(scores), step):
        block, pos = scores[s:s + step], positives[s:s + step]
        found = pos >= 0
        if not found.any():
            continue
        b, p = block[found], pos[found]
        tol = _tolerance(b, tie_ulps)[:, None]
        # Near-equal floats subtract exactly (Sterbenz), so the tolerance test needs no wider type.
        diff = b - b[np.arange(len(b)), p][:, None]
        above = diff > tol
        equal = np.abs(diff) <= tol
        g, t = above.sum(axis=1), equal.sum(axis=1) - 1  # the positive ties with itself
        if exclude is not None:
            for j, i in enumerate(np.flatnonzero(found)):
                rows = _excluded(exclude, s + i, int(p[j]))
                if len(rows):
                    g[j] -= int(above[j, rows].sum())
                    t[j] -= int(equal[j, rows].sum())
        idx = s + np.flatnonzero(found)
        greater[idx], ties[idx] = g, t
    return greater, ties


def exact_tie_counts(queries: np.ndarray, docs: np.ndarray, positives: Sequence[int], *,
                     exclude: Sequence[Iterable[int] | None] | None = None,
                     tie_ulps: float = TIE_ULPS) -> tuple[np.ndarray, np.ndarray]:
    """`tie_counts` of inner-product scores `queries` [Q, D] x `docs` [N, D]^T, computed a few
    query rows at a time (bounded memory: the full [Q, N] matrix is never held)."""
    queries, docs = np.asarray(queries), np.asarray(docs)
    positives = np.asarray(positives, dtype=np.int64)
    step = max(1, _SCORE_BUDGET // max(1, len(docs)))
    g, t = [], []
    for s in range(0, len(queries), step):
        part = None if exclude is None else exclude[s:s + step]
        gi, ti = tie_counts(queries[s:s + step] @ docs.T, positives[s:s + step], exclude=part,
                            tie_ulps=tie_ulps)
        g.append(gi)
        t.append(ti)
    if not g:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(g), np.concatenate(t)


def tie_counts_in_list(returned_scores: Sequence[Sequence[float]], returned_rows: Sequence[Sequence[int]],
                       positives: Sequence[int], *,
                       tie_ulps: float = TIE_ULPS) -> tuple[np.ndarray, np.ndarray]:
    """(greater [Q], ties [Q]) of each query's positive within the ranked list an index or a
    cascade returned: `returned_rows[i]` the documents (any ids comparable to `positives[i]`;
    -1 pads ignored), `returned_scores[i]` their scores. A positive absent from its list is a
    miss (greater = MISS). Only the returned documents are counted: ties the index cut off
    beyond the list's end are not seen."""
    if not (len(returned_scores) == len(returned_rows) == len(positives)):
        raise ValueError(f"{len(returned_scores)} score lists, {len(returned_rows)} row lists and "
                         f"{len(positives)} positives: need one of each per query")
    greater = np.full(len(positives), MISS, dtype=np.int64)
    ties = np.zeros(len(positives), dtype=np.int64)
    for i, (sc, rows, p) in enumerate(zip(returned_scores, returned_rows, positives)):
        rows = list(rows)
        sc = np.asarray(sc)
        if len(sc) != len(rows):
            raise ValueError(f"query {i}: {len(sc)} scores for {len(rows)} returned documents")
        if p is None or (isinstance(p, (int, np.integer)) and p < 0) or p not in rows:
            continue
        keep = np.array([r is not None and not (isinstance(r, (int, np.integer)) and r < 0) for r in rows])
        sc = sc[keep][None, :]
        j = [r for r, k in zip(rows, keep) if k].index(p)
        g, t = tie_counts(sc, [j], tie_ulps=tie_ulps)
        greater[i], ties[i] = g[0], t[0]
    return greater, ties


def hit_probability(greater: np.ndarray, ties: np.ndarray, k: int, rule: str = "random") -> np.ndarray:
    """Per-positive P(hit@k) [Q] under `rule` ("random" or "against")."""
    greater = np.asarray(greater, dtype=np.int64)
    ties = np.asarray(ties, dtype=np.int64)
    if rule == "random":
        return np.clip((k - greater) / (ties + 1.0), 0.0, 1.0)
    if rule == "against":
        return ((greater + ties) < k).astype(np.float64)
    raise ValueError(f"unknown tie rule {rule!r}; rules: {RULES}")


def expected_rank(greater: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """Expected 0-based rank under random tie-breaking, greater + ties / 2 (inf for a miss)."""
    greater = np.asarray(greater, dtype=np.float64)
    out = greater + np.asarray(ties, dtype=np.float64) / 2
    return np.where(greater >= MISS, np.inf, out)


def recall_at(greater: np.ndarray, ties: np.ndarray, ks: Iterable[int], rule: str = "random",
              key: str = "recall@{k}") -> dict[str, float]:
    """Mean P(hit@K) over the positives for every K: {"recall@K": ...} (`key` spells the name)."""
    if len(greater) == 0:
        raise ValueError("recall over no positives")
    return {key.format(k=int(k)): float(hit_probability(greater, ties, int(k), rule).mean()) for k in ks}
