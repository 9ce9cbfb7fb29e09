"""`ebr index build|sweep|query|inspect` (docs/contracts.md section 5).

Every path argument takes any URI (local paths, gs://...): EMB is an embeddings artifact
(EMB -> its newest committed version, or EMB/VERSION), INDEX_BASE gets a new committed version
per build, and `query` / `inspect` take INDEX_BASE or INDEX_BASE/VERSION. Heavy imports (faiss,
scann, TensorFlow) happen inside the command functions.
"""
from __future__ import annotations

import json
import logging
import sys

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("index", help="build, tune, query and inspect ANN indexes")
    sub = p.add_subparsers(dest="index_command", required=True)

    b = sub.add_parser("build", help="embeddings -> INDEX_BASE/VERSION")
    b.add_argument("--embeddings", required=True,
                   help="EMB or EMB/VERSION written by `ebr embed` (any URI)")
    b.add_argument("--output", required=True,
                   help="INDEX_BASE (any URI): the build becomes INDEX_BASE/<next version>")
    b.add_argument("--backend", default="faiss", choices=("faiss", "scann", "exact"))
    b.add_argument("--factory", default=None, help="FAISS index_factory string (default: index/defaults.py)")
    b.add_argument("--nprobe", type=int, default=None)
    b.add_argument("--k-factor", type=int, default=None)
    b.add_argument("--scann-leaves", type=int, default=None, help="ScaNN tree leaves")
    b.add_argument("--scann-search-leaves", type=int, default=None)
    b.add_argument("--scann-reorder", type=int, default=None)
    b.add_argument("--shards", type=int, default=1, help="sharded FAISS build (Beam) merged on disk")
    b.add_argument("--model-version", default=None)
    b.add_argument("--schema-hash", default=None)
    b.set_defaults(func=cmd_build)

    s = sub.add_parser("sweep", help="recall / scanned / latency / QPS over ANN parameters")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--embeddings", help="EMB or EMB/VERSION (documents, any URI)")
    src.add_argument("--synthetic", type=int, help="N synthetic clustered documents instead")
    s.add_argument("--query-vectors", help=".npy [Q, D] query embeddings, any URI (default: "
                   "synthetic mixture queries, or held-out documents when --embeddings is given)")
    s.add_argument("--queries", type=int, default=500)
    s.add_argument("--dim", type=int, default=64)
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--quick", action="store_true", help="smaller grid")
    s.add_argument("--no-scann", action="store_true")
    s.add_argument("--output", required=True, help="report directory (any URI)")
    s.set_defaults(func=cmd_sweep)

    q = sub.add_parser("query", help="search an index with vectors or a document's own embedding")
    q.add_argument("--index", required=True, help="INDEX_BASE or INDEX_BASE/VERSION (any URI)")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--vector-file", help=".npy [D] or [Q, D], or a JSON list (any URI)")
    g.add_argument("--doc-id", help="use this indexed document's embedding (reconstructed)")
    q.add_argument("--embeddings", help="EMB or EMB/VERSION to read --doc-id's exact embedding from")
    q.add_argument("--filter", default=None)
    q.add_argument("--radius", type=float, default=None)
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--param", action="append", default=[], help="search parameter, e.g. nprobe=32")
    q.set_defaults(func=cmd_query)

    i = sub.add_parser("inspect", help="print the manifest and verify the files")
    i.add_argument("--index", required=True, help="INDEX_BASE or INDEX_BASE/VERSION (any URI)")
    i.set_defaults(func=cmd_inspect)


def cmd_build(args) -> int:
    from index.builder import build_index
    from index.scann_backend import ScaNNConfig
    from index.defaults import DEFAULTS

    if args.shards > 1:
        return _build_sharded(args)
    scann = None
    if args.backend == "scann" and (args.scann_leaves or args.scann_search_leaves
                                    or args.scann_reorder is not None):
        # otherwise build_index scales the swept leaves to the corpus size
        scann = ScaNNConfig(num_leaves=args.scann_leaves or DEFAULTS.scann_num_leaves,
                            leaves=args.scann_search_leaves or DEFAULTS.scann_leaves,
                            reorder=DEFAULTS.scann_reorder if args.scann_reorder is None else args.scann_reorder)
    path = build_index(args.embeddings, args.output, backend=args.backend, factory=args.factory,
                       nprobe=args.nprobe, k_factor=args.k_factor, scann=scann,
                       model_version=args.model_version, schema_hash=args.schema_hash)
    print(json.dumps({"index": path}))
    return 0


