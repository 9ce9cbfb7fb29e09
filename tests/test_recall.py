"""The project's one exact-recall rule (`ebr.recall`) on constructed ties, and the evaluation
(`trainer.evaluate`) and paper-table metrics (`experiments.paper_tables.metrics`) giving the same
numbers as it on embeddings with namesakes."""
import numpy as np
import pytest

from ebr import recall


def test_all_tied_scores():
    # 10 documents all scoring 0.5: the positive is tied with 9 others, P(hit@K) = K / 10.
    scores = np.full((1, 10), 0.5, np.float32)
    g, t = recall.tie_counts(scores, [3])
    assert (g[0], t[0]) == (0, 9)
    assert recall.recall_at(g, t, [1, 5, 10, 20]) == {"recall@1": 0.1, "recall@5": 0.5,
                                                       "recall@10": 1.0, "recall@20": 1.0}
    assert recall.recall_at(g, t, [1, 5, 10, 20], rule="against") == {
        "recall@1": 0.0, "recall@5": 0.0, "recall@10": 1.0, "recall@20": 1.0}
    assert recall.expected_rank(g, t)[0] == 4.5


def test_positive_tied_at_the_boundary():
    # 3 documents above, the positive tied with 4 others: ranks 3..7 equally likely.
    scores = np.array([[0.9, 0.8, 0.95, 0.5, 0.5, 0.5, 0.5, 0.5, 0.1, 0.2]], np.float32)
    g, t = recall.tie_counts(scores, [5])
    assert (g[0], t[0]) == (3, 4)
    r = recall.recall_at(g, t, [3, 4, 5, 8])
    assert r == {"recall@3": 0.0, "recall@4": pytest.approx(0.2), "recall@5": pytest.approx(0.4),
                 "recall@8": 1.0}
    assert recall.recall_at(g, t, [4, 7, 8], rule="against") == {"recall@4": 0.0, "recall@7": 0.0,
                                                                 "recall@8": 1.0}
    # no ties: the two rules agree
    g, t = recall.tie_counts(scores, [0])
    assert (g[0], t[0]) == (1, 0)
    assert recall.recall_at(g, t, [1, 2]) == recall.recall_at(g, t, [1, 2], rule="against") == {
        "recall@1": 0.0, "recall@2": 1.0}


def test_missing_positive_is_a_miss_at_every_k():
    scores = np.zeros((2, 5), np.float32)
    g, t = recall.tie_counts(scores, [-1, 0])
    assert g[0] == recall.MISS and recall.expected_rank(g, t)[0] == np.inf
    assert recall.recall_at(g, t, [1, 5, 1000]) == {"recall@1": 0.1, "recall@5": 0.5, "recall@1000": 0.5}
    with pytest.raises(ValueError, match="outside the 5 scored documents"):
        recall.tie_counts(scores, [5, 0])
    with pytest.raises(ValueError, match="unknown tie rule"):
        recall.recall_at(g, t, [1], rule="optimistic")


def test_exclusion_removes_training_documents_but_never_the_positive():
    scores = np.array([[0.9, 0.5, 0.7, 0.7, 0.1]], np.float32)
    g, t = recall.tie_counts(scores, [2])
    assert (g[0], t[0]) == (1, 1)  # 0.9 above, one 0.7 tie
    g, t = recall.tie_counts(scores, [2], exclude=[[0, 2, 0]])  # training doc 0 out, positive kept
    assert (g[0], t[0]) == (0, 1)
    g, t = recall.tie_counts(scores, [2], exclude=[[3]])  # the tied doc out
    assert (g[0], t[0]) == (1, 0)
    g, t = recall.tie_counts(np.tile(scores, (2, 1)), [4, 4], exclude=[None, [0, 1]])
    assert list(g) == [4, 2] and list(t) == [0, 0]


def test_float_noise_between_equal_embeddings_counts_as_a_tie():
    # Equal document vectors: BLAS may return their dot products a few ulps apart.
    s = np.float32(0.3)
    noisy = np.array([[s, np.nextafter(s, np.float32(1)), np.nextafter(s, np.float32(0)), 0.9]], np.float32)
    g, t = recall.tie_counts(noisy, [0])
    assert (g[0], t[0]) == (1, 2)
    g, t = recall.tie_counts(noisy, [0], tie_ulps=0)  # bitwise: one above, one below
    assert (g[0], t[0]) == (2, 0)
    # integer scores (counts) compare exactly
    g, t = recall.tie_counts(np.array([[3, 3, 4, 2]]), [0])
    assert (g[0], t[0]) == (1, 1)


