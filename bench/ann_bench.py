"""ANN benchmark: exact, FAISS IVF-PQ configurations and ScaNN in one run.

    python bench/ann_bench.py --quick --output runs/ann-quick                 # 100k synthetic
    python bench/ann_bench.py --embeddings EMB --query-vectors Q.npy --output runs/ann   # real

Real geometry: EMB from `ebr embed` over `ebr data social` documents (1M) with a trained doc
tower, and Q.npy the query tower's embeddings of held-out sessions. Without them the bench runs
on a synthetic Gaussian mixture on the sphere and says so in the JSON ("data" field).
Target: a FAISS IVF-PQ configuration with recall@10 >= 0.95 vs exact at batch QPS >= ScaNN's
best at recall >= 0.95. Filtered section ("filtered" in the JSON): through the search planner
(index/planner.py), recall@10 against exact filtered search and batch QPS at 0.1%, 1%, 10% and
50% selectivity, for filters correlated with the embedding clusters and not
(`index.synthetic.selectivity_terms`, added to any corpus) and for the corpus's own terms
closest to each selectivity, next to exact filtered search's QPS and the fixed-nprobe filtered
scan of before the planner; `--filtered-only` skips the sweep and uses the default operating
point (index/defaults.py). Prints JSON (also written with the PNG plots to --output).
Same-run baselines: exact search.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import index  # noqa: E402,F401  (import ebr first)
from ebr import config  # noqa: E402
from index import evaluation as ev  # noqa: E402
from index import sweep as sw  # noqa: E402

TARGET = 0.95
SELECTIVITIES = {"0.1%": 0.001, "1%": 0.01, "10%": 0.10, "50%": 0.50}


@dataclasses.dataclass
class AnnBenchConfig:
    quick: bool = False  # 100k documents, smaller grid
    embeddings: str | None = None  # EMB or EMB/VERSION from `ebr embed` (needs --query-vectors)
    query_vectors: str | None = None  # .npy [Q, D]: the query tower over held-out sessions
    docs: int = 0  # synthetic documents; 0: 1M, or 100k with --quick
    queries: int = 1000  # queries (at most this many rows of --query-vectors)
    dim: int = 64  # dimension of the synthetic documents
    k: int = 10  # recall@k against exact search
    seed: int = 0  # synthetic data and FAISS training
    output: str = "runs/ann-bench"  # local directory: ann_bench.json, config.json, plots
    filtered_only: bool = False  # skip the sweep: default operating point, filtered section only


def pick_filters(attrs) -> dict[str, str]:
    """For each target selectivity, the term (or NOT term) whose share of the corpus is closest:
    the corpus decides, so the same bench fits generated, MovieLens or a user's documents."""
    from index.filters import term_expression

    shares = {term_expression(t): len(b) / attrs.count for t, b in attrs.postings.items()}
    candidates = {**{t: v for t, v in shares.items()}, **{f"NOT {t}": 1 - v for t, v in shares.items()}}
    return {label: min(candidates, key=lambda e: (abs(candidates[e] - target), e))
            for label, target in SELECTIVITIES.items()}


def load(cfg: AnnBenchConfig):
    from index import synthetic

    if cfg.embeddings:
        from index.embeddings import read_embeddings

        ids, X, terms, meta = read_embeddings(cfg.embeddings)
        if not cfg.query_vectors:
            raise SystemExit("--embeddings needs --query-vectors (query tower over held-out sessions)")
        Q = np.load(cfg.query_vectors).astype(np.float32)[: cfg.queries]
        return (ids, X, terms, Q, f"embeddings {cfg.embeddings} model {meta.get('model_version')}; "
                                  f"queries {cfg.query_vectors}")
    n = cfg.docs or (100_000 if cfg.quick else 1_000_000)
    ids, X, terms, Q = synthetic.mixture(n, cfg.queries, cfg.dim, seed=cfg.seed)
    return ids, X, terms, Q, "SYNTHETIC: " + synthetic.LABEL + " (trained towers not used)"


