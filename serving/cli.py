"""`ebr serve model`, `ebr serve retrieval` and `ebr query`: the serving stage's command line.

Every path option takes a URI (local or gs://): the index and model are artifacts resolved to
committed versions (docs/contracts.md sections 3, 5, 6), certificates and searchers.jsonl are
read through `ebr.storage`.

Heavy imports (TensorFlow, gRPC servers) happen inside the command functions so `ebr --help`
stays fast.
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="run the model server or the retrieval service")
    serve_sub = serve.add_subparsers(dest="server", required=True)

    model = serve_sub.add_parser("model", help="TF Serving gRPC API over MODEL_DIR/NAME/VERSION")
    try:
        from serving import model_server
    except ImportError as e:  # written by another component; report instead of hiding it
        model.set_defaults(func=lambda args, e=e: _missing(e))
    else:
        model_server.add_arguments(model)
        model.set_defaults(func=model_server.run)

    retrieval = serve_sub.add_parser(
        "retrieval", help="embed queries and search the index",
        description="Every path takes a URI (local or gs://). Options left out take "
                    "serving.retrieval_service.ServeConfig's defaults.")
    # default=SUPPRESS: an option not given is not passed on, so ServeConfig's default holds
    # (one place for every default).
    opt = dict(default=argparse.SUPPRESS)
    retrieval.add_argument("--index", required=True,
                           help="INDEX_BASE (newest committed version, polled) or "
                                "INDEX_BASE/VERSION (fixed)")
    retrieval.add_argument("--model", **opt,
                           help="MODEL_DIR (or MODEL_DIR/query_tower): loaded in-process, or "
                                "read for ebr_metadata.json when --model-address is set")
    retrieval.add_argument("--model-address", **opt,
                           help="host:port of TF Serving / `ebr serve model`")
    retrieval.add_argument("--model-name", **opt)
    retrieval.add_argument("--model-tls-ca", **opt, help="CA certificate of a TLS model server")
    retrieval.add_argument("--host", **opt)
    retrieval.add_argument("--port", type=int, **opt)
    retrieval.add_argument("--metrics-port", type=int, **opt,
                           help="Prometheus /metrics port (default: none)")
    retrieval.add_argument("--workers", type=int, **opt)
    retrieval.add_argument("--max-queue", type=int, **opt,
                           help="requests admitted beyond the workers; more get RESOURCE_EXHAUSTED")
    retrieval.add_argument("--max-k", type=int, **opt)
    retrieval.add_argument("--poll-seconds", type=float, **opt,
                           help="how often INDEX_BASE is listed for a new version (0 = never)")
    retrieval.add_argument("--retry-seconds", type=float, **opt,
                           help="first retry delay of a new index version that failed to load "
                                "(doubles per failure)")
    retrieval.add_argument("--retry-max-seconds", type=float, **opt,
                           help="longest retry delay of a failed index version")
    retrieval.add_argument("--drain-seconds", type=float, **opt,
                           help="on SIGTERM, how long requests in flight may take to finish")
    retrieval.add_argument("--drain-delay", dest="drain_delay_seconds", type=float, **opt,
                           metavar="SECONDS",
                           help="on SIGTERM, seconds of NOT_SERVING health while still answering, "
                                "before new requests are refused (k8s endpoint removal)")
    retrieval.add_argument("--embed-batch", type=int, **opt,
                           help="largest dynamic batch of concurrent requests, embedded and "
                                "searched together (1 = off)")
    retrieval.add_argument("--embed-threads", type=int, **opt,
                           help="embedding batches in flight at once")
    retrieval.add_argument("--tf-threads", type=int, **opt,
                           help="TensorFlow inter/intra-op threads (0 = TF default)")
    retrieval.add_argument("--search-threads", type=int, **opt,
                           help="FAISS OpenMP threads per search (0 = FAISS default)")
    retrieval.add_argument("--search-param", dest="search_params", action="append", **opt,
                           metavar="KEY=VALUE",
                           help="index search parameter, e.g. nprobe=32 (repeatable)")
    retrieval.add_argument("--ensembles", help="JSON/YAML file of named ensembles (weighted "
                           "concatenation, cascade): experiments/ensembles.py load_registry")
    retrieval.add_argument("--tls-cert", **opt)
    retrieval.add_argument("--tls-key", **opt)
    retrieval.add_argument("--tls-client-ca", **opt,
                           help="require client certificates signed by this CA")
    retrieval.set_defaults(func=_serve_retrieval)

    query = subparsers.add_parser("query", help="ask the retrieval service and print a table")
    query.add_argument("query", nargs="?", default="",
                       help="query text (may be empty with --searcher)")
    query.add_argument("--address", default="localhost:8600")
    query.add_argument("-k", type=int, default=10)
    query.add_argument("--filter", default="", help="e.g. 'city:seattle AND NOT type:group'")
    query.add_argument("--radius", type=float)
    query.add_argument("--backend", default="")
    query.add_argument("--ensemble", default="")
    query.add_argument("--searcher", help="searcher id")
    query.add_argument("--searchers",
                       help="searchers.jsonl[.gz] (any URI) to fill the searcher's features from")
    query.add_argument("--city")
    query.add_argument("--region")
    query.add_argument("--country")
    query.add_argument("--language")
    query.add_argument("--attribute", action="append", default=[], help="key:value (repeatable)")
    query.add_argument("--friend", action="append", default=[])
    query.add_argument("--history", action="append", default=[], help="clicked doc id (repeatable)")
    query.add_argument("--timeout", type=float, default=10.0)
    query.add_argument("--tls-ca", help="CA certificate of a TLS retrieval service (any URI)")
    query.add_argument("--json", action="store_true", help="print JSON instead of a table")
    query.set_defaults(func=_query)


def _missing(error: Exception) -> int:
    raise ValueError(f"the model server is not available: {error}")


def _parse_params(items: list[str]) -> dict | None:
    params = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--search-param {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params or None


def serve_config(args):
    """ServeConfig from the parsed `ebr serve retrieval` options (those given; the rest keep
    ServeConfig's defaults)."""
    import dataclasses

    from serving.retrieval_service import ServeConfig

    names = {f.name for f in dataclasses.fields(ServeConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if "search_params" in given:
        given["search_params"] = _parse_params(given["search_params"])
    return ServeConfig(**given)


def _serve_retrieval(args) -> int:
    from ebr import jsonlog
    from serving.retrieval_service import serve

    jsonlog.setup(logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    config = serve_config(args)
    registry = None
    if args.ensembles:
        from experiments.ensembles import load_registry

        registry = load_registry(args.ensembles)
    return serve(config, ensemble_registry=registry)


def _find_searcher(path: str, searcher_id: str) -> dict:
    """The searcher's record in searchers.jsonl[.gz] (any URI)."""
    from ebr import storage

    data = storage.read_bytes(path)
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ValueError(f"read {path}: not a gzip file ({e})") from None
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: {e.msg}") from None
        if record.get("searcher_id") == searcher_id:
            return record
    raise KeyError(f"searcher {searcher_id!r} not found in {path}")


def searcher_values(args) -> dict:
    """Searcher features from the flags, on top of the searcher's record when --searchers is set."""
    from ebr import features

    values: dict = {}
    if args.searchers:
        if not args.searcher:
            raise ValueError("--searchers needs --searcher ID")
        record = _find_searcher(args.searchers, args.searcher)
        values = features.query_values("", record, args.history)
        values.pop(features.features(features.QUERY, [features.TEXT])[0].name)
    elif args.searcher:
        values["searcher_id"] = args.searcher
    for field in ("city", "region", "country", "language"):
        if getattr(args, field):
            values[field] = getattr(args, field)
    for field, flag in (("attributes", args.attribute), ("friends", args.friend),
                        ("history_doc_ids", args.history)):
        if flag:
            values[field] = flag
    # Flags win over the record: drop the record's prefixed key when the flag set the field.
    for field in list(values):
        if not field.startswith("searcher_") and f"searcher_{field}" in values:
            del values[f"searcher_{field}"]
    return values


def _query(args) -> int:
    import grpc

    from serving.retrieval_client import RetrievalClient, format_table

    with RetrievalClient(args.address, tls_ca=args.tls_ca, timeout=args.timeout) as client:
        try:
            result = client.retrieve(args.query, searcher=searcher_values(args), k=args.k,
                                     filter=args.filter, radius=args.radius,
                                     backend=args.backend, ensemble=args.ensemble)
        except grpc.RpcError as e:
            print(f"ebr query: {e.code().name}: {e.details()}")
            return 1
    if args.json:
        import dataclasses

        print(json.dumps(dataclasses.asdict(result)))
    else:
        print(format_table(args.query, result))
    return 0