def test_exact_tie_counts_match_the_score_matrix_in_chunks(monkeypatch):
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(50, 8)).astype(np.float32)
    docs[25:] = docs[:25]  # every document has a namesake with the same embedding
    queries = rng.normal(size=(30, 8)).astype(np.float32)
    positives = rng.integers(-1, 50, size=30)
    full = recall.tie_counts(queries @ docs.T, positives)
    monkeypatch.setattr(recall, "_SCORE_BUDGET", 120)  # a few rows at a time
    chunked = recall.exact_tie_counts(queries, docs, positives)
    assert np.array_equal(full[0], chunked[0]) and np.array_equal(full[1], chunked[1])
    found = positives >= 0
    assert (full[1][found] >= 1).all()  # each positive ties at least with its namesake


def test_in_list_version():
    # an index returned 5 documents; the positive (row 7) is tied with rows 2 and 9 in the list
    returned_rows = [[4, 2, 7, 9, 1], [4, 2, 7, 9, 1], [5, 6, -1]]
    returned_scores = [[0.9, 0.5, 0.5, 0.5, 0.2], [0.9, 0.5, 0.5, 0.5, 0.2], [0.4, 0.3, 0.0]]
    g, t = recall.tie_counts_in_list(returned_scores, returned_rows, [7, 1, 8])
    assert list(g[:2]) == [1, 4] and list(t[:2]) == [2, 0]
    assert g[2] == recall.MISS  # absent from its list: a miss
    r = recall.recall_at(g, t, [1, 2, 3, 4, 5])
    assert r["recall@2"] == pytest.approx((1 / 3) / 3) and r["recall@5"] == pytest.approx(2 / 3)
    # string ids work the same way
    g2, t2 = recall.tie_counts_in_list(returned_scores[:1], [["a", "b", "c", "d", "e"]], ["c"])
    assert (g2[0], t2[0]) == (1, 2)
    with pytest.raises(ValueError, match="one of each per query"):
        recall.tie_counts_in_list(returned_scores, returned_rows, [7])


def _namesake_world():
    """Embeddings where half the documents share their text (and so a text-only model's
    embedding) with another document."""
    rng = np.random.default_rng(1)
    docs = rng.normal(size=(40, 4)).astype(np.float32)
    docs[20:] = docs[:20]
    queries = docs[rng.integers(0, 40, size=64)] + rng.normal(scale=0.01, size=(64, 4)).astype(np.float32)
    positives = rng.integers(0, 40, size=64)
    positives[:3] = -1
    return queries.astype(np.float32), docs, positives


def test_paper_tables_metrics_agree_with_ebr_recall():
    from experiments.paper_tables import metrics

    queries, docs, positives = _namesake_world()
    g, t = recall.exact_tie_counts(queries, docs, positives)
    assert (t[positives >= 0] >= 1).all()
    types = np.array(["person", "page"] * 20)
    e = metrics.Embedded(queries, positives, docs, [f"d{i}" for i in range(40)], types)
    m = metrics.model_metrics(e, [1, 5, 10])
    assert {k: m[k] for k in ("recall@1", "recall@5", "recall@10")} == recall.recall_at(g, t, [1, 5, 10])
    assert m["ties_against"] == recall.recall_at(g, t, [1, 5, 10], rule="against")
    assert m["recall@1"] > m["ties_against"]["recall@1"]  # namesakes: the rules differ
    person = (positives >= 0) & (types[np.maximum(positives, 0)] == "person")
    assert m["by_type"]["person"]["recall@5"] == pytest.approx(
        float(recall.hit_probability(g[person], t[person], 5).mean()))


def test_trainer_positive_rank_uses_the_same_counts():
    from trainer.evaluate import positive_rank

    scores = np.array([0.9, 0.5, 0.7, 0.7, 0.1], np.float32)
    assert positive_rank(scores, 2) == ((1, 1), (1, 1))
    assert positive_rank(scores, 2, [0, 2]) == ((1, 1), (0, 1))
    assert positive_rank(scores, 4, [0, 0, 1]) == ((4, 0), (2, 0))
