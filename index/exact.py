"""Exact inner-product search (FAISS IndexFlatIP): the ground truth of every recall figure.

Also a servable backend for small corpora; every document is scanned for every query.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

FILE = "exact.faiss"
PARAMS: tuple[str, ...] = ()


def check_params(params: dict | None, allowed: tuple[str, ...], backend: str) -> dict:
    params = dict(params or {})
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown search parameter(s) {unknown} for backend {backend}; "
                         f"known: {list(allowed)}")
    return params


def split_range(lims, D, I) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """FAISS range_search output -> per-query (scores, ids), best first."""
    ds, ids = [], []
    for q in range(len(lims) - 1):
        d, i = D[lims[q]:lims[q + 1]], I[lims[q]:lims[q + 1]]
        order = np.argsort(-d, kind="stable")
        ds.append(d[order].astype(np.float32))
        ids.append(i[order].astype(np.int64))
    return ds, ids


class ExactBackend:
    name = "exact"
    param_names = PARAMS
    native_filter = True
    probe_param = None  # one partition: the planner always scores exactly (index/planner.py)

    def __init__(self, index):
        self.index = index
        self.d = index.d
        self.ntotal = index.ntotal

    @classmethod
    def build(cls, X: np.ndarray) -> "ExactBackend":
        import faiss

        index = faiss.IndexFlatIP(X.shape[1])
        index.add(np.ascontiguousarray(X, dtype=np.float32))
        return cls(index)

    def _params(self, selection):
        import faiss

        return None if selection is None else faiss.SearchParameters(sel=selection.selector)

    def search(self, Q, k, selection=None, params=None):
        check_params(params, PARAMS, self.name)
        D, I = self.index.search(Q, k, params=self._params(selection))
        return D, I, {}

    def range_search(self, Q, radius, selection=None, params=None):
        check_params(params, PARAMS, self.name)
        lims, D, I = self.index.range_search(Q, float(radius), params=self._params(selection))
        ds, ids = split_range(lims, D, I)
        return ds, ids, {}

    def scanned(self, Q, params=None) -> np.ndarray:
        return np.full(len(Q), self.ntotal, dtype=np.int64)

    def exact_vectors(self) -> np.ndarray:
        """[ntotal, d] float vectors, a view into the flat index (no copy)."""
        import faiss

        return faiss.rev_swig_ptr(self.index.get_xb(), self.ntotal * self.d).reshape(self.ntotal, self.d)

    def save(self, directory: Path) -> list[str]:
        import faiss

        faiss.write_index(self.index, str(Path(directory) / FILE))
        return [FILE]

    @classmethod
    def load(cls, directory: Path, params: dict) -> "ExactBackend":
        import faiss

        return cls(faiss.read_index(str(Path(directory) / FILE)))

    def bytes_per_vector(self) -> float:
        return 4.0 * self.d