def _build_sharded(args) -> int:
    import tempfile

    from index import shards
    from index.builder import build_index
    from index.defaults import DEFAULTS
    from index.embeddings import read_embeddings
    from index.ivf_pq import IVFPQBackend

    if args.backend != "faiss":
        raise ValueError("--shards needs --backend faiss")
    doc_ids, X, terms, meta = read_embeddings(args.embeddings)
    factory = args.factory or DEFAULTS.factory_for(*X.shape).replace(",RFlat", "")
    with tempfile.TemporaryDirectory(prefix="ebr-shards-") as work:
        paths = shards.build_shards(X, factory, work, args.shards)
        merged = shards.merge_shards(paths, f"{work}/{shards.TRAINED}", f"{work}/merged")
        # The published index is self-contained: the merged on-disk lists are loaded and
        # written as one file (for corpora beyond RAM, serve the shards instead).
        index = shards.to_memory(shards.read_merged(merged))
        be = IVFPQBackend(index, factory, args.nprobe or DEFAULTS.nprobe, args.k_factor or 1)
        path = build_index((doc_ids, X, terms, meta | {"source": args.embeddings}), args.output,
                           backend_object=be, model_version=args.model_version,
                           schema_hash=args.schema_hash)
    print(json.dumps({"index": path, "shards": args.shards}))
    return 0


def cmd_sweep(args) -> int:
    import numpy as np

    from index import synthetic
    from index.sweep import SweepGrid, run_sweep

    if args.synthetic:
        _, X, _, Q = synthetic.mixture(args.synthetic, args.queries, args.dim, seed=0)
        label = synthetic.LABEL
    else:
        from index.embeddings import read_embeddings

        _, X, _, meta = read_embeddings(args.embeddings)
        label = f"embeddings {args.embeddings} (model {meta.get('model_version')})"
        Q = None
        if not args.query_vectors:
            # Held-out documents as queries: removed from the indexed set.
            rng = np.random.default_rng(0)
            held = rng.choice(len(X), size=min(args.queries, len(X) // 10), replace=False)
            Q = X[held]
            X = np.delete(X, held, axis=0)
            label += " queries=held-out documents"
    if args.query_vectors:
        Q = _load_npy(args.query_vectors).astype(np.float32)
    grid = SweepGrid.quick() if args.quick else SweepGrid()
    report = run_sweep(X, Q, args.output, k=args.k, grid=grid, label=label, scann=not args.no_scann)
    print(json.dumps({"output": args.output, "best": report["best"]["0.95"], "plots": report["plots"]}, indent=1))
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


def _parse_params(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--param {item!r} is not key=value")
        key, value = item.split("=", 1)
        out[key] = float(value) if "." in value else int(value)
    return out


def cmd_query(args) -> int:
    import numpy as np

    from index import open_index

    searcher = open_index(args.index)
    if args.vector_file:
        if args.vector_file.endswith(".npy"):
            Q = _load_npy(args.vector_file)
        else:
            from ebr import storage

            try:
                Q = np.array(json.loads(storage.read_text(args.vector_file)), dtype=np.float32)
            except json.JSONDecodeError as e:
                raise ValueError(f"{args.vector_file}: line {e.lineno}: {e.msg}") from None
    else:
        Q = _doc_vector(searcher, args)
    result = searcher.search(Q, args.k, filter=args.filter, radius=args.radius,
                             params=_parse_params(args.param) or None)
    info = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in result.info.items()}
    for q, (ids, scores) in enumerate(zip(result.doc_ids, result.scores)):
        print(json.dumps({"query": q, "scanned": int(result.scanned[q]),
                          "hits": [{"doc_id": d, "score": round(float(s), 6)} for d, s in zip(ids, scores)],
                          **({"info": info} if info else {})}))
    return 0


def _doc_vector(searcher, args):
    if args.embeddings:
        from index.embeddings import read_embeddings

        ids, X, _, _ = read_embeddings(args.embeddings)
        if args.doc_id not in ids:
            raise KeyError(f"doc_id {args.doc_id!r} is not in {args.embeddings}")
        return X[ids.index(args.doc_id)][None]
    row = searcher.row_of(args.doc_id)
    index = getattr(searcher.backend, "index", None)
    if index is None:
        raise ValueError(f"--doc-id on a {searcher.manifest['backend']} index needs --embeddings")
    try:
        return index.reconstruct(row)[None]
    except RuntimeError:
        raise ValueError(f"this index cannot reconstruct vectors; pass --embeddings") from None


def cmd_inspect(args) -> int:
    from ebr import storage
    from index import persistence

    vdir = persistence.resolve(args.index)
    manifest = persistence.read_manifest(vdir)
    persistence.verify_files(vdir, manifest)  # reads through ebr.storage: no local copy needed
    print(json.dumps({"path": vdir, "versions": persistence.versions(storage.parent(vdir)),
                      "verified": True, **manifest}, indent=1))
    return 0
