"""The one small search interface (docs/contracts.md section 5) over every backend.

    searcher = open_index(INDEX_BASE or INDEX_BASE/VERSION)   # any URI, committed versions only
    result = searcher.search(queries, k, filter="type:group AND NOT attributes.tag:spam",
                             radius=None, params={"nprobe": 32})

Top-K and radius modes (the paper found radius mode balances cost and quality), each optionally
restricted by a boolean filter (hybrid retrieval). `index.planner` chooses per query between
exact scoring of the selected documents, the ANN scan with nprobe widened for the filter, and
post-filtering (ScaNN), so that a top-k search returns min(k, matching documents) results at
the planner's recall; `result.plan`, `result.probes` and `result.scanned` say what each query
cost (the retrieval service's debug fields and metrics). Compiled filters are cached per index.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from pathlib import Path

import numpy as np

from index import persistence
from index.builder import DOC_IDS, FILTERS
from index.errors import CorruptIndexFile, DimensionMismatch, IndexDataError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SearchResult:
    doc_ids: list[list[str]]
    scores: list[np.ndarray]  # float32 inner products, best first
    scanned: np.ndarray  # int64 [Q]: documents whose codes were scanned per query
    ids: list[np.ndarray] = dataclasses.field(default_factory=list)  # internal row ids
    info: dict = dataclasses.field(default_factory=dict)  # selected, selectivity, plans, ...
    # Per query: the planner's plan (exact | ann | postfilter | empty) and the lists / leaves
    # it probed (0 for exact); `scanned` is the plan's cost in documents.
    plan: list[str] = dataclasses.field(default_factory=list)
    probes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))


def _backend_class(name: str):
    if name == "exact":
        from index.exact import ExactBackend
        return ExactBackend
    if name == "faiss":
        from index.ivf_pq import IVFPQBackend
        return IVFPQBackend
    if name == "scann":
        from index.scann_backend import ScaNNBackend
        return ScaNNBackend
    raise IndexDataError(f"unknown backend {name!r} in the manifest")


class Searcher:
    def __init__(self, path: str, manifest: dict, backend, doc_ids: list[str], attributes,
                 local_path: str | None = None, planner=None):
        from index.planner import Planner

        self.path = path  # the version directory's URI (INDEX_BASE/VERSION)
        self.local_path = local_path or path  # where its files were read from
        self.manifest = manifest
        self.backend = backend
        self.doc_ids = doc_ids
        self.attributes = attributes
        self.planner = Planner(backend, planner)  # planner: index.config.SearchPlannerConfig
        self._row = None
        self._filters: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    @property
    def dimension(self) -> int:
        return int(self.manifest["dimension"])

    def row_of(self, doc_id: str) -> int:
        if self._row is None:
            self._row = {d: i for i, d in enumerate(self.doc_ids)}
        if doc_id not in self._row:
            raise KeyError(f"doc_id {doc_id!r} is not in index {self.path}")
        return self._row[doc_id]

    def _queries(self, queries) -> np.ndarray:
        Q = np.asarray(queries, dtype=np.float32)
        if Q.ndim == 1:
            Q = Q[None]
        if Q.ndim != 2 or Q.shape[1] != self.dimension:
            raise DimensionMismatch(f"queries of shape {tuple(np.shape(queries))} do not match index "
                                    f"{self.path} of dimension {self.dimension}")
        if not np.all(np.isfinite(Q)):
            raise ValueError("queries hold NaN or infinite values")
        return np.ascontiguousarray(Q)

    def compiled(self, filter: str | None):
        """The filter compiled for this index (`index.planner.Compiled`), from a small LRU
        cache: the bitmap, its FAISS selector and the matching documents per list are built once
        per distinct expression."""
        from index.filters import compile_filter

        key = filter.strip() if filter is not None and filter.strip() else None
        with self._lock:
            hit = self._filters.get(key)
            if hit is not None:
                self._filters.move_to_end(key)
                return hit
        selection = None if key is None else compile_filter(key, self.attributes)
        compiled = self.planner.compile(selection)
        with self._lock:
            self._filters[key] = compiled
            while len(self._filters) > max(1, self.planner.config.filter_cache):
                self._filters.popitem(last=False)
        return compiled

    def search(self, queries, k: int = 10, *, filter: str | None = None,
               radius: float | None = None, params: dict | None = None,
               plan: str = "auto") -> SearchResult:
        """Top-k: min(k, matching documents) results per query; with `radius`: every matching
        document scoring >= radius, at most k if k > 0. `plan` forces one of the planner's
        plans (index/planner.py) instead of its per-query choice."""
        Q = self._queries(queries)
        k = int(k)
        if radius is None and k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        compiled = self.compiled(filter)
        info: dict = {}
        if compiled.selection is not None:
            info["selected"] = compiled.selection.size
            info["selectivity"] = compiled.selection.selectivity
        out = self.planner.search(Q, k, compiled, radius=radius, params=params, plan=plan)
        info["plans"] = dict(collections.Counter(out.plans))
        if out.fallbacks:
            info["fallbacks"] = out.fallbacks
        names = [[self.doc_ids[j] for j in row] for row in out.ids]
        return SearchResult(names, out.scores, np.asarray(out.scanned, np.int64), out.ids, info,
                            out.plans, np.asarray(out.probes, np.int64))


def open_index(path, *, schema_hash: str | None = None, model_version=None,
               verify: bool = True, planner=None) -> Searcher:
    """Loads INDEX_BASE (newest committed version) or INDEX_BASE/VERSION (must be committed),
    on any URI, verifying checksums, the dimension and (when given) the embedding model it must
    have been built for. A remote version is read from a local cached copy
    (`persistence.local_dir`); `Searcher.path` is the version's URI either way. `planner`: an
    `index.config.SearchPlannerConfig` (default: index/defaults.py's)."""
    from index.filters import AttributeIndex

    vdir = persistence.resolve(path)
    manifest = persistence.read_manifest(vdir)
    persistence.check_model(vdir, manifest, schema_hash, model_version)
    local = persistence.local_dir(vdir)
    if verify:
        persistence.verify_files(local, manifest)
    cls = _backend_class(manifest["backend"])
    try:
        backend = cls.load(Path(local), manifest["params"])
    except (RuntimeError, OSError, EOFError) as e:  # FAISS/ScaNN readers raise RuntimeError
        raise CorruptIndexFile(f"{vdir}: {manifest['backend']} files cannot be read: "
                               f"{str(e).splitlines()[0][:300]}") from None
    if backend.d != manifest["dimension"]:
        raise DimensionMismatch(f"{vdir}: backend files hold dimension {backend.d}, "
                                f"{persistence.MANIFEST} says {manifest['dimension']}")
    if backend.ntotal != manifest["count"]:
        raise CorruptIndexFile(f"{vdir}: backend files hold {backend.ntotal} vectors, "
                               f"{persistence.MANIFEST} says {manifest['count']}")
    ids_path = Path(local) / DOC_IDS
    try:
        doc_ids = ids_path.read_text(encoding="utf-8").split("\n")[:-1]
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptIndexFile(f"{vdir}/{DOC_IDS} cannot be read: {e}") from None
    if len(doc_ids) != manifest["count"]:
        raise CorruptIndexFile(f"{vdir}/{DOC_IDS}: {len(doc_ids)} ids, manifest says {manifest['count']}")
    attributes = AttributeIndex.load(Path(local) / FILTERS)
    if attributes.count != manifest["count"]:
        raise CorruptIndexFile(f"{vdir}/{FILTERS}: covers {attributes.count} docs, manifest says "
                               f"{manifest['count']}")
    log.info("opened index %s (%s, %d docs%s)", vdir, manifest["backend"], manifest["count"],
             "" if local == vdir else f", local copy {local}")
    return Searcher(vdir, manifest, backend, doc_ids, attributes, local_path=local, planner=planner)
