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
