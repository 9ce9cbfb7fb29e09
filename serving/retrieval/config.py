"""The retrieval service's settings: `ServeConfig`, from which `ebr serve retrieval` generates
its flags (`ebr.config.add_arguments`; `--config FILE` and `--set KEY=VALUE` on top), and which
`serving.retrieval.server.RetrievalServer` takes. Standard library only, so building the `ebr`
parser loads neither gRPC nor TensorFlow.
"""
from __future__ import annotations

import dataclasses


def _help(text: str, **more) -> dict:
    return {"help": text, **more}


@dataclasses.dataclass
class ServeConfig:
    # Paths are URIs (local or gs://); only committed versions count (docs/contracts.md).
    index: str = dataclasses.field(default="", metadata=_help(
        "INDEX_BASE (newest committed version, polled) or INDEX_BASE/VERSION (fixed)",
        required=True))
    # The in-process query tower, or, with model_address, where each served version's
    # ebr_metadata.json is read from.
    model: str | None = dataclasses.field(default=None, metadata=_help(
        "MODEL_DIR (or MODEL_DIR/query_tower): loaded in-process, or read for "
        "ebr_metadata.json when --model-address is set"))
    model_address: str | None = None  # host:port of TF Serving / `ebr serve model`
    model_name: str = "query_tower"  # the query tower's name on the model server
    model_tls_ca: str | None = None  # CA certificate of a TLS model server
    # The model version the live index needs (and the one a waiting index needs) is pinned on
    # the model server for this long, renewed on every poll (docs/contracts.md section 6).
    model_pin_seconds: float = dataclasses.field(default=60.0, metadata=_help(
        "how long the model server keeps the pinned query tower versions loaded after each "
        "renewal (renewed every --poll-seconds)"))
    host: str = "[::]"  # address to bind
    port: int = 8600  # gRPC port (0 = any free port)
    metrics_port: int | None = None  # Prometheus /metrics port (none = no endpoint, 0 = any free)
    # workers + max_queue requests are admitted at once (more -> RESOURCE_EXHAUSTED); `workers`
    # threads run the unbatched paths (embed_batch 1, ensembles), batches run on their own.
    workers: int = 8  # threads of the unbatched paths (embed batch 1, ensembles)
    max_queue: int = 16  # requests admitted beyond the workers; more get RESOURCE_EXHAUSTED
    max_k: int = 1_000  # largest k a request may ask for
    poll_seconds: float = 1.0  # how often INDEX_BASE is listed for a new version (0 = never)
    # A new index version that fails to load is retried after retry_seconds, doubling per
    # failure up to retry_max_seconds; the serving pair is kept meanwhile.
    retry_seconds: float = dataclasses.field(default=1.0, metadata=_help(
        "first retry delay of a new index version that failed to load (doubles per failure)"))
    retry_max_seconds: float = 60.0  # longest retry delay of a failed index version
    drain_seconds: float = 10.0  # on SIGTERM, how long requests in flight may take to finish
    # On SIGTERM, report NOT_SERVING but keep answering this long before refusing new requests,
    # so load balancers / k8s endpoints stop routing here first (k8s: < terminationGracePeriod).
    drain_delay_seconds: float = dataclasses.field(default=0.0, metadata=_help(
        "on SIGTERM, seconds of NOT_SERVING health while still answering, before new requests "
        "are refused (k8s endpoint removal)", flags=("--drain-delay",)))
    search_params: dict | None = dataclasses.field(default=None, metadata=_help(
        "index search parameter passed to searcher.search(params=...), e.g. nprobe=32",
        flags=("--search-param",)))
    embed_batch: int = dataclasses.field(default=32, metadata=_help(
        "largest dynamic batch of concurrent requests, embedded and searched together "
        "(1 = off)"))
    embed_threads: int = 1  # batches in flight at once (1 = largest batches, least CPU per query)
    # Applied in a fresh process only (serving.retrieval.threads.set_tf_threads).
    tf_threads: int = 1  # TensorFlow inter/intra-op threads (0 = TF default)
    # Requests already run in parallel on the workers; more OpenMP threads per single-query
    # search only spin against them.
    search_threads: int = 1  # FAISS OpenMP threads per search (0 = FAISS default)
    tls_cert: str | None = None  # PEM certificate chain (enables TLS with --tls-key)
    tls_key: str | None = None  # PEM private key
    tls_client_ca: str | None = None  # require client certificates signed by this CA (mutual TLS)
    # Named ensembles the requests may ask for (serving.retrieval.ensembles.load_registry).
    ensembles: str | None = dataclasses.field(default=None, metadata=_help(
        "JSON/YAML file (any URI) of named ensembles: weighted concatenation, cascade"))
