"""FAISS inverted-file + product-quantization backends, configured by index_factory strings.

The paper's serving index (section 5, "ANN parameter tuning"): a coarse quantizer (IVF, or the
inverted multi-index IMI) picks `nprobe` lists per query; documents in them are scored from PQ
codes (optionally after an OPQ rotation or a PCA), optionally re-ranked exactly (refine). The
paper's default PQ code is d/4 bytes per vector. Documents scanned per query are the sizes of
the probed lists, the cost measure the paper tunes against.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np

from index.exact import check_params, split_range

log = logging.getLogger(__name__)

FILE = "ivf.faiss"
PARAMS = ("nprobe", "k_factor", "radius_margin")
_ADD_CHUNK = 65_536


@dataclasses.dataclass
class IVFPQConfig:
    """One FAISS IVF-PQ family member; `factory_string(d)` spells it for faiss.index_factory."""
    nlist: int = 1024  # coarse lists; for IMI the product of two sub-quantizers (a power of 4)
    coarse: str = "IVF"  # IVF | IMI
    transform: str = "none"  # none | OPQ | PCA (PCA keeps pca_dim dims, rotated: PCAR)
    pca_dim: int = 0  # 0 -> d/2
    pq_bytes: int = 0  # code bytes per vector; 0 -> d/4 (the paper's default)
    fastscan: bool = False  # 4-bit PQ with SIMD fast-scan (2*pq_bytes sub-quantizers)
    refine: bool = False  # keep float vectors and re-rank nprobe's top k*k_factor exactly

    def factory_string(self, d: int) -> str:
        if self.coarse not in ("IVF", "IMI"):
            raise ValueError(f"coarse must be IVF or IMI, got {self.coarse!r}")
        if self.transform not in ("none", "OPQ", "PCA"):
            raise ValueError(f"transform must be none, OPQ or PCA, got {self.transform!r}")
        pq_bytes = self.pq_bytes or max(1, d // 4)
        m = 2 * pq_bytes if self.fastscan else pq_bytes  # sub-quantizers
        dim = (self.pca_dim or d // 2) if self.transform == "PCA" else d
        if dim % m:
            raise ValueError(f"{m} PQ sub-quantizers do not divide dimension {dim}")
        parts = []
        if self.transform == "OPQ":
            parts.append(f"OPQ{m}")
        elif self.transform == "PCA":
            parts.append(f"PCAR{dim}")
        if self.coarse == "IVF":
            parts.append(f"IVF{self.nlist}")
        else:
            bits = round(math.log2(self.nlist) / 2)
            if 4 ** bits != self.nlist:
                raise ValueError(f"IMI nlist must be a power of 4, got {self.nlist}")
            parts.append(f"IMI2x{bits}")
        parts.append(f"PQ{m}x4fs" if self.fastscan else f"PQ{m}")
        if self.refine:
            parts.append("RFlat")
        return ",".join(parts)


def uses_l2(factory: str) -> bool:
    """FAISS has no inner-product IMI; on unit-norm documents max inner product is min L2
    (|q-x|^2 = |q|^2 + 1 - 2 q.x), so IMI indexes are built on L2 and scores converted back."""
    return "IMI" in factory


def _coarse_centroids(factory: str, d: int) -> int:
    import re

    m = re.search(r"IMI2x(\d+)", factory)
    if m:
        return 2 ** int(m.group(1))
    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else 256


def train_index(X: np.ndarray, factory: str, *, train_size: int | None = None, seed: int = 0):
    """A trained, empty FAISS index (the template every shard adds its slice to)."""
    import faiss

    n, d = X.shape
    metric = faiss.METRIC_L2 if uses_l2(factory) else faiss.METRIC_INNER_PRODUCT
    if uses_l2(factory):
        norms = np.linalg.norm(X[: min(n, 10_000)], axis=1)
        if np.abs(norms - 1).max() > 1e-3:
            raise ValueError(f"{factory}: IMI needs L2-normalised document embeddings "
                             f"(norms range {norms.min():.4f}..{norms.max():.4f})")
    index = faiss.index_factory(d, factory, metric)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
        ivf = faiss.downcast_index(ivf)
        # Polysemous training only serves Hamming pre-filtering (polysemous_ht), which this
        # index never uses, and costs seconds per build (~14 s against 0.04 s at 800 vectors).
        if hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False
    # ~50 points per coarse centroid and enough for 256-centroid PQ codebooks.
    want = train_size or max(50 * _coarse_centroids(factory, d), 65_536)
    rng = np.random.default_rng(seed)
    sample = X if n <= want else X[np.sort(rng.choice(n, want, replace=False))]
    log.info("training %s on %d of %d vectors", factory, len(sample), n)
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index


def add_vectors(index, X: np.ndarray, start: int = 0) -> None:
    """Adds rows with ids start.. (ids are the row numbers; the index file needs no id map)."""
    from tqdm import tqdm

    n = len(X)
    with tqdm(total=n, desc="add", unit="vec", disable=n < 4 * _ADD_CHUNK, mininterval=5) as bar:
        for i in range(0, n, _ADD_CHUNK):
            chunk = np.ascontiguousarray(X[i:i + _ADD_CHUNK], dtype=np.float32)
            if start == 0:
                index.add(chunk)  # sequential ids == row numbers
            else:
                index.add_with_ids(chunk, np.arange(start + i, start + i + len(chunk), dtype=np.int64))
            bar.update(len(chunk))


class IVFPQBackend:
    name = "faiss"
    param_names = PARAMS
    native_filter = True  # the ID selector is checked inside the list scan
    probe_param = "nprobe"  # what the search planner widens (index/planner.py)

    def __init__(self, index, factory: str, nprobe: int = 16, k_factor: int = 1):
        import faiss

        self.index = index
        self.factory = factory
        self.d = index.d
        self.ntotal = index.ntotal
        self.l2 = uses_l2(factory)
        self.defaults = {"nprobe": nprobe, "k_factor": k_factor}
        self.ivf = faiss.extract_index_ivf(index)
        self._sizes = None

    @classmethod
    def build(cls, X, factory: str, *, nprobe: int = 16, k_factor: int = 1, seed: int = 0):
        index = train_index(X, factory, seed=seed)
        add_vectors(index, X)
        return cls(index, factory, nprobe, k_factor)

    # --- parameters --------------------------------------------------------------------
    def _resolve(self, params):
        p = {**self.defaults, **check_params(params, PARAMS, self.name)}
        p["nprobe"] = int(p["nprobe"])
        p["k_factor"] = int(p["k_factor"])
        if p["nprobe"] < 1 or p["k_factor"] < 1:
            raise ValueError(f"nprobe and k_factor must be >= 1, got {p['nprobe']}, {p['k_factor']}")
        return p

    def search_parameters(self, nprobe: int, k_factor: int, selector=None):
        """Nested FAISS SearchParameters matching the index's wrapper layers. Returns (params,
        keep): `keep` holds the inner objects, which FAISS references by raw pointer."""
        import faiss

        keep = []

        def for_index(idx):
            idx = faiss.downcast_index(idx)
            if isinstance(idx, faiss.IndexRefine):
                inner = for_index(idx.base_index)
                p = faiss.IndexRefineSearchParameters(k_factor=float(k_factor), base_index_params=inner)
            elif isinstance(idx, faiss.IndexPreTransform):
                p = faiss.SearchParametersPreTransform(index_params=for_index(idx.index))
            else:
                p = faiss.SearchParametersIVF(nprobe=nprobe)
            if selector is not None:
                p.sel = selector
            keep.append(p)
            return p

        return for_index(self.index), keep

    # --- search ------------------------------------------------------------------------
    def _to_ip(self, Q, D):
        # L2 distances of an IMI index back to inner products (unit-norm documents).
        qn = (Q.astype(np.float32) ** 2).sum(1, keepdims=True)
        return ((qn + 1.0 - D) / 2.0).astype(np.float32)

    def search(self, Q, k, selection=None, params=None):
        p = self._resolve(params)
        sp, _keep = self.search_parameters(p["nprobe"], p["k_factor"],
                                           None if selection is None else selection.selector)
        D, I = self.index.search(Q, k, params=sp)
        if self.l2:
            D = np.where(I >= 0, self._to_ip(Q, D), -np.inf).astype(np.float32)
        return D, I, {}

    def range_search(self, Q, radius, selection=None, params=None):
        import faiss

        p = self._resolve(params)
        sel = None if selection is None else selection.selector
        idx = faiss.downcast_index(self.index)
        refine = isinstance(idx, faiss.IndexRefine)
        # IndexRefine.range_search returns the base index's approximate scores; search the base
        # with a margin, then keep candidates whose exact score passes (the refine step).
        margin = float(p.get("radius_margin", 0.1)) if refine else 0.0
        base = faiss.downcast_index(idx.base_index) if refine else idx
        sp, _keep = self._base_parameters(base, p["nprobe"], sel)
        r = float(radius) - margin
        if self.l2:
            # Per-query L2 threshold: |q|^2 + 1 - 2 r  (strict <, like FAISS).
            ds, ids = [], []
            for q in Q:
                thr = float(q @ q) + 1.0 - 2.0 * r
                lims, D, I = base.range_search(q[None], thr, params=sp)
                D = self._to_ip(q[None], D[None])[0]
                d_, i_ = split_range(np.array([0, len(I)]), D, I)
                ds.append(d_[0])
                ids.append(i_[0])
        else:
            lims, D, I = base.range_search(Q, r, params=sp)
            ds, ids = split_range(lims.astype(np.int64), D, I)
        if refine:
            flat = faiss.downcast_index(idx.refine_index)
            xb = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
            for j, q in enumerate(Q):
                exact = xb[ids[j]] @ q
                keep = exact >= radius
                order = np.argsort(-exact[keep], kind="stable")
                ds[j] = exact[keep][order].astype(np.float32)
                ids[j] = ids[j][keep][order]
        return ds, ids, {}

    def _base_parameters(self, base, nprobe, sel):
        import faiss

        if isinstance(base, faiss.IndexPreTransform):
            inner = faiss.SearchParametersIVF(nprobe=nprobe)
            p = faiss.SearchParametersPreTransform(index_params=inner)
            keep = [inner, p]
        else:
            p = faiss.SearchParametersIVF(nprobe=nprobe)
            keep = [p]
        if sel is not None:
            for x in keep:
                x.sel = sel
        return p, keep

    def transform(self, Q):
        """Queries as the coarse quantizer sees them (after OPQ / PCA)."""
        import faiss

        idx = faiss.downcast_index(self.index)
        if isinstance(idx, faiss.IndexRefine):
            idx = faiss.downcast_index(idx.base_index)
        x = np.ascontiguousarray(Q, dtype=np.float32)
        if isinstance(idx, faiss.IndexPreTransform):
            for i in range(idx.chain.size()):
                x = faiss.downcast_VectorTransform(idx.chain.at(i)).apply(x)
        return x

    def list_sizes(self) -> np.ndarray:
        if self._sizes is None:
            from faiss.contrib.inspect_tools import get_invlist_sizes

            self._sizes = np.asarray(get_invlist_sizes(self.ivf.invlists), dtype=np.int64)
        return self._sizes

    # --- what the search planner needs (index/planner.py) ------------------------------
    @property
    def nparts(self) -> int:
        return int(self.ivf.nlist)

    def default_probes(self, params=None) -> int:
        return self._resolve(params)["nprobe"]

    def rank_partitions(self, Q, P: int) -> np.ndarray:
        """The first P lists the coarse quantizer probes per query, nearest first (-1 pads).
        A flat quantizer's ranking is one matrix product and a partial sort (a k=P heap search
        costs more as P grows); IMI's comes from its own search."""
        import faiss

        P = int(min(P, self.nparts))
        x = self.transform(Q)
        quantizer = faiss.downcast_index(self.ivf.quantizer)
        if not isinstance(quantizer, faiss.IndexFlat):
            return self.ivf.quantizer.search(x, P)[1].astype(np.int64)
        if getattr(self, "_centroids", None) is None:
            C = faiss.rev_swig_ptr(quantizer.get_xb(), quantizer.ntotal * quantizer.d)
            C = C.reshape(quantizer.ntotal, quantizer.d).copy()
            self._centroids = (C, (C * C).sum(1), quantizer.metric_type == faiss.METRIC_L2)
        C, norms, l2 = self._centroids
        scores = x @ C.T
        if l2:
            scores = 2 * scores - norms  # -|x-c|^2 up to |x|^2
        top = np.argpartition(-scores, P - 1, axis=1)[:, :P] if P < self.nparts else \
            np.tile(np.arange(self.nparts), (len(x), 1))
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
        return np.take_along_axis(top, order, 1).astype(np.int64)

    def partition_sizes(self) -> np.ndarray:
        return self.list_sizes()

    def partition_members(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, list of each id) over every stored entry, read from the inverted lists (ids are
        the row numbers, or the global ids a shard was added with)."""
        if getattr(self, "_members", None) is None:
            import faiss

            inv = self.ivf.invlists
            ids, parts = [], []
            for l in range(self.ivf.nlist):
                n = inv.list_size(l)
                if not n:
                    continue
                ptr = inv.get_ids(l)
                ids.append(faiss.rev_swig_ptr(ptr, n).copy())
                inv.release_ids(l, ptr)
                parts.append(np.full(n, l, dtype=np.int64))
            self._members = (np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64),
                             np.concatenate(parts) if parts else np.zeros(0, np.int64))
        return self._members

    def exact_vectors(self) -> np.ndarray | None:
        """The float vectors kept for the exact refine (`RFlat`), [ntotal, d], a view into the
        index (no copy); None without a flat refine stage."""
        import faiss

        idx = faiss.downcast_index(self.index)
        if not isinstance(idx, faiss.IndexRefine):
            return None
        flat = faiss.downcast_index(idx.refine_index)
        if not isinstance(flat, faiss.IndexFlat):
            return None
        return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)

    def scanned(self, Q, params=None) -> np.ndarray:
        """Documents whose codes are scanned per query: the sizes of the nprobe probed lists."""
        p = self._resolve(params)
        _, lists = self.ivf.quantizer.search(self.transform(Q), p["nprobe"])
        sizes = self.list_sizes()
        return np.where(lists >= 0, sizes[np.maximum(lists, 0)], 0).sum(1).astype(np.int64)

    # --- persistence -------------------------------------------------------------------
    def save(self, directory: Path) -> list[str]:
        import faiss

        faiss.write_index(self.index, str(Path(directory) / FILE))
        return [FILE]

    @classmethod
    def load(cls, directory: Path, params: dict) -> "IVFPQBackend":
        import faiss

        index = faiss.read_index(str(Path(directory) / FILE))
        return cls(index, params["factory"], params.get("nprobe", 16), params.get("k_factor", 1))

    def manifest_params(self) -> dict:
        return {"factory": self.factory, "metric": "l2_unit_norm" if self.l2 else "inner_product",
                **self.defaults}

    def bytes_per_vector(self) -> float:
        import faiss

        return float(len(faiss.serialize_index(self.index))) / max(1, self.ntotal)
