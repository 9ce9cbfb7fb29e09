"""ScaNN backend: k-means tree partitioning + anisotropic hashing (AH) + exact reorder, through
the `scann.scann_ops.pybind` Python API (never inside an exported tower: the stock TF Serving
image has no ScaNN ops).

ScaNN's Python API has no filter argument, so filtered and radius search over-fetch and
post-filter; the result reports how far it had to over-fetch. Documents scanned per query are
the sizes of the leaves the query's tokenization picks (top `leaves` centroids by dot product,
read from the serialized partitioner), the same cost measure as FAISS's probed lists.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from index.exact import check_params

log = logging.getLogger(__name__)

SUBDIR = "scann"
PARAMS = ("leaves", "reorder", "radius_margin")
REORDER_K = 10  # the k the swept reorder depth was chosen for (index/defaults.py)


@dataclasses.dataclass
class ScaNNConfig:
    num_leaves: int = 1000
    leaves: int = 50  # leaves searched per query (default; a search parameter)
    dims_per_block: int = 2  # 2 dims per 16-centre block = 4 bits per 2 dims -> d/4 bytes
    anisotropic_threshold: float = 0.2  # AH noise-shaping threshold (ScaNN's recommended 0.2)
    reorder: int = 100  # exact re-scoring of the top-N AH candidates; 0 = no reorder
    training_sample_size: int = 250_000


def _varint(b: bytes, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        c = b[pos]
        pos += 1
        out |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return out, pos


def _field(b: bytes, number: int) -> bytes:
    """Bytes of the first length-delimited field `number` of a serialized proto message."""
    pos = 0
    while pos < len(b):
        tag, pos = _varint(b, pos)
        num, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(b, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n, pos = _varint(b, pos)
            if num == number:
                return b[pos:pos + n]
            pos += n
        else:
            raise ValueError(f"unexpected wire type {wire}")
    raise ValueError(f"field {number} not found")


def read_leaves(artifacts: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(leaf centroids [L, d], leaf sizes [L], leaf of each datapoint [N]) of a serialized
    searcher.

    SerializedPartitioner{kmeans=2: SerializedKMeansTreePartitioner{kmeans_tree=1:
    SerializedKMeansTree}}; only the tree message ships as a Python proto, so the two outer
    wrappers are unwrapped by hand."""
    from scann.trees.kmeans_tree import kmeans_tree_pb2

    data = (artifacts / "serialized_partitioner.pb").read_bytes()
    tree = kmeans_tree_pb2.SerializedKMeansTree()
    tree.ParseFromString(_field(_field(data, 2), 1))
    root = tree.root
    if any(len(c.children) for c in root.children):
        raise ValueError("multi-level ScaNN trees are not supported for scanned counts")
    centers = np.array([list(c.float_dimension) or list(c.dimension) for c in root.centers],
                       dtype=np.float32)
    leaf_of = np.array([c.leaf_id if c.leaf_id >= 0 else i for i, c in enumerate(root.children)])
    tokens = np.load(artifacts / "datapoint_to_token.npy").ravel()
    sizes = np.bincount(tokens, minlength=len(centers)).astype(np.int64)
    order = np.argsort(leaf_of) if len(leaf_of) == len(centers) else np.arange(len(centers))
    return centers[order], sizes, tokens.astype(np.int64)


