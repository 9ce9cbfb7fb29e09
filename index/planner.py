"""The filter-aware search planner: how `Searcher.search` answers each query of a batch.

Place in the data flow: `index.searcher.Searcher.search` compiles the request's boolean filter
(index/filters.py: a roaring bitmap over the documents' attribute terms, whose cardinality is
the filter's selectivity, cached per index) and hands the batch here; the chosen plan and its
cost come back on the `SearchResult` (`plan`, `probes`, `scanned`), which the retrieval service
copies into its response's debug fields and its metrics.

Plans, chosen per query (docs/scaling.md, "Filtered search"):
- `exact`: score the selected documents' float vectors (the exact index, the `RFlat` refine
  store, ScaNN's reorder dataset) and keep the best: recall 1 at a cost of one dot product per
  selected document. Chosen when the selected vectors take at most `exact_threshold_kb` (Qdrant
  switches its filtered search to a plain scan of the selected points below the same
  `full_scan_threshold`, 10,000 KB by default), or whenever the ANN plan would scan at least as
  many documents anyway (small corpora, very large k).
- `ann`: the backend's ANN scan with the filter inside it (a FAISS ID selector checked before
  each distance), with nprobe widened per query until the probed lists hold
  `candidates_per_result` x k matching documents, never fewer lists than the index's default
  nprobe (unfiltered: the default nprobe's documents per result at the swept k=10, so k=10
  searches at the swept operating point and k=1000 scans 100 times as much). An nprobe given in the search parameters is kept as the caller's operating point (a
  sweep, an experiment) and widened only as far as k matching documents need. The matching
  documents per list come from the filter's bitmap and the lists' ids, so a filter correlated
  with the clusters (a city) widens only as far as its documents lie, and an uncorrelated one
  widens with 1/selectivity: the filtered top-k is roughly the unfiltered top-(k/selectivity)
  thinned out, so it is the count of *matching* candidates, not of scanned codes, that has to
  reach a multiple of k.
- `postfilter`: an unfiltered ANN search over-fetching k / selectivity x `postfilter_overfetch`
  and dropping non-matching results, doubling the fetch for queries still short of k; leaves are
  widened by the same matching-candidates rule. ScaNN's Python API has no filter argument, so
  this is ScaNN's filtered plan. FAISS never chooses it: its selector costs little inside the
  scan (20k vectors, IVF128 fast-scan + refine, nprobe 8, 200 queries: 15 ms with a 50% filter,
  11 ms unfiltered, 24 ms for the unfiltered k=30 a post-filter would need); it can be forced
  for comparison.

Guarantees (every backend, sharded indexes included): a top-k search returns min(k, matching
documents) results; a query that an ANN plan leaves short (it cannot happen when the partition
ranking is the backend's, but ScaNN ranks leaves itself) is re-answered exactly, or with every
list probed when no float vectors exist. Radius search returns every matching document scoring
>= radius, at most k (k <= 0: no limit): exactly under the exact plan, else by top-k' searches
with k' doubling from 64 until the k'-th score falls under the radius (or k' reaches the limit),
so its recall is the planner's top-k recall.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

PLANS = ("exact", "ann", "postfilter")
SWEPT_K = 10  # the k the default operating point was swept for (index/defaults.py)
_RADIUS_START = 64  # first k' of a radius search's doubling top-k'
_SCORE_BLOCK = 1 << 24  # query x document scores held at once by the exact plan (64 MB)


@dataclasses.dataclass
class Compiled:
    """A filter compiled for one backend: its `Selection` (None: every document) and, for a
    partitioned backend, the matching documents per list / leaf (computed on first use)."""
    selection: object | None
    count: int  # documents of this backend that match (shards: of its slice)
    per_part: np.ndarray | None = None


@dataclasses.dataclass
class Outcome:
    ids: list[np.ndarray]  # internal row ids per query, best first
    scores: list[np.ndarray]  # float32 inner products
    scanned: np.ndarray  # int64 [Q]: documents scored (exact) or whose codes were scanned
    plans: list[str]  # per query: exact | ann | postfilter | empty
    probes: np.ndarray  # int64 [Q]: lists / leaves probed (0: exact)
    fallbacks: int = 0  # queries an ANN plan left short, re-answered exactly or by a full scan


def _bucket(p: np.ndarray, floor: int, nparts: int) -> np.ndarray:
    """Probes rounded up to floor * sqrt(2)^j (capped at nparts): one search call per bucket
    keeps a batch batched, and rounding up only adds candidates."""
    grid = sorted({min(nparts, math.ceil(floor * 2 ** (j / 2))) for j in range(64)} | {nparts})
    grid = np.array([g for g in grid if g >= floor] or [nparts], dtype=np.int64)
    return grid[np.minimum(np.searchsorted(grid, p), len(grid) - 1)]


class Planner:
    def __init__(self, backend, config=None):
        from index.config import SearchPlannerConfig

        self.backend = backend
        self.config = config or SearchPlannerConfig()
        self.config.validate()

    # --- compiling --------------------------------------------------------------------
    @property
    def partitioned(self) -> bool:
        return getattr(self.backend, "probe_param", None) is not None

    def compile(self, selection) -> Compiled:
        if not self.partitioned:
            return Compiled(selection, self.backend.ntotal if selection is None else selection.size)
        sizes = self.backend.partition_sizes()
        if selection is None:
            counts = np.asarray(sizes, np.int64)
        else:
            ids, parts = self.backend.partition_members()
            counts = np.bincount(parts[selection.mask()[ids]], minlength=self.backend.nparts)
        return Compiled(selection, int(counts.sum()), counts.astype(np.int64))

    def exact_threshold(self) -> int:
        """Selected documents scored exactly at most (vectors of 4*d bytes)."""
        return self.config.exact_threshold_kb * 1024 // (4 * self.backend.d)

    # --- entry point ------------------------------------------------------------------
    def search(self, Q: np.ndarray, k: int, compiled: Compiled, *, radius: float | None = None,
               params: dict | None = None, plan: str = "auto") -> Outcome:
        if plan not in ("auto", *PLANS):
            raise ValueError(f"unknown search plan {plan!r}; choose auto or one of {list(PLANS)}")
        nq, m = len(Q), compiled.count
        if m == 0:
            return Outcome([np.zeros(0, np.int64)] * nq, [np.zeros(0, np.float32)] * nq,
                           np.zeros(nq, np.int64), ["empty"] * nq, np.zeros(nq, np.int64))
        if radius is None:
            return self._topk(Q, min(int(k), m), compiled, params, plan)
        return self._radius(Q, float(radius), int(k), compiled, params, plan)

    # --- choosing ---------------------------------------------------------------------
    def choose(self, Q, kk: int, compiled: Compiled, params, plan: str):
        """-> (plan per query, probes per query, estimated documents scanned per query)."""
        be, nq, m = self.backend, len(Q), compiled.count
        vectors = be.exact_vectors()
        if plan == "exact" and vectors is None:
            raise ValueError(f"plan exact needs float vectors; this {be.name} index keeps none "
                             "(no exact refine stage / no reorder)")
        if not self.partitioned:  # the exact backend
            return np.array(["exact"] * nq, object), np.zeros(nq, np.int64), np.full(nq, m, np.int64)
        filtered = compiled.selection is not None
        if plan in ("auto", "exact") and vectors is not None and self._covers_all(compiled) and (
                plan == "exact" or (filtered and m <= self.exact_threshold())):
            # exact whatever the ANN plan would cost: no need to rank the lists
            return np.array(["exact"] * nq, object), np.zeros(nq, np.int64), np.full(nq, m, np.int64)
        floor = be.default_probes(params)
        if params and be.probe_param in params:
            # The caller's operating point (a sweep, an experiment, a service's --param): widen
            # only as far as k matching documents need, recall is the caller's choice.
            target = kk
        elif not filtered:
            # The swept operating point (index/defaults.py): the default nprobe for k=SWEPT_K,
            # as many documents per result for a larger k.
            target = min(m, max(kk, math.ceil(kk / SWEPT_K * floor * be.ntotal / be.nparts)))
        else:
            target = min(m, max(kk, math.ceil(self.config.candidates_per_result * kk)))
        probes, cost = self._widen(Q, compiled.per_part, target, floor)
        ann = "ann" if (be.native_filter or not filtered) else "postfilter"
        if plan != "auto":
            plans = np.array([plan if (plan == "exact" or filtered) else "ann"] * nq, object)
        else:
            exact = np.zeros(nq, bool)
            if vectors is not None and self._covers_all(compiled):
                exact = (filtered and m <= self.exact_threshold()) | (m <= cost)
            plans = np.where(exact, "exact", ann).astype(object)
        return plans, probes, cost

    def _covers_all(self, compiled: Compiled) -> bool:
        # The exact plan gathers rows by id: only for an index holding every row (not a shard).
        return compiled.selection is None or self.backend.ntotal == compiled.selection.count

    def _widen(self, Q, counts, target: int, floor: int):
        """Per query: the fewest lists (>= floor), nearest first, holding `target` matching
        documents, rounded up to a probe bucket (`_bucket`), and the documents those lists
        hold. The first ranking goes twice as deep as the matching documents' average density
        says is needed, which answers most queries; the rest are ranked four times deeper."""
        be = self.backend
        nparts, sizes = be.nparts, np.asarray(be.partition_sizes(), np.int64)
        floor = max(1, min(floor, nparts))
        probes = np.full(len(Q), nparts, np.int64)
        cost = np.zeros(len(Q), np.int64)
        density = max(1.0, counts.sum()) / nparts
        P = int(min(nparts, max(2 * floor, math.ceil(2 * target / density))))
        todo = np.arange(len(Q))
        while len(todo):
            lists = be.rank_partitions(Q[todo], P)
            valid = lists >= 0
            safe = np.maximum(lists, 0)
            have = np.where(valid, counts[safe], 0).cumsum(1)
            scanned = np.where(valid, sizes[safe], 0).cumsum(1)
            reached = have[:, -1] >= target
            n = np.where(reached, np.argmax(have >= target, axis=1) + 1, nparts)
            n = _bucket(np.maximum(n, floor), floor, nparts)
            done = (n <= lists.shape[1]) | (P >= nparts)
            n = np.minimum(n, lists.shape[1])
            rows = np.nonzero(done)[0]
            probes[todo[rows]] = n[rows]
            cost[todo[rows]] = scanned[rows, n[rows] - 1]
            todo, P = todo[~done], min(nparts, 4 * P)
        return probes, cost

    # --- top-k ------------------------------------------------------------------------
    def _exact_rows(self, Q, plans, probes, compiled: Compiled, **exact_args):
        """Per-query (ids, scores, scanned) lists with the exact-plan queries answered
        (`_exact(..., **exact_args)`) and their probes set to 0; the other entries stay empty."""
        nq = len(Q)
        ids: list = [None] * nq
        scores: list = [None] * nq
        scanned = np.zeros(nq, np.int64)
        rows = np.nonzero(plans == "exact")[0]
        if len(rows):
            i_, d_, s_ = self._exact(Q[rows], compiled, **exact_args)
            for j, r in enumerate(rows):
                ids[r], scores[r], scanned[r] = i_[j], d_[j], s_[j]
            probes[rows] = 0
        return ids, scores, scanned

    def _topk(self, Q, kk: int, compiled: Compiled, params, plan: str) -> Outcome:
        nq = len(Q)
        plans, probes, cost = self.choose(Q, kk, compiled, params, plan)
        ids, scores, scanned = self._exact_rows(Q, plans, probes, compiled, k=kk)
        if self.partitioned:
            for name in ("ann", "postfilter"):
                for b in np.unique(probes[plans == name]):
                    rows = np.nonzero((plans == name) & (probes == b))[0]
                    p = {**(params or {}), self.backend.probe_param: int(b)}
                    i_, d_ = self._ann(Q[rows], kk, compiled, p, name, cost[rows])
                    for j, r in enumerate(rows):
                        ids[r], scores[r], scanned[r] = i_[j], d_[j], cost[r]
        short = [r for r in range(nq) if len(ids[r]) < kk]
        if short:
            rows = np.array(short)
            i_, d_, s_, how, pr = self._fallback(Q[rows], kk, compiled, params)
            for j, r in enumerate(rows):
                ids[r], scores[r], scanned[r] = i_[j], d_[j], scanned[r] + s_[j]
                plans[r], probes[r] = how, pr
        return Outcome(ids, scores, scanned, [str(p) for p in plans], probes, len(short))

    def _ann(self, Q, kk, compiled, p, name, pool):
        """`pool`: documents in each query's probed lists (what a post-filter can reach)."""
        be = self.backend
        if name == "postfilter" and compiled.selection is not None:
            return self._postfilter(Q, kk, compiled, p, pool)
        D, I, _ = be.search(Q, kk, compiled.selection, p)
        ok = I >= 0
        return ([i[o].astype(np.int64) for i, o in zip(I, ok)],
                [d[o].astype(np.float32) for d, o in zip(D, ok)])

    def _postfilter(self, Q, kk, compiled, p, pool):
        be, sel = self.backend, compiled.selection
        mask, n = sel.mask(), be.ntotal
        share = max(compiled.count / n, 1.0 / n)
        fetch = np.full(len(Q), min(n, math.ceil(kk / share * self.config.postfilter_overfetch)))
        ids: list = [None] * len(Q)
        scores: list = [None] * len(Q)
        todo = np.arange(len(Q))
        while len(todo):
            f = int(fetch[todo].max())
            D, I, _ = be.search(Q[todo], f, None, p)
            more = []
            for row, q in enumerate(todo):
                ok = I[row] >= 0
                ok[ok] = mask[I[row][ok]]
                ids[q], scores[q] = I[row][ok][:kk].astype(np.int64), D[row][ok][:kk].astype(np.float32)
                if len(ids[q]) < kk and f < min(int(pool[q]), n):
                    fetch[q] = min(n, 2 * f)
                    more.append(q)
            todo = np.array(more, dtype=np.int64)
        return ids, scores

    def _fallback(self, Q, kk, compiled, params):
        be = self.backend
        if be.exact_vectors() is not None and self._covers_all(compiled):
            i_, d_, s_ = self._exact(Q, compiled, k=kk)
            return i_, d_, s_, "exact", 0
        p = {**(params or {}), be.probe_param: be.nparts}
        name = "ann" if be.native_filter or compiled.selection is None else "postfilter"
        every = np.full(len(Q), be.ntotal, np.int64)
        i_, d_ = self._ann(Q, kk, compiled, p, name, every)
        return i_, d_, every, name, be.nparts

    # --- exact ------------------------------------------------------------------------
    def _exact(self, Q, compiled: Compiled, *, k: int | None = None, radius: float | None = None,
               limit: int = 0):
        """Top-k (or every score >= radius, at most `limit` if > 0) over the selected rows."""
        be, sel = self.backend, compiled.selection
        if not self.partitioned and (sel is None or sel.size > self.exact_threshold()):
            # The flat index scans every vector with the selector: cheaper than gathering most
            # of the corpus.
            if radius is None:
                D, I, _ = be.search(Q, k, sel)
                ok = I >= 0
                out_i = [i[o].astype(np.int64) for i, o in zip(I, ok)]
                out_d = [d[o].astype(np.float32) for d, o in zip(D, ok)]
            else:
                out_d, out_i, _ = be.range_search(Q, radius, sel)
                if limit > 0:
                    out_d, out_i = [d[:limit] for d in out_d], [i[:limit] for i in out_i]
            return out_i, out_d, np.full(len(Q), be.ntotal, np.int64)
        V = be.exact_vectors()
        rows = None if sel is None else sel.array()
        sub = np.asarray(V if rows is None else V[rows], np.float32)
        m = len(sub)
        out_i, out_d = [], []
        step = max(1, _SCORE_BLOCK // max(1, m))
        for s in range(0, len(Q), step):
            S = Q[s:s + step] @ sub.T
            if radius is None:
                top = np.argpartition(-S, k - 1, axis=1)[:, :k] if k < m else \
                    np.tile(np.arange(m), (len(S), 1))
                vals = np.take_along_axis(S, top, 1)
                order = np.lexsort((top, -vals), axis=-1)  # best first; ties by id, as FAISS
                top = np.take_along_axis(top, order, 1)
                vals = np.take_along_axis(vals, order, 1)
                out_i += list(top if rows is None else rows[top])
                out_d += list(vals.astype(np.float32))
                continue
            for row in S:
                top = np.nonzero(row >= radius)[0]
                top = top[np.lexsort((top, -row[top]))]
                if limit > 0:
                    top = top[:limit]
                out_i.append(top.astype(np.int64) if rows is None else rows[top])
                out_d.append(row[top].astype(np.float32))
        return out_i, out_d, np.full(len(Q), m, np.int64)

    # --- radius -----------------------------------------------------------------------
    def _radius(self, Q, radius: float, k: int, compiled: Compiled, params, plan: str) -> Outcome:
        m = compiled.count
        limit = min(k, m) if k > 0 else m
        start = min(limit, _RADIUS_START)
        plans, probes, _ = self.choose(Q, start, compiled, params, plan)
        ids, scores, scanned = self._exact_rows(Q, plans, probes, compiled, radius=radius, limit=limit)
        fallbacks = 0
        todo = np.nonzero(plans != "exact")[0]
        kq = start
        while len(todo):
            forced = "auto" if plan == "auto" else plan
            out = self._topk(Q[todo], kq, compiled, params, forced)
            fallbacks += out.fallbacks
            more = []
            for j, r in enumerate(todo):
                d, i = out.scores[j], out.ids[j]
                keep = d >= radius
                ids[r], scores[r] = i[keep], d[keep]
                scanned[r] += out.scanned[j]
                plans[r], probes[r] = out.plans[j], out.probes[j]
                if len(d) == kq and keep.all() and kq < limit:
                    more.append(r)
            todo, kq = np.array(more, dtype=np.int64), min(limit, 2 * kq)
        return Outcome(ids, scores, scanned, [str(p) for p in plans], probes, fallbacks)