def filtered_cost(ids, X, Q, terms, k, backends: dict, repeats: int, seed: int = 0) -> dict:
    """Per selectivity and filter kind: exact filtered search (FAISS flat + ID selector, every
    document scanned: the ground truth and the QPS baseline), then each backend through the
    search planner (its own choice per query, and the ANN / post-filter plan forced), and
    FAISS's fixed-nprobe filtered scan as it was before the planner. `backends`: name ->
    (backend, search params)."""
    from index import synthetic
    from index.filters import AttributeIndex, compile_filter
    from index.searcher import Searcher

    extra, generated = synthetic.selectivity_terms(X, SELECTIVITIES.values(), key="bench",
                                                   seed=seed + 1)
    attrs = AttributeIndex.build([t + e for t, e in zip(terms, extra)])
    corpus = AttributeIndex.build(terms)
    filters = {(label, kind): generated[(s, kind[0])]
               for label, s in SELECTIVITIES.items() for kind in ("correlated", "uncorrelated")}
    filters.update({(label, "corpus term"): e for label, e in pick_filters(corpus).items()})
    exact = backends["exact"][0]
    searchers = {name: Searcher("bench", {"dimension": X.shape[1]}, be, ids, attrs)
                 for name, (be, _) in backends.items() if name != "exact"}
    out = {}
    for (label, kind), expr in filters.items():
        sel = compile_filter(expr, attrs)
        _, gt, _ = exact.search(Q, k, selection=sel)
        row = {"filter": expr, "kind": kind, "selected": sel.size, "selectivity": sel.selectivity,
               "exact_qps": ev.batch_qps(lambda q: exact.search(q, k, selection=sel), Q, repeats)}
        for name, srch in searchers.items():
            be, params = backends[name]
            forced = "ann" if be.native_filter else "postfilter"
            for plan in ("auto", forced):
                run = lambda q, plan=plan: srch.search(q, k, filter=expr, params=params,  # noqa: E731
                                                       plan=plan)
                r = run(Q)
                row[f"{name}_{plan}"] = {
                    "recall": ev.recall_at_k(r.ids, gt, k), "qps": ev.batch_qps(run, Q, repeats),
                    "plans": r.info["plans"], "scanned_mean": float(r.scanned.mean()),
                    "probes_mean": float(r.probes.mean()),
                    "short_of_k": int(sum(len(i) < min(k, sel.size) for i in r.ids))}
            if name == "faiss":  # the fixed-nprobe scan of before the planner
                fixed = lambda q: be.search(q, k, selection=sel, params=params)  # noqa: E731
                row["faiss_fixed_nprobe"] = {"recall": ev.recall_at_k(fixed(Q)[1], gt, k),
                                             "qps": ev.batch_qps(fixed, Q, repeats)}
        out[f"{label} {kind}"] = row
        logging.info("filter %s %s: %s", label, kind, json.dumps(row, default=float))
    return out


