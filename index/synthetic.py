"""Synthetic embeddings with realistic geometry, for tests, the sweep and the quick bench when
no trained doc tower exists yet.

Not i.i.d. noise: documents form a Gaussian mixture on the unit sphere with Zipf-sized clusters
of varying spread, each varying along a few directions of its own (low intrinsic dimension) (popular topics are big and tight, the tail is diffuse), and queries come
from the same mixture (drawn separately, like held-out sessions). Filter terms follow
`ebr.features.document_filter_terms` and the city is correlated with the cluster, as geography
is with real embeddings, so filtered IVF search meets uneven selectivity across lists.
`selectivity_terms` adds filters of exact selectivities, correlated with the embedding clusters
or not, for the search planner's tests and the bench's filtered section.
"""
from __future__ import annotations

import numpy as np

from ebr import features

TYPES = (("group", 0.5), ("page", 0.3), ("event", 0.2))
CITIES = ("seattle", "portland", "boston", "austin", "denver", "chicago", "miami", "atlanta",
          "phoenix", "dallas")
LABEL = "synthetic gaussian mixture on the unit sphere (not a trained doc tower)"


def _normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def mixture(n_docs: int, n_queries: int, dim: int = 64, *, clusters: int | None = None,
            seed: int = 0):
    """-> (doc_ids, X [N, d] unit norm, filter_terms, Q [nq, d] unit norm)."""
    rng = np.random.default_rng(seed)
    c = clusters or max(8, int(2 * np.sqrt(n_docs)) // 4)
    centers = _normalize(rng.standard_normal((c, dim)))
    weights = 1.0 / np.arange(1, c + 1) ** 0.7
    weights /= weights.sum()
    spread = rng.uniform(0.25, 0.6, size=c) * (0.7 + 0.6 * np.arange(c) / c)  # tail is diffuse

    # Learned embeddings have low intrinsic dimension: each topic varies mostly along a few
    # directions of its own (rank `intrinsic`), plus a little isotropic noise.
    intrinsic = min(8, dim)
    bases = rng.standard_normal((c, intrinsic, dim)) / np.sqrt(dim)
    scales = rng.uniform(0.3, 1.0, size=(c, intrinsic))

    def draw(n):
        lab = rng.choice(c, size=n, p=weights)
        z = rng.standard_normal((n, intrinsic)) * scales[lab]
        local = np.einsum("ni,nid->nd", z, bases[lab])
        noise = 0.15 * rng.standard_normal((n, dim)) / np.sqrt(dim)
        x = centers[lab] + spread[lab, None] * 2.0 * local + noise
        return _normalize(x), lab

    X, lab = draw(n_docs)
    Q, _ = draw(n_queries)
    home = rng.integers(0, len(CITIES), size=c)
    types = rng.choice([t for t, _ in TYPES], size=n_docs, p=[p for _, p in TYPES])
    local = rng.random(n_docs) < 0.6
    city = np.where(local, home[lab], rng.integers(0, len(CITIES), size=n_docs))
    spam = rng.random(n_docs) < 0.05
    verified = rng.random(n_docs) < 0.01
    doc_ids, terms = [], []
    for i in range(n_docs):
        attrs = (["tag:spam"] if spam[i] else []) + (["tag:verified"] if verified[i] else [])
        terms.append(features.document_filter_terms({features.DOC_TYPE: types[i],
                                                     features.DOC_CITY: CITIES[city[i]],
                                                     features.DOC_ATTRIBUTES: attrs}))
        doc_ids.append(f"d{i:08d}")
    return doc_ids, X, terms, Q


def selectivity_terms(X: np.ndarray, selectivities, *, key: str = "sel", cells: int = 64,
                      seed: int = 0) -> tuple[list[list[str]], dict]:
    """For each selectivity s (i its position): `KEY:u<i>` on a random round(s*N) documents
    (uncorrelated with the embeddings) and `KEY:c<i>` on as many taken cell by cell from a
    Voronoi partition of the corpus around `cells` random documents, the last cell cut to the
    documents nearest its seed (correlated with the clusters, as cities are).
    -> (extra terms per document, {(s, "c"|"u"): filter expression})."""
    rng = np.random.default_rng(seed)
    n = len(X)
    seeds = X[rng.choice(n, min(cells, n), replace=False)]
    sims = X @ seeds.T
    cell, near = np.argmax(sims, axis=1), np.max(sims, axis=1)
    extra: list[list[str]] = [[] for _ in range(n)]
    exprs = {}
    for i, s in enumerate(selectivities):
        size = max(1, round(s * n))
        for doc in rng.choice(n, size, replace=False):
            extra[doc].append(f"{key}:u{i}")
        order = np.lexsort((-near, rng.permutation(len(seeds))[cell]))
        for doc in order[:size]:
            extra[doc].append(f"{key}:c{i}")
        exprs[(s, "u")], exprs[(s, "c")] = f"{key}:u{i}", f"{key}:c{i}"
    return extra, exprs
