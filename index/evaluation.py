"""Measurement functions over plain arrays (in the style of faiss/contrib/evaluation.py).

Recall@K against exact search, documents scanned, single-query latency percentiles and batch
QPS: what the sweep, the benchmark and the tests report (paper section 5: tune by recall and
by documents scanned).
"""
from __future__ import annotations

import time

import numpy as np


def recall_at_k(I: np.ndarray, gt: np.ndarray, k: int) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / |exact top-k|; -1 pads are ignored
    (a filtered query may have fewer than k true neighbours).

    This is an ANN index's overlap with exact search's neighbours, not the recall of a held-out
    positive: that is `ebr.recall` (one tie rule for the whole project)."""
    hits, total = 0, 0
    for a, g in zip(I, gt):
        g = set(int(x) for x in np.asarray(g)[:k] if x >= 0)
        if not g:
            continue
        hits += len(g.intersection(int(x) for x in np.asarray(a)[:k] if x >= 0))
        total += len(g)
    return hits / total if total else 1.0


def range_recall(pred: list[np.ndarray], truth: list[np.ndarray]) -> tuple[float, float]:
    """(precision, recall) of radius results pooled over queries."""
    tp = sum(len(np.intersect1d(p, t)) for p, t in zip(pred, truth))
    npred = sum(len(p) for p in pred)
    ntrue = sum(len(t) for t in truth)
    return (tp / npred if npred else 1.0, tp / ntrue if ntrue else 1.0)


def ivf_stats_scanned(fn) -> tuple[object, int, int]:
    """Runs fn() with FAISS's IVF counters reset: (fn's result, codes scanned, queries).
    (faiss.cvar.indexIVF_stats.ndis; fast-scan kernels leave it at 0.)"""
    import faiss

    stats = faiss.cvar.indexIVF_stats
    stats.reset()
    out = fn()
    return out, int(stats.ndis), int(stats.nq)


def latency_percentiles(search_one, Q: np.ndarray, n: int = 200) -> dict:
    """Single-query latency (ms) over the first n queries, one at a time."""
    n = min(n, len(Q))
    search_one(Q[:1])  # warm-up
    times = []
    for i in range(n):
        t = time.perf_counter()
        search_one(Q[i:i + 1])
        times.append((time.perf_counter() - t) * 1e3)
    t = np.array(times)
    return {"p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99)),
            "mean_ms": float(t.mean())}


def batch_qps(search_all, Q: np.ndarray, repeats: int = 3) -> float:
    """Queries per second of one batched call, median of repeats."""
    search_all(Q[: min(len(Q), 16)])  # warm-up
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        search_all(Q)
        rates.append(len(Q) / (time.perf_counter() - t))
    return float(np.median(rates))


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points on the (maximise x, maximise y) Pareto front, sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return sorted(front, key=lambda i: points[i][0])