def filtered_only(cfg: AnnBenchConfig, ids, X, Q, terms, data_label: str) -> dict:
    """The filtered section alone, at the default operating point (index/defaults.py)."""
    from index.builder import build_backend
    from index.exact import ExactBackend

    t0 = time.time()
    faiss_be = build_backend(X, "faiss", seed=cfg.seed)
    scann_be = build_backend(X, "scann")
    backends = {"exact": (ExactBackend.build(X), None), "faiss": (faiss_be, None),
                "scann": (scann_be, None)}
    filtered = filtered_cost(ids, X, Q, terms, cfg.k, backends, 3, cfg.seed)
    return {"bench": "ann_bench", "data": data_label, "n": len(X), "d": X.shape[1],
            "queries": len(Q), "k": cfg.k, "filtered_only": True,
            "faiss": {"factory": faiss_be.factory, **faiss_be.defaults},
            "scann": scann_be.defaults | {"num_leaves": len(scann_be.centers)},
            "filtered": filtered, "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(ap, AnnBenchConfig)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        cfg = config.from_args(AnnBenchConfig, args)
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    config.announce("ann_bench", cfg)
    import faiss

    from index.exact import ExactBackend
    from index.ivf_pq import IVFPQBackend
    from index.scann_backend import ScaNNBackend, ScaNNConfig

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ids, X, terms, Q, data_label = load(cfg)
    n, d = X.shape
    k = cfg.k
    if cfg.filtered_only:
        report = filtered_only(cfg, ids, X, Q, terms, data_label)
        (out / "ann_bench.json").write_text(json.dumps(report, indent=1, default=float))
        config.save(cfg, str(out))
        print(json.dumps(report, indent=1, default=float))
        return 0
    grid = sw.SweepGrid(nprobes=(4, 8, 16, 32, 64), k_factors=(4, 16, 64),
                        scann_leaves_fraction=(0.01, 0.02, 0.05, 0.1),
                        scann_reorder=(100, 250), scann_num_leaves=(int(2 * np.sqrt(n)),),
                        latency_queries=100 if cfg.quick else 200, repeats=3)
    nlist = 1 << int(round(np.log2(4 * np.sqrt(n))))
    factories = [f"IVF{nlist},PQ{d // 4}",                     # paper default d/4 bytes
                 f"IVF{nlist},PQ{d // 2}x4fs,RFlat",          # d/4 bytes, fast-scan + refine
                 f"IVF{nlist // 4},PQ{d // 2}x4fs,RFlat",
                 f"OPQ{d // 2},IVF{nlist},PQ{d // 2}x4fs,RFlat",
                 f"IVF{nlist},PQ{d // 4},RFlat"]
    gt, exact_row = sw.exact_baseline(X, Q, k, grid)
    rows = [exact_row]
    for fac in factories:
        rows += sw.sweep_faiss(X, Q, gt, k, fac, grid, cfg.seed)
    rows += sw.sweep_scann(X, Q, gt, k, grid)
    for r in rows:
        r["qps_vs_exact"] = r["qps"] / exact_row["qps"]
    best_faiss = sw.choose(rows, TARGET, "faiss")
    best_scann = sw.choose(rows, TARGET, "scann")
    exact_be = ExactBackend.build(X)
    faiss_be = scann_be = None
    if best_faiss:
        p = best_faiss["params"]
        faiss_be = IVFPQBackend.build(X, best_faiss["config"], nprobe=p["nprobe"], k_factor=p["k_factor"])
    if best_scann:
        sb = ScaNNBackend.build(X, ScaNNConfig(num_leaves=grid.scann_num_leaves[0],
                                               reorder=max(grid.scann_reorder)))
        scann_be = (sb, {"leaves": best_scann["params"]["leaves"], "reorder": best_scann["params"]["reorder"]})
    backends = {"exact": (exact_be, None)}
    if faiss_be is not None:
        backends["faiss"] = (faiss_be, best_faiss["params"])
    if scann_be is not None:
        backends["scann"] = scann_be
    filtered = filtered_cost(ids, X, Q, terms, k, backends, grid.repeats, cfg.seed)
    target = {"recall_target": TARGET, "faiss": best_faiss, "scann": best_scann,
              "met": bool(best_faiss and (best_scann is None or best_faiss["qps"] >= best_scann["qps"])),
              "faiss_qps_over_scann": (best_faiss["qps"] / best_scann["qps"]) if best_faiss and best_scann else None}
    report = {"bench": "ann_bench", "data": data_label, "n": n, "d": d, "queries": len(Q), "k": k,
              "threads": faiss.omp_get_max_threads(), "quick": cfg.quick,
              "exact": exact_row, "target": target, "filtered": filtered, "results": rows,
              "seconds": round(time.time() - t0, 1)}
    report["plots"] = sw.plot(rows, out, f"ann_bench {data_label[:60]} N={n}")
    (out / "ann_bench.json").write_text(json.dumps(report, indent=1, default=float))
    config.save(cfg, str(out))
    summary = {k_: report[k_] for k_ in ("data", "n", "d", "queries", "threads", "seconds", "plots")}
    summary["exact_qps"] = exact_row["qps"]
    summary["target"] = target
    summary["filtered"] = filtered
    print(json.dumps(summary, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
