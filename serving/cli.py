"""`ebr serve model`, `ebr serve retrieval` and `ebr query`: the serving stage's command line.

Heavy imports (TensorFlow, gRPC servers) happen inside the command functions so `ebr --help`
stays fast.
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
from pathlib import Path


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

    retrieval = serve_sub.add_parser("retrieval", help="embed queries and search the index")
    retrieval.add_argument("--index", required=True,
                           help="INDEX_BASE (newest version, polled) or INDEX_BASE/VERSION")
    retrieval.add_argument("--model", help="MODEL_DIR/query_tower: loaded in-process, or read "
                           "for ebr_metadata.json when --model-address is set")
    retrieval.add_argument("--model-address", help="host:port of TF Serving / `ebr serve model`")
    retrieval.add_argument("--model-name", default="query_tower")
    retrieval.add_argument("--model-tls-ca", help="CA certificate of a TLS model server")
    retrieval.add_argument("--host", default="[::]")
    retrieval.add_argument("--port", type=int, default=8600)
    retrieval.add_argument("--metrics-port", type=int, default=None,
                           help="Prometheus /metrics port (default: none)")
    retrieval.add_argument("--workers", type=int, default=8)
    retrieval.add_argument("--max-queue", type=int, default=16,
                           help="requests admitted beyond the workers; more get RESOURCE_EXHAUSTED")
    retrieval.add_argument("--max-k", type=int, default=1000)
    retrieval.add_argument("--poll-seconds", type=float, default=1.0)
    retrieval.add_argument("--drain-seconds", type=float, default=10.0,
                           help="on SIGTERM, how long requests in flight may take to finish")
    retrieval.add_argument("--drain-delay", type=float, default=0.0,
                           help="on SIGTERM, seconds of NOT_SERVING health while still answering, "
                                "before new requests are refused (k8s endpoint removal)")
    retrieval.add_argument("--embed-batch", type=int, default=32,
                           help="largest dynamic batch of concurrent requests, embedded and "
                                "searched together (1 = off)")
    retrieval.add_argument("--embed-threads", type=int, default=1,
                           help="embedding batches in flight at once")
    retrieval.add_argument("--tf-threads", type=int, default=1,
                           help="TensorFlow inter/intra-op threads (0 = TF default)")
    retrieval.add_argument("--search-threads", type=int, default=1,
                           help="FAISS OpenMP threads per search (0 = FAISS default)")
    retrieval.add_argument("--search-param", action="append", default=[], metavar="KEY=VALUE",
                           help="index search parameter, e.g. nprobe=32 (repeatable)")
    retrieval.add_argument("--ensembles", help="JSON/YAML file of named ensembles (weighted "
                           "concatenation, cascade): experiments/ensembles.py load_registry")
    retrieval.add_argument("--tls-cert")
    retrieval.add_argument("--tls-key")
    retrieval.add_argument("--tls-client-ca", help="require client certificates signed by this CA")
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
                       help="searchers.jsonl[.gz] to fill the searcher's features from")
    query.add_argument("--city")
    query.add_argument("--region")
    query.add_argument("--country")
    query.add_argument("--language")
    query.add_argument("--attribute", action="append", default=[], help="key:value (repeatable)")
    query.add_argument("--friend", action="append", default=[])
    query.add_argument("--history", action="append", default=[], help="clicked doc id (repeatable)")
    query.add_argument("--timeout", type=float, default=10.0)
    query.add_argument("--tls-ca")
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


def _serve_retrieval(args) -> int:
    from ebr import jsonlog
    from serving.retrieval_service import ServeConfig, serve

    jsonlog.setup(logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    config = ServeConfig(
        index=args.index, model=args.model, model_address=args.model_address,
        model_name=args.model_name, model_tls_ca=args.model_tls_ca, host=args.host,
        port=args.port, metrics_port=args.metrics_port, workers=args.workers,
        max_queue=args.max_queue, max_k=args.max_k, poll_seconds=args.poll_seconds,
        drain_seconds=args.drain_seconds, drain_delay_seconds=args.drain_delay,
        embed_batch=args.embed_batch, embed_threads=args.embed_threads,
        tf_threads=args.tf_threads,
        search_threads=args.search_threads, search_params=_parse_params(args.search_param),
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca)
    registry = None
    if args.ensembles:
        from experiments.ensembles import load_registry

        registry = load_registry(args.ensembles)
    return serve(config, ensemble_registry=registry)


def _find_searcher(path: str, searcher_id: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
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
