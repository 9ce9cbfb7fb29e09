"""`ebr serve model`, `ebr serve retrieval` and `ebr query`: the serving stage's command line.

Each command's flags are generated from its settings dataclass (`ebr.config.add_arguments`):
`serving.model_server.config.ModelServerConfig`, `serving.retrieval.config.ServeConfig` and
`QueryConfig` below; `--config FILE` and `--set KEY=VALUE` work on every one, and each command
logs its resolved configuration at start. Every path option takes a URI (local or gs://): the
index and model are artifacts resolved to committed versions (docs/contracts.md sections 3, 5,
6), certificates and searchers.jsonl are read through `ebr.storage`.

The settings modules are standard library only; gRPC and TensorFlow load inside the command
functions, so `ebr --help` stays fast.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import logging

from ebr import config, features
from serving.model_server.config import ModelServerConfig
from serving.retrieval.config import ServeConfig


@dataclasses.dataclass
class QueryConfig:
    query: str = dataclasses.field(default="", metadata={
        "positional": True, "help": "query text (may be empty with --searcher)"})
    address: str = "localhost:8600"  # host:port of the retrieval service
    k: int = dataclasses.field(default=10, metadata={"flags": ("-k",),
                                                     "help": "documents to return"})
    filter: str = ""  # e.g. 'city:seattle AND NOT type:group'
    radius: float | None = None  # keep only documents scoring at least this
    backend: str = ""  # the index backend the service must be serving ('' = any)
    ensemble: str = ""  # a named ensemble of the service to answer with
    searcher: str | None = None  # searcher id
    searchers: str | None = None  # searchers.jsonl[.gz] (any URI) with the searcher's features
    # Searcher features, named as retrieval.proto's SearcherFeatures fields; they win over the
    # searcher's record.
    city: str | None = None  # the searcher's city
    region: str | None = None  # the searcher's region
    country: str | None = None  # the searcher's country
    language: str | None = None  # the searcher's language
    attributes: list[str] = dataclasses.field(default_factory=list, metadata={
        "flags": ("--attribute",), "help": "key:value"})
    friends: list[str] = dataclasses.field(default_factory=list, metadata={
        "flags": ("--friend",), "help": "searcher id of a friend"})
    history_doc_ids: list[str] = dataclasses.field(default_factory=list, metadata={
        "flags": ("--history",), "help": "clicked doc id"})
    timeout: float = 10.0  # seconds
    tls_ca: str | None = None  # CA certificate of a TLS retrieval service (any URI)
    json: bool = False  # print JSON instead of a table


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="run the model server or the retrieval service")
    serve_sub = serve.add_subparsers(dest="server", required=True)

    model = serve_sub.add_parser("model", help="TF Serving gRPC API over MODEL_DIR/NAME/VERSION")
    config.add_arguments(model, ModelServerConfig)
    model.set_defaults(func=_serve_model)

    retrieval = serve_sub.add_parser(
        "retrieval", help="embed queries and search the index",
        description="Every path takes a URI (local or gs://).")
    config.add_arguments(retrieval, ServeConfig)
    retrieval.set_defaults(func=_serve_retrieval)

    query = subparsers.add_parser("query", help="ask the retrieval service and print a table")
    config.add_arguments(query, QueryConfig)
    query.set_defaults(func=_query)


def _serve_model(args) -> int:
    cfg = config.from_args(ModelServerConfig, args)
    config.announce("serve model", cfg)
    from serving.model_server.server import run

    return run(cfg)


def _serve_retrieval(args) -> int:
    from ebr import jsonlog

    jsonlog.setup(logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    cfg = config.from_args(ServeConfig, args)
    config.announce("serve retrieval", cfg)
    from serving.retrieval.server import serve

    return serve(cfg)


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
        if record.get(features.SEARCHER_ID) == searcher_id:
            return record
    raise KeyError(f"searcher {searcher_id!r} not found in {path}")


def searcher_values(cfg: QueryConfig) -> dict:
    """Searcher features from the flags, on top of the searcher's record when --searchers is set.

    Keys: SearcherFeatures field names for what the flags set, feature names for what comes
    from the record (`serving.retrieval.client.searcher_proto` takes both)."""
    from serving.retrieval.validation import SEARCHER_INPUTS  # proto field -> feature name

    values: dict = {}
    if cfg.searchers:
        if not cfg.searcher:
            raise ValueError("--searchers needs --searcher ID")
        record = _find_searcher(cfg.searchers, cfg.searcher)
        values = features.query_values("", record, cfg.history_doc_ids)
        values.pop(features.QUERY_TEXT)
    elif cfg.searcher:
        values[features.SEARCHER_ID] = cfg.searcher
    for field, name in SEARCHER_INPUTS.items():
        value = getattr(cfg, field, None)  # QueryConfig fields are named as the proto's
        if value:
            values[field] = value
            if name != field:  # the flag wins over the record's feature
                values.pop(name, None)
    return values


def _query(args) -> int:
    import grpc

    from serving.retrieval.client import RetrievalClient, format_table

    cfg = config.from_args(QueryConfig, args)
    config.announce("query", cfg)
    with RetrievalClient(cfg.address, tls_ca=cfg.tls_ca, timeout=cfg.timeout) as client:
        try:
            result = client.retrieve(cfg.query, searcher=searcher_values(cfg), k=cfg.k,
                                     filter=cfg.filter, radius=cfg.radius,
                                     backend=cfg.backend, ensemble=cfg.ensemble)
        except grpc.RpcError as e:
            print(f"ebr query: {e.code().name}: {e.details()}")
            return 1
    if cfg.json:
        print(json.dumps(dataclasses.asdict(result)))
    else:
        print(format_table(cfg.query, result))
    return 0
