"""The settings of `ebr index build|sweep|query|inspect`, one dataclass per command.

Place in the data flow: `index.cli` generates each command's flags from these classes
(`ebr.config.add_arguments`: `--config FILE`, `--set key=value` and one flag per field), logs the
resolved instance at start and saves it beside the command's output: inside the new index
version for `build` (listed in its manifest), in the report directory for `sweep`.

Each default lives here once. The ANN parameters left at None (factory, nprobe, k_factor, the
ScaNN leaves and reorder) are the swept operating point of `index/defaults.py`, scaled to the
corpus by `index.builder.build_backend` (docs/scaling.md, "Defaults").
"""
from __future__ import annotations

import dataclasses

from ebr import config
from index.builder import BACKENDS
from index.defaults import DEFAULTS


def _exactly_one(cfg, names: tuple[str, str]) -> None:
    given = [n for n in names if getattr(cfg, n) not in (None, "")]
    if len(given) != 1:
        flags = " or ".join("--" + n.replace("_", "-") for n in names)
        raise ValueError(f"give exactly one of {flags}" + (f" (got {len(given)})" if given else ""))


PLANS = ("auto", "exact", "ann", "postfilter")


@dataclasses.dataclass
class SearchPlannerConfig:
    """How `Searcher.search` plans each query (index/planner.py; defaults: index/defaults.py,
    docs/scaling.md "Filtered search")."""
    exact_threshold_kb: int = config.setting(DEFAULTS.exact_threshold_kb, (
        "score a filter's selected documents exactly when their float vectors take at most "
        "this many KB (Qdrant's full_scan_threshold); 0: only when the ANN plan would scan "
        "as many documents"))
    candidates_per_result: float = config.setting(DEFAULTS.candidates_per_result, (
        "the ANN plan widens nprobe / leaves until the probed lists hold this many matching "
        "documents per result wanted (at least the index's default nprobe)"))
    postfilter_overfetch: float = config.setting(DEFAULTS.postfilter_overfetch, (
        "post-filtering fetches k / selectivity times this, doubling while short of k"))
    filter_cache: int = config.setting(DEFAULTS.filter_cache, (
        "compiled filters (bitmap, selector, per-list counts) cached per open index"))

    def validate(self) -> None:
        if self.exact_threshold_kb < 0 or self.candidates_per_result < 1 \
                or self.postfilter_overfetch < 1 or self.filter_cache < 0:
            raise ValueError(f"search planner settings out of range: {self} (need "
                             "exact_threshold_kb >= 0, candidates_per_result >= 1, "
                             "postfilter_overfetch >= 1, filter_cache >= 0)")


@dataclasses.dataclass
class IndexBuildConfig:
    """`ebr index build`: embeddings -> INDEX_BASE/<next version>."""
    embeddings: str = config.required("EMB or EMB/VERSION written by `ebr embed` (any URI)")
    output: str = config.required("INDEX_BASE (any URI): the build becomes "
                                  "INDEX_BASE/<next version>")
    backend: str = dataclasses.field(default="faiss", metadata={
        "choices": BACKENDS, "help": f"ANN backend: {' | '.join(BACKENDS)}"})
    factory: str | None = None  # FAISS index_factory string (default: index/defaults.py)
    nprobe: int | None = None  # FAISS lists probed per query (default: index/defaults.py)
    k_factor: int | None = dataclasses.field(default=None, metadata={"help": (
        "FAISS exact refine of k*k_factor candidates (default: index/defaults.py; 1 with "
        "--shards, whose factory has no refine stage)")})
    scann_leaves: int | None = None  # ScaNN tree leaves (default: ~2*sqrt(N), index/defaults.py)
    scann_search_leaves: int | None = None  # ScaNN leaves searched per query (index/defaults.py)
    scann_reorder: int | None = None  # ScaNN exact re-scoring of the top N, 0: none (index/defaults.py)
    shards: int = 1  # sharded FAISS build (Beam) merged on disk
    model_version: str | None = None  # default: embeddings.json's; must agree with it when given
    schema_hash: str | None = None  # default: embeddings.json's; must agree with it when given


@dataclasses.dataclass
class IndexSweepConfig:
    """`ebr index sweep`: the ANN parameter study (index/sweep.py)."""
    output: str = config.required("report directory (any URI)")
    embeddings: str | None = None  # EMB or EMB/VERSION (documents, any URI); or --synthetic
    synthetic: int | None = None  # N synthetic clustered documents instead of --embeddings
    query_vectors: str | None = dataclasses.field(default=None, metadata={"help": (
        ".npy [Q, D] query embeddings, any URI (default: synthetic mixture queries, or "
        "held-out documents when --embeddings is given)")})
    queries: int = 500  # synthetic queries, or held-out documents (at most N/10) as queries
    dim: int = 64  # dimension of the synthetic documents
    k: int = 10  # recall@k against exact search
    quick: bool = False  # smaller grid (index.sweep.SweepGrid.quick)
    scann: bool = True  # sweep ScaNN as well as FAISS

    def validate(self) -> None:
        _exactly_one(self, ("embeddings", "synthetic"))
        if self.synthetic is not None and self.synthetic < 1:
            raise ValueError(f"--synthetic must be >= 1 documents, got {self.synthetic}")


@dataclasses.dataclass
class IndexQueryConfig:
    """`ebr index query`: top-k or radius search with an optional boolean filter."""
    index: str = config.required("INDEX_BASE or INDEX_BASE/VERSION (any URI)")
    vector_file: str | None = None  # .npy [D] or [Q, D], or a JSON list (any URI)
    doc_id: str | None = None  # use this indexed document's embedding (reconstructed)
    embeddings: str | None = None  # EMB or EMB/VERSION to read --doc-id's exact embedding from
    filter: str | None = None  # boolean filter, e.g. "type:group AND NOT attributes.tag:spam"
    radius: float | None = None  # every document scoring >= radius (at most k of them)
    k: int = dataclasses.field(default=10, metadata={"flags": ("-k",),
                                                     "help": "documents per query"})
    params: dict = dataclasses.field(default_factory=dict, metadata={
        "flags": ("--param",), "help": "search parameter, e.g. nprobe=32"})
    plan: str = config.setting("auto", "search plan: auto (the planner chooses per query), "
                               "exact, ann or postfilter", choices=PLANS)
    planner: SearchPlannerConfig = dataclasses.field(default_factory=SearchPlannerConfig)

    def validate(self) -> None:
        _exactly_one(self, ("vector_file", "doc_id"))
        self.planner.validate()


@dataclasses.dataclass
class IndexInspectConfig:
    """`ebr index inspect`: a version's manifest, its files verified."""
    index: str = config.required("INDEX_BASE or INDEX_BASE/VERSION (any URI)")