class ScaNNBackend:
    name = "scann"
    param_names = PARAMS
    native_filter = False  # no filter inside ScaNN's scan: the planner post-filters
    probe_param = "leaves"  # what the search planner widens (index/planner.py)

    def __init__(self, searcher, config: dict, centers: np.ndarray, sizes: np.ndarray, ntotal: int,
                 d: int, tokens: np.ndarray | None = None, vectors: np.ndarray | None = None):
        self.searcher = searcher
        self.config = config
        self.centers, self.sizes = centers, sizes
        self.ntotal, self.d = ntotal, d
        self.tokens = tokens  # leaf of each datapoint
        self.vectors = vectors  # the float dataset ScaNN reorders from (None without reorder)
        self.defaults = {"leaves": config["leaves"], "reorder": config["reorder"]}

    @classmethod
    def build(cls, X: np.ndarray, config: ScaNNConfig | None = None) -> "ScaNNBackend":
        from scann.scann_ops.py import scann_ops_pybind

        cfg = config or ScaNNConfig()
        n, d = X.shape
        leaves = min(cfg.num_leaves, max(1, n // 10))
        builder = scann_ops_pybind.builder(np.ascontiguousarray(X, np.float32), 10, "dot_product")
        builder = builder.tree(num_leaves=leaves, num_leaves_to_search=min(cfg.leaves, leaves),
                               training_sample_size=min(n, cfg.training_sample_size))
        builder = builder.score_ah(cfg.dims_per_block,
                                   anisotropic_quantization_threshold=cfg.anisotropic_threshold)
        if cfg.reorder:
            builder = builder.reorder(cfg.reorder)
        log.info("building ScaNN: %d leaves over %d vectors", leaves, n)
        searcher = builder.build()
        config = {**dataclasses.asdict(cfg), "num_leaves": leaves}
        tmp = Path(tempfile.mkdtemp(prefix="scann-"))
        try:
            searcher.serialize(str(tmp), relative_path=True)
            centers, sizes, tokens = read_leaves(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        vectors = np.ascontiguousarray(X, np.float32) if cfg.reorder else None
        return cls(searcher, config, centers, sizes, n, d, tokens, vectors)

    def _resolve(self, params):
        p = {**self.defaults, **check_params(params, PARAMS, self.name)}
        p["leaves"], p["reorder"] = int(p["leaves"]), int(p["reorder"])
        p.setdefault("radius_margin", 0.1)
        if p["leaves"] < 1:
            raise ValueError(f"leaves must be >= 1, got {p['leaves']}")
        return p

    def raw_search(self, Q, k: int, p: dict):
        """Top-k by AH (+ reorder); ids int64 with -1 padding, scores float32. The reorder
        depth is an absolute count tuned for k = REORDER_K (the sweep's k): a deeper k gets a
        proportionally deeper reorder, as FAISS's k_factor multiplies k, or recall falls with
        k (and with a post-filter's over-fetch)."""
        k = max(1, min(k, self.ntotal))
        pre = max(p["reorder"], math.ceil(p["reorder"] * k / REORDER_K)) \
            if self.config["reorder"] else None
        pre = None if pre is None else min(pre, self.ntotal)
        I, D = self.searcher.search_batched_parallel(
            np.ascontiguousarray(Q, np.float32), final_num_neighbors=k,
            pre_reorder_num_neighbors=pre, leaves_to_search=p["leaves"])
        I = np.asarray(I, dtype=np.int64)
        D = np.asarray(D, dtype=np.float32)
        bad = ~np.isfinite(D) | (I < 0) | (I >= self.ntotal)
        return np.where(bad, -np.inf, D), np.where(bad, -1, I)

    def search(self, Q, k, selection=None, params=None):
        p = self._resolve(params)
        if selection is None:
            D, I = self.raw_search(Q, k, p)
            return D, I, {}
        return self._filtered(Q, k, selection, p)

    def _filtered(self, Q, k, selection, p):
        """Over-fetch by ~1/selectivity, post-filter, and double the fetch for queries still
        short of k until the searched leaves are exhausted."""
        mask = selection.mask()
        nq = len(Q)
        D_out = np.full((nq, k), -np.inf, np.float32)
        I_out = np.full((nq, k), -1, np.int64)
        pool = self.scanned(Q, p)  # candidates ScaNN can return at all
        fetch = np.full(nq, min(self.ntotal, math.ceil(k / max(selection.selectivity, 1.0 / self.ntotal) * 1.2)),
                        dtype=np.int64)
        todo = np.arange(nq)
        while len(todo):
            f = int(fetch[todo].max())
            D, I = self.raw_search(Q[todo], f, p)
            nxt = []
            for row, q in enumerate(todo):
                ok = (I[row] >= 0)
                ok[ok] = mask[I[row][ok]]
                ids, ds = I[row][ok][:k], D[row][ok][:k]
                I_out[q, :len(ids)], D_out[q, :len(ids)] = ids, ds
                if len(ids) < k and f < min(pool[q], self.ntotal):
                    fetch[q] = min(self.ntotal, 2 * f)
                    nxt.append(q)
                else:
                    fetch[q] = f
            todo = np.array(nxt, dtype=np.int64)
        return D_out, I_out, {"fetched": fetch, "overfetch": float(fetch.mean() / k)}

    def range_search(self, Q, radius, selection=None, params=None):
        """Radius by over-fetch: fetch top-F, keep scores >= radius, grow F while the F-th
        score is within `radius_margin` of the radius (AH ranks only approximately, so
        in-radius documents may hide a little beyond the first failing one)."""
        p = self._resolve(params)
        margin = float(p.get("radius_margin", 0.1))
        mask = None if selection is None else selection.mask()
        pool = self.scanned(Q, p)
        ds, ids, fetched = [], [], []
        for j, q in enumerate(Q):
            f = min(self.ntotal, 64)
            while True:
                D, I = self.raw_search(q[None], f, p)
                D, I = D[0], I[0]
                valid = I >= 0
                if valid.sum() and D[valid][-1] >= radius - margin and f < min(pool[j], self.ntotal):
                    f = min(self.ntotal, 4 * f)
                    continue
                break
            keep = valid & (D >= radius)
            if mask is not None:
                keep[keep] = mask[I[keep]]
            ds.append(D[keep])
            ids.append(I[keep])
            fetched.append(f)
        return ds, ids, {"fetched": np.array(fetched, np.int64)}

    # --- what the search planner needs (index/planner.py) ------------------------------
    @property
    def nparts(self) -> int:
        return len(self.centers)

    def default_probes(self, params=None) -> int:
        return min(self._resolve(params)["leaves"], self.nparts)

    def rank_partitions(self, Q, P: int) -> np.ndarray:
        """The first P leaves per query by dot product with the leaf centroids, best first."""
        P = int(min(P, self.nparts))
        scores = np.asarray(Q, np.float32) @ self.centers.T
        if P < self.nparts:
            top = np.argpartition(-scores, P - 1, axis=1)[:, :P]
        else:
            top = np.tile(np.arange(self.nparts), (len(Q), 1))
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
        return np.take_along_axis(top, order, 1).astype(np.int64)

    def partition_sizes(self) -> np.ndarray:
        return self.sizes

    def partition_members(self) -> tuple[np.ndarray, np.ndarray]:
        return np.arange(self.ntotal, dtype=np.int64), self.tokens

    def exact_vectors(self) -> np.ndarray | None:
        return self.vectors

    def scanned(self, Q, params=None) -> np.ndarray:
        p = self._resolve(params)
        L = min(int(p["leaves"]), len(self.centers))
        scores = np.asarray(Q, np.float32) @ self.centers.T
        top = np.argpartition(-scores, L - 1, axis=1)[:, :L] if L < len(self.centers) else \
            np.tile(np.arange(len(self.centers)), (len(Q), 1))
        return self.sizes[top].sum(1).astype(np.int64)

    def save(self, directory: Path) -> list[str]:
        out = Path(directory) / SUBDIR
        out.mkdir()
        self.searcher.serialize(str(out), relative_path=True)
        return [f"{SUBDIR}/{f}" for f in sorted(os.listdir(out))]

    @classmethod
    def load(cls, directory: Path, params: dict) -> "ScaNNBackend":
        from scann.scann_ops.py import scann_ops_pybind

        art = Path(directory) / SUBDIR
        searcher = scann_ops_pybind.load_searcher(str(art))
        centers, sizes, tokens = read_leaves(art)
        # ScaNN keeps the float dataset for its exact reorder; the planner's exact plan reads
        # the same file, memory-mapped so that only the selected documents' pages are read.
        dataset = art / "dataset.npy"
        vectors = np.load(dataset, mmap_mode="r") if dataset.exists() else None
        return cls(searcher, params, centers, sizes, int(sizes.sum()), int(centers.shape[1]),
                   tokens, vectors)

    def manifest_params(self) -> dict:
        return dict(self.config)

    def bytes_per_vector(self) -> float:
        tmp = Path(tempfile.mkdtemp(prefix="scann-size-"))
        try:
            self.searcher.serialize(str(tmp), relative_path=True)
            total = sum(f.stat().st_size for f in tmp.iterdir()
                        if f.name not in ("scann_assets.pbtxt", "scann_config.pb"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return total / max(1, self.ntotal)
