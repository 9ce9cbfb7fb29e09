"""`ebr index build|sweep|query|inspect` (docs/contracts.md section 5).

Every path argument takes any URI (local paths, gs://...): EMB is an embeddings artifact
(EMB -> its newest committed version, or EMB/VERSION), INDEX_BASE gets a new committed version
per build, and `query` / `inspect` take INDEX_BASE or INDEX_BASE/VERSION. Heavy imports (faiss,
scann, TensorFlow) happen inside the command functions.
"""
from __future__ import annotations

import json
import logging

from ebr import config
from index.config import IndexBuildConfig, IndexInspectConfig, IndexQueryConfig, IndexSweepConfig

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("index", help="build, tune, query and inspect ANN indexes")
    sub = p.add_subparsers(dest="index_command", required=True)
    for name, cls, func, help_text in (
            ("build", IndexBuildConfig, cmd_build, "embeddings -> INDEX_BASE/VERSION"),
            ("sweep", IndexSweepConfig, cmd_sweep, "recall / scanned / latency / QPS over ANN "
                                                   "parameters"),
            ("query", IndexQueryConfig, cmd_query, "search an index with vectors or a "
                                                   "document's own embedding"),
            ("inspect", IndexInspectConfig, cmd_inspect, "print the manifest and verify the files")):
        c = sub.add_parser(name, help=help_text, description=help_text)
        config.add_arguments(c, cls)
        c.set_defaults(func=func)


def cmd_build(args) -> int:
    from index.builder import build_from_config

    cfg = config.from_args(IndexBuildConfig, args)
    config.announce("index build", cfg)
    if cfg.shards > 1:
        return _build_sharded(cfg)
    print(json.dumps({"index": build_from_config(cfg)}))
    return 0


def _build_sharded(cfg: IndexBuildConfig) -> int:
    import tempfile

    from index import shards
    from index.builder import build_index
    from index.defaults import DEFAULTS
    from index.embeddings import read_embeddings
    from index.ivf_pq import IVFPQBackend

    if cfg.backend != "faiss":
        raise ValueError("--shards needs --backend faiss")
    doc_ids, X, terms, meta = read_embeddings(cfg.embeddings)
    factory = cfg.factory or DEFAULTS.factory_for(*X.shape).replace(",RFlat", "")
    with tempfile.TemporaryDirectory(prefix="ebr-shards-") as work:
        paths = shards.build_shards(X, factory, work, cfg.shards)
        merged = shards.merge_shards(paths, f"{work}/{shards.TRAINED}", f"{work}/merged")
        # The published index is self-contained: the merged on-disk lists are loaded and
        # written as one file (for corpora beyond RAM, serve the shards instead).
        index = shards.to_memory(shards.read_merged(merged))
        be = IVFPQBackend(index, factory, cfg.nprobe or DEFAULTS.nprobe, cfg.k_factor or 1)
        path = build_index((doc_ids, X, terms, meta | {"source": cfg.embeddings}), cfg.output,
                           backend_object=be, model_version=cfg.model_version,
                           schema_hash=cfg.schema_hash, command_config=cfg)
    print(json.dumps({"index": path, "shards": cfg.shards}))
    return 0


def cmd_sweep(args) -> int:
    import numpy as np

    from index import synthetic
    from index.sweep import SweepGrid, run_sweep

    cfg = config.from_args(IndexSweepConfig, args)
    cfg.validate()
    config.announce("index sweep", cfg)
    if cfg.synthetic is not None:
        _, X, _, Q = synthetic.mixture(cfg.synthetic, cfg.queries, cfg.dim, seed=0)
        label = synthetic.LABEL
    else:
        from index.embeddings import read_embeddings

        _, X, _, meta = read_embeddings(cfg.embeddings)
        label = f"embeddings {cfg.embeddings} (model {meta.get('model_version')})"
        Q = None
        if not cfg.query_vectors:
            # Held-out documents as queries: removed from the indexed set.
            rng = np.random.default_rng(0)
            held = rng.choice(len(X), size=min(cfg.queries, len(X) // 10), replace=False)
            Q = X[held]
            X = np.delete(X, held, axis=0)
            label += " queries=held-out documents"
    if cfg.query_vectors:
        Q = _load_npy(cfg.query_vectors).astype(np.float32)
    grid = SweepGrid.quick() if cfg.quick else SweepGrid()
    report = run_sweep(X, Q, cfg.output, k=cfg.k, grid=grid, label=label, scann=cfg.scann)
    config.save(cfg, cfg.output)  # beside sweep.json and the plots
    print(json.dumps({"output": cfg.output, "best": report["best"]["0.95"], "plots": report["plots"]},
                     indent=1))
    return 0


def _load_npy(uri: str):
    """A .npy array from any URI."""
    import io

    import numpy as np

    from ebr import storage

    try:
        return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"read {uri}: not a .npy array: {e}") from None


def cmd_query(args) -> int:
    import numpy as np

    from ebr import features
    from index import open_index

    cfg = config.from_args(IndexQueryConfig, args)
    cfg.validate()
    config.announce("index query", cfg)
    searcher = open_index(cfg.index, planner=cfg.planner)
    if cfg.vector_file:
        if cfg.vector_file.endswith(".npy"):
            Q = _load_npy(cfg.vector_file)
        else:
            from ebr import storage

            try:
                Q = np.array(json.loads(storage.read_text(cfg.vector_file)), dtype=np.float32)
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg.vector_file}: line {e.lineno}: {e.msg}") from None
    else:
        Q = _doc_vector(searcher, cfg)
    result = searcher.search(Q, cfg.k, filter=cfg.filter, radius=cfg.radius,
                             params=cfg.params or None, plan=cfg.plan)
    info = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in result.info.items()}
    for q, (ids, scores) in enumerate(zip(result.doc_ids, result.scores)):
        hits = [{features.DOC_ID: d, "score": round(float(s), 6)} for d, s in zip(ids, scores)]
        print(json.dumps({"query": q, "plan": result.plan[q], "probes": int(result.probes[q]),
                          "scanned": int(result.scanned[q]), "hits": hits,
                          **({"info": info} if info else {})}))
    return 0


def _doc_vector(searcher, cfg: IndexQueryConfig):
    if cfg.embeddings:
        from index.embeddings import read_embeddings

        ids, X, _, _ = read_embeddings(cfg.embeddings)
        if cfg.doc_id not in ids:
            raise KeyError(f"doc_id {cfg.doc_id!r} is not in {cfg.embeddings}")
        return X[ids.index(cfg.doc_id)][None]
    row = searcher.row_of(cfg.doc_id)
    index = getattr(searcher.backend, "index", None)
    if index is None:
        raise ValueError(f"--doc-id on a {searcher.manifest['backend']} index needs --embeddings")
    try:
        return index.reconstruct(row)[None]
    except RuntimeError:
        raise ValueError("this index cannot reconstruct vectors; pass --embeddings") from None


def cmd_inspect(args) -> int:
    from ebr import storage
    from index import persistence

    cfg = config.from_args(IndexInspectConfig, args)
    config.announce("index inspect", cfg)
    vdir = persistence.resolve(cfg.index)
    manifest = persistence.read_manifest(vdir)
    persistence.verify_files(vdir, manifest)  # reads through ebr.storage: no local copy needed
    print(json.dumps({"path": vdir, "versions": persistence.versions(storage.parent(vdir)),
                      "verified": True, **manifest}, indent=1))
    return 0
