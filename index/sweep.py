"""`ebr index sweep`: the ANN parameter study behind the index defaults (paper section 5, "ANN
parameter tuning": recall against exact search versus documents scanned).

For each configuration: recall@K against exact, documents scanned per query, single-query
latency p50/p99, batch QPS, bytes per vector and build time, over nlist, nprobe, pq_bytes,
PQ vs OPQ vs PCA, IVF vs IMI, fast-scan, refine factor, and ScaNN leaves and reorder. Writes
sweep.json plus recall-vs-QPS and recall-vs-scanned Pareto plots into the output directory,
which may be any URI (written locally, then copied through `ebr.storage`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from index import evaluation as ev

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SweepGrid:
    nlists: tuple[int, ...] = (256, 1024, 4096)
    nprobes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    pq_bytes: tuple[int, ...] = ()  # () -> (d/8, d/4, d/2); d/4 is the paper's default
    k_factors: tuple[int, ...] = (1, 2, 4, 8)  # refine re-ranks k*k_factor candidates exactly
    imi: bool = True
    opq: bool = True
    pca: bool = True
    fastscan: bool = True
    scann_num_leaves: tuple[int, ...] = ()  # () -> (sqrt(N), 4*sqrt(N))
    scann_leaves_fraction: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
    scann_reorder: tuple[int, ...] = (0, 40, 100, 250)  # 0: no exact re-scoring
    latency_queries: int = 100
    repeats: int = 3

    @classmethod
    def quick(cls) -> "SweepGrid":
        return cls(nlists=(256, 1024), nprobes=(1, 4, 16, 64), k_factors=(1, 4), pca=False,
                   scann_leaves_fraction=(0.01, 0.05, 0.2), scann_reorder=(0, 100),
                   latency_queries=30, repeats=2)


def faiss_configs(n: int, d: int, grid: SweepGrid) -> list[str]:
    """Factory strings: a base IVF-PQ (d/4 bytes) per nlist, then one-factor-at-a-time
    variations around the middle nlist (pq_bytes, OPQ, PCA, fast-scan+refine, IMI)."""
    from index.ivf_pq import IVFPQConfig

    nlists = [nl for nl in grid.nlists if nl * 39 <= n] or [max(16, n // 100)]
    mid = nlists[len(nlists) // 2]
    out = [IVFPQConfig(nlist=nl).factory_string(d) for nl in nlists]
    for b in grid.pq_bytes or (d // 8, d // 2):
        if b != d // 4:
            out.append(IVFPQConfig(nlist=mid, pq_bytes=b).factory_string(d))
    if grid.opq:
        out.append(IVFPQConfig(nlist=mid, transform="OPQ").factory_string(d))
    if grid.pca:
        out.append(IVFPQConfig(nlist=mid, transform="PCA").factory_string(d))
    out.append(IVFPQConfig(nlist=mid, refine=True).factory_string(d))
    if grid.fastscan:
        out += [IVFPQConfig(nlist=nl, fastscan=True, refine=True).factory_string(d) for nl in nlists]
        if grid.opq:
            out.append(IVFPQConfig(nlist=mid, transform="OPQ", fastscan=True, refine=True).factory_string(d))
    if grid.imi:
        bits = max(2, round(math.log2(mid) / 2))
        out.append(IVFPQConfig(nlist=4 ** bits, coarse="IMI").factory_string(d))
    return list(dict.fromkeys(out))


def _measure(search_all, Q, gt, k, scanned, grid) -> dict:
    _, I = search_all(Q)
    lat = ev.latency_percentiles(lambda q: search_all(q), Q, grid.latency_queries)
    return {"recall": ev.recall_at_k(I, gt, k), "scanned": float(np.mean(scanned)),
            "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"],
            "qps": ev.batch_qps(search_all, Q, grid.repeats)}


def sweep_faiss(X, Q, gt, k, factory, grid, seed=0) -> list[dict]:
    from index.ivf_pq import IVFPQBackend

    t = time.perf_counter()
    be = IVFPQBackend.build(X, factory, seed=seed)
    build_s = time.perf_counter() - t
    bpv = be.bytes_per_vector()
    rows = []
    k_factors = grid.k_factors if "RFlat" in factory else (1,)
    for nprobe in grid.nprobes:
        if nprobe > be.ivf.nlist:
            continue
        for kf in k_factors:
            params = {"nprobe": nprobe, "k_factor": kf}
            sp, keep = be.search_parameters(nprobe, kf)
            search_all = lambda q, sp=sp: be.index.search(q, k, params=sp)  # noqa: E731
            row = {"backend": "faiss", "config": factory, "params": params,
                   "bytes_per_vector": bpv, "build_s": build_s,
                   **_measure(search_all, Q, gt, k, be.scanned(Q, params), grid)}
            log.info("%s %s recall=%.3f scanned=%.0f qps=%.0f", factory, params, row["recall"],
                     row["scanned"], row["qps"])
            rows.append(row)
    return rows


def sweep_scann(X, Q, gt, k, grid) -> list[dict]:
    from index.scann_backend import ScaNNBackend, ScaNNConfig

    n = len(X)
    rows = []
    for num_leaves in grid.scann_num_leaves or (int(math.sqrt(n)), 4 * int(math.sqrt(n))):
        t = time.perf_counter()
        be = ScaNNBackend.build(X, ScaNNConfig(num_leaves=num_leaves, reorder=max(grid.scann_reorder)))
        build_s = time.perf_counter() - t
        bpv = be.bytes_per_vector()
        L = len(be.centers)
        for frac in grid.scann_leaves_fraction:
            leaves = max(1, round(frac * L))
            for reorder in grid.scann_reorder:
                p = {"leaves": leaves, "reorder": reorder or k}
                search_all = lambda q, p=p: be.raw_search(q, k, p)  # noqa: E731
                row = {"backend": "scann", "config": f"scann leaves={L} AH d/4 reorder",
                       "params": {"leaves": leaves, "reorder": reorder},
                       "bytes_per_vector": bpv, "build_s": build_s,
                       **_measure(search_all, Q, gt, k, be.scanned(Q, p), grid)}
                log.info("scann %d %s recall=%.3f scanned=%.0f qps=%.0f", L, row["params"],
                         row["recall"], row["scanned"], row["qps"])
                rows.append(row)
    return rows


def exact_baseline(X, Q, k, grid) -> tuple[np.ndarray, dict]:
    from index.exact import ExactBackend

    be = ExactBackend.build(X)
    search_all = lambda q: be.index.search(q, k)  # noqa: E731
    _, gt = search_all(Q)
    lat = ev.latency_percentiles(search_all, Q, grid.latency_queries)
    return gt, {"backend": "exact", "config": "Flat", "params": {}, "recall": 1.0,
                "scanned": float(len(X)), "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"],
                "qps": ev.batch_qps(search_all, Q, grid.repeats), "bytes_per_vector": 4.0 * X.shape[1],
                "build_s": 0.0}


def choose(rows: list[dict], target: float = 0.95, backend: str | None = None) -> dict | None:
    """The fastest (batch QPS) configuration reaching recall >= target."""
    ok = [r for r in rows if r["recall"] >= target and r["backend"] != "exact"
          and (backend is None or r["backend"] == backend)]
    return max(ok, key=lambda r: r["qps"]) if ok else None


def plot(rows: list[dict], out: Path, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def family(r):
        return r["backend"] if r["backend"] != "faiss" else r["config"]

    files = []
    for xkey, fname, xlabel, logx in (("qps", "recall_vs_qps.png", "batch QPS", True),
                                      ("scanned", "recall_vs_scanned.png", "documents scanned / query", True)):
        fig, ax = plt.subplots(figsize=(10, 6.5))
        fams = sorted({family(r) for r in rows})
        cmap = plt.get_cmap("tab20")
        for i, fam in enumerate(fams):
            pts = [r for r in rows if family(r) == fam]
            ax.scatter([r[xkey] for r in pts], [r["recall"] for r in pts], s=14, color=cmap(i % 20),
                       label=fam, marker="*" if fam == "exact" else "o")
        # Pareto front: for QPS maximise both; for scanned minimise x.
        pts = [((r[xkey] if xkey == "qps" else -r[xkey]), r["recall"]) for r in rows]
        front = ev.pareto(pts)
        ax.plot([rows[i][xkey] for i in front], [rows[i]["recall"] for i in front], "k--", lw=1,
                label="Pareto front")
        if logx:
            ax.set_xscale("log")
        ax.axhline(0.95, color="grey", lw=0.6)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("recall@10 vs exact")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6, ncol=2, loc="lower left")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files.append(str(out / fname))
    return files


def run_sweep(X: np.ndarray, Q: np.ndarray, out_dir, *, k: int = 10, grid: SweepGrid | None = None,
              label: str = "", scann: bool = True, seed: int = 0) -> dict:
    import tempfile

    from ebr import storage

    out_uri = storage.normalize(out_dir)
    if storage.is_local(out_uri):
        os.makedirs(out_uri, exist_ok=True)
        return _run_sweep(X, Q, Path(out_uri), out_uri, k, grid, label, scann, seed)
    with tempfile.TemporaryDirectory(prefix="ebr-sweep-") as staging:
        report = _run_sweep(X, Q, Path(staging), out_uri, k, grid, label, scann, seed)
        for name in sorted(os.listdir(staging)):
            storage.copy_file(os.path.join(staging, name), storage.join(out_uri, name))
    return report


def _run_sweep(X, Q, out: Path, out_uri: str, k, grid, label, scann, seed) -> dict:
    """The sweep, its files written to the local directory `out`, named as under `out_uri`."""
    import faiss

    grid = grid or SweepGrid()
    X = np.ascontiguousarray(X, np.float32)
    Q = np.ascontiguousarray(Q, np.float32)
    gt, exact_row = exact_baseline(X, Q, k, grid)
    rows = [exact_row]
    configs = faiss_configs(len(X), X.shape[1], grid)
    log.info("sweeping %d FAISS configurations%s", len(configs), " + ScaNN" if scann else "")
    for factory in configs:
        rows += sweep_faiss(X, Q, gt, k, factory, grid, seed)
    if scann:
        rows += sweep_scann(X, Q, gt, k, grid)
    for r in rows:
        r["qps_vs_exact"] = r["qps"] / exact_row["qps"]
    best = {t: {b: choose(rows, t, b) for b in ("faiss", "scann")} for t in (0.9, 0.95, 0.99)}
    report = {"label": label, "n": len(X), "d": int(X.shape[1]), "queries": len(Q), "k": k,
              "threads": faiss.omp_get_max_threads(), "grid": dataclasses.asdict(grid),
              "results": rows, "best": {str(t): v for t, v in best.items()}}
    plots = plot(rows, out, f"{label} N={len(X)} d={X.shape[1]}")
    report["plots"] = [f"{out_uri}/{os.path.basename(p)}" for p in plots]
    (out / "sweep.json").write_text(json.dumps(report, indent=1))
    return report
