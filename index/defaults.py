"""Default index parameters, chosen from sweeps (never guessed).

Re-run the command in each comment after the embedding model changes a lot (the paper re-tunes
ANN parameters with each model; OPQ in particular changes the scanned counts), and update the
values; docs/scaling.md explains how to read the sweep.
"""
from __future__ import annotations

import dataclasses
import math

# FAISS warns below 39 training points per centroid; fewer makes the coarse quantizer noise.
MIN_POINTS_PER_LIST = 39


@dataclasses.dataclass(frozen=True)
class IndexDefaults:
    # Chosen by: python bench/ann_bench.py --quick --output runs/ann-quick
    # (100k SYNTHETIC clustered vectors, d=64, 1000 queries; docs/scaling.md "Defaults"): the
    # highest batch-QPS configuration with recall@10 >= 0.95 vs exact (0.976 at 40.8k QPS,
    # 831 docs scanned/query). nlist ~ 4*sqrt(N) as a power of two; pq_bytes = d/4 (paper) as
    # 2*d/4 4-bit fast-scan sub-quantizers after an OPQ rotation, exact refine of k*k_factor.
    # Re-run on real embeddings once a trained doc tower exists and update these.
    factory: str = "OPQ32,IVF1024,PQ32x4fs,RFlat"  # the swept point: factory_for(100_000, 64)
    nprobe: int = 8
    k_factor: int = 16
    # ScaNN, same run: 632 leaves (~2*sqrt(N)), 32 searched, AH 2 dims/block (d/4 bytes),
    # reorder 100 -> recall@10 0.984 at 41.0k QPS.
    scann_num_leaves: int = 632
    scann_leaves: int = 32
    scann_reorder: int = 100

    # The filter-aware search planner (index/planner.py; docs/scaling.md "Filtered search").
    # Exact scoring of a filter's selected ids below this many KB of float vectors, Qdrant's
    # `full_scan_threshold` (10,000 KB by default: 40,000 vectors at d=64): gathering and
    # scoring that many vectors for a batch costs about what the ANN plan does, at recall 1.
    exact_threshold_kb: int = 10_000
    # The ANN plan widens nprobe (leaves) until the probed lists hold this many matching
    # documents per result wanted (never fewer lists than the default nprobe). Chosen with the
    # ANN plan forced, recall@10 against exact filtered search at 10% / 50% selectivity,
    # cluster-correlated (c) and uncorrelated (u) filters (index.synthetic.selectivity_terms):
    # - 20k synthetic, d=32, IVF128,PQ16x4fs,RFlat, nprobe 8, k_factor 16, 100 queries
    #   (tests/test_index_planner.py's corpus): 10%c/10%u/50%c/50%u = 0.89/0.96/0.95/0.95 at 32,
    #   0.97/0.98/0.96/0.95 at 64, 1.0/1.0/0.97/0.97 at 128;
    # - 100k synthetic, d=64, IVF1024,PQ32x4fs,RFlat, nprobe 8, k_factor 16, 300 queries:
    #   0.928/0.980/0.967/0.979 at 64 (scanning 10.3k/8.0k/2.0k/1.5k documents),
    #   0.955/0.987/0.979/0.986 at 128 (17.6k/15.9k/3.5k/3.1k).
    # 0.1% and 1% probe nearly every list at any of them (and are scored exactly by default).
    # Unfiltered searches keep the swept nprobe's documents per result instead.
    candidates_per_result: float = 128.0
    # Post-filtering (ScaNN, which has no filter inside its scan) over-fetches k / selectivity
    # times this, doubling for queries still short of k.
    postfilter_overfetch: float = 1.2
    # Compiled filters (bitmap, FAISS selector, matching documents per list) kept per index.
    filter_cache: int = 64

    def factory_for(self, n: int, d: int) -> str:
        """The swept configuration scaled to a corpus of `n` vectors of dimension `d`: nlist
        ~ 4*sqrt(n) as a power of two (at most n / 39), d/4 bytes of 4-bit fast-scan codes,
        OPQ once there are enough points to train it."""
        nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
        while nlist > 1 and nlist * MIN_POINTS_PER_LIST > n:
            nlist //= 2
        m = max(1, d // 2)
        # OPQ trains 8-bit codebooks internally (256 centroids each): below ~10k points it is
        # slow and no better than the plain rotation-free PQ
        opq = f"OPQ{m}," if n >= 256 * MIN_POINTS_PER_LIST else ""
        return f"{opq}IVF{nlist},PQ{m}x4fs,RFlat"

    def scann_leaves_for(self, n: int) -> tuple[int, int]:
        """(num_leaves, leaves searched) scaled like the sweep's 632/32 at 100k: ~2*sqrt(n)."""
        num_leaves = max(1, min(round(2 * math.sqrt(n)), n // MIN_POINTS_PER_LIST or 1))
        return num_leaves, max(1, round(num_leaves * self.scann_leaves / self.scann_num_leaves))


DEFAULTS = IndexDefaults()
