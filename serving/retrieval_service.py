"""The retrieval service: `ebr.retrieval.v1.Retrieval/Retrieve` over gRPC.

End of the data flow (paper section 5, "serving"): a request's query text and searcher
features are embedded by the exported query tower (serving/embedder.py: TF Serving's
PredictionService or in-process), and the vector is searched in the ANN index built from the
document tower's embeddings (`index.open_index(...).search`, docs/contracts.md section 5),
with an optional boolean filter and radius.

A *pair* (query-tower version, index version) serves every request; the index manifest names
the model version its embeddings came from, and the service pins the model to that version. A
poller watches INDEX_BASE for a newer index version, loads it with its model beside the serving
pair, checks they agree (dimension, schema hash) and swaps one reference: requests in flight
finish on the old pair, none is dropped. A mismatching pair is refused with a clear error and
the old pair keeps serving (at start the process refuses to come up).

Operational surface: grpc.health.v1 (SERVING only while a pair is loaded), Prometheus metrics
on their own HTTP port, JSON logs, deadlines checked between stages and passed to the model
server, bounded concurrency (gRPC's `maximum_concurrent_rpcs` answers RESOURCE_EXHAUSTED instead
of queueing without bound), graceful drain on SIGTERM, optional TLS (and mutual TLS).

Ensembles (paper section 6: weighted concatenation, cascade) plug in through the `ensembles`
registry: `ensembles[name](EnsembleCall) -> EnsembleResult`; issue 7 fills it from
experiments/ensembles.py. A request naming an ensemble is answered by it instead of the pair.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Callable, Sequence

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ebr import features
from serving import embedder, retrieval_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "ebr.retrieval.v1.Retrieval"
# Health service name that is SERVING while the process runs, even before a pair is loaded or
# during a drain: for liveness probes (readiness probes use "" or SERVICE_NAME).
LIVENESS_SERVICE = "liveness"
MAX_FILTER_CHARS = 4_096
MAX_FIELD_CHARS = 256  # one searcher id / city / attribute term / friend / doc id

# The query text input of the towers, and proto SearcherFeatures field -> tower input name
# (a field is named as its feature, minus the `searcher_` prefix). Derived, so a schema change
# that the proto does not follow fails here at import, not silently at serving time.
TEXT_INPUT = features.features(features.QUERY, [features.TEXT])[0].name
SEARCHER_INPUTS = {
    f.name: (f.name if f.name in features.QUERY_INPUTS else f"searcher_{f.name}")
    for f in retrieval_pb2.SearcherFeatures.DESCRIPTOR.fields
}
if set(SEARCHER_INPUTS.values()) | {TEXT_INPUT} != set(features.QUERY_INPUTS):
    raise ImportError(f"retrieval.proto SearcherFeatures {sorted(SEARCHER_INPUTS.values())} do "
                      f"not cover ebr.features.QUERY_INPUTS {sorted(features.QUERY_INPUTS)}")


@dataclasses.dataclass
class ServeConfig:
    index: str  # INDEX_BASE (newest version, polled) or INDEX_BASE/VERSION (fixed)
    model: str | None = None  # MODEL_DIR/query_tower: in-process model, or metadata for remote
    model_address: str | None = None  # host:port of TF Serving / `ebr serve model`
    model_name: str = "query_tower"
    host: str = "[::]"
    port: int = 8600  # 0 = any free port (tests)
    metrics_port: int | None = None  # None = no metrics endpoint, 0 = any free port
    workers: int = 8  # threads executing requests
    max_queue: int = 16  # requests admitted beyond the workers; more -> RESOURCE_EXHAUSTED
    max_k: int = 1_000
    poll_seconds: float = 1.0  # index version polling; 0 = never reload
    drain_seconds: float = 10.0  # grace for in-flight requests on SIGTERM
    # On SIGTERM, report NOT_SERVING but keep answering this long before refusing new requests,
    # so load balancers / k8s endpoints stop routing here first (k8s: < terminationGracePeriod).
    drain_delay_seconds: float = 0.0
    search_params: dict | None = None  # passed to searcher.search(params=...), e.g. nprobe
    embed_batch: int = 32  # dynamic batching of concurrent embeddings (1 = none)
    embed_threads: int = 1  # batches in flight at once (1 = largest batches, least CPU per query)
    # FAISS OpenMP threads per search. Requests already run in parallel on the workers; more
    # OpenMP threads per single-query search only spin against them (0 = FAISS's default).
    search_threads: int = 1
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # set = require client certificates (mutual TLS)
    model_tls_ca: str | None = None  # CA of a TLS model server


class InvalidRequest(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelIndexMismatch(ValueError):
    """The query tower and the index were not built from the same model / schema."""


@dataclasses.dataclass(frozen=True)
class Pair:
    encoder: object  # embedder.LocalEncoder | embedder.RemoteEncoder
    searcher: object  # index searcher (contracts section 5)
    index_version: int
    index_path: str
    backend: str

    @property
    def model_version(self) -> int:
        return self.encoder.info.version


@dataclasses.dataclass(frozen=True)
class EnsembleCall:
    """What an ensemble gets: the serving pair, the request's tower inputs and search options."""
    pair: Pair
    inputs: dict  # tower inputs for one query, as from embedder.build_inputs
    k: int
    filter: str | None
    radius: float | None
    timeout: float | None  # seconds left before the request's deadline


@dataclasses.dataclass(frozen=True)
class EnsembleResult:
    doc_ids: Sequence[str]
    scores: Sequence[float]
    scanned: int = 0


# name -> callable(EnsembleCall) -> EnsembleResult; filled by experiments/ensembles.py (issue 7).
ensembles: dict[str, Callable[[EnsembleCall], EnsembleResult]] = {}


# ---------------------------------------------------------------------------------------------
# Request validation


def validate(request, *, max_k: int, backends: Sequence[str],
             ensemble_names: Sequence[str], parse_filter: Callable[[str], object] | None = None
             ) -> dict:
    """Tower feature values of a request, or InvalidRequest naming the offending field."""
    query = request.query
    if len(query) > features.MAX_TEXT_CHARS:
        raise InvalidRequest("query", f"{len(query)} characters, limit {features.MAX_TEXT_CHARS}")
    values: dict = {TEXT_INPUT: query}
    searcher = request.searcher
    has_searcher = False
    for field, name in SEARCHER_INPUTS.items():
        value = getattr(searcher, field)
        if features.BY_NAME[name].kind == features.MULTI:
            value = list(value)
            for i, v in enumerate(value):
                if len(v) > MAX_FIELD_CHARS:
                    raise InvalidRequest(f"searcher.{field}[{i}]",
                                         f"{len(v)} characters, limit {MAX_FIELD_CHARS}")
        elif len(value) > MAX_FIELD_CHARS:
            raise InvalidRequest(f"searcher.{field}",
                                 f"{len(value)} characters, limit {MAX_FIELD_CHARS}")
        given = any(v.strip() for v in value) if isinstance(value, list) else bool(value.strip())
        has_searcher = has_searcher or given
        values[name] = value
    if not query.strip() and not has_searcher:
        # Without text a request is recommendation-style and needs searcher features.
        raise InvalidRequest("query", "empty and no searcher features given")
    if request.k <= 0:
        raise InvalidRequest("k", f"must be >= 1, got {request.k}")
    if request.k > max_k:
        raise InvalidRequest("k", f"{request.k} is above the limit {max_k}")
    if len(request.filter) > MAX_FILTER_CHARS:
        raise InvalidRequest("filter",
                             f"{len(request.filter)} characters, limit {MAX_FILTER_CHARS}")
    if request.filter and parse_filter is not None:
        try:  # syntax is checked before any embedding work is spent on the request
            parse_filter(request.filter)
        except ValueError as e:
            raise InvalidRequest("filter", str(e)) from None
    if request.HasField("radius") and not math.isfinite(request.radius):
        raise InvalidRequest("radius", f"must be finite, got {request.radius}")
    if request.backend and request.backend not in backends:
        raise InvalidRequest("backend",
                             f"unknown backend {request.backend!r}; served: {list(backends)}")
    if request.ensemble and request.ensemble not in ensemble_names:
        raise InvalidRequest("ensemble", f"unknown ensemble {request.ensemble!r}; "
                                         f"registered: {sorted(ensemble_names)}")
    return values


def _filter_parser():
    """index.filters' parser and error type (the index owns the filter language)."""
    from index.filters import FilterSyntaxError, parse

    return parse, (FilterSyntaxError,)


# ---------------------------------------------------------------------------------------------
# Pair loading and reloading


def index_versions(base: Path) -> list[int]:
    """Complete index versions under INDEX_BASE (a version dir is renamed into place whole)."""
    from index.persistence import versions

    return versions(base)


def check_pair(model: embedder.ModelInfo, manifest: dict, index_path: str) -> None:
    problems = []
    if int(manifest.get("dimension", -1)) != model.dimension:
        problems.append(f"dimension {model.dimension} (model) != "
                        f"{manifest.get('dimension')} (index)")
    if model.schema_hash is not None and manifest.get("schema_hash") != model.schema_hash:
        problems.append(f"schema_hash {model.schema_hash} (model) != "
                        f"{manifest.get('schema_hash')} (index)")
    if problems:
        raise ModelIndexMismatch(f"query tower {model.source} does not match index {index_path}: "
                                 + "; ".join(problems))


class PairManager:
    """Holds the serving pair and swaps in newer index versions with their model."""

    def __init__(self, index: str, source, *, on_change: Callable[[Pair], None],
                 on_reload: Callable[[str], None] = lambda result: None):
        self.index = Path(index)
        self.source = source
        from index.persistence import MANIFEST

        self.fixed = (self.index / MANIFEST).exists()  # a version dir, not a base
        self.pair: Pair | None = None
        self.waiting_for = "index"  # what readiness waits for, for UNAVAILABLE messages
        self._on_change = on_change
        self._on_reload = on_reload
        self._refused: dict[int, str] = {}  # index version -> reason (not retried)
        self._waiting: set = set()  # index versions already reported as waiting for a model
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _load(self, version: int | None) -> Pair:
        import index as index_pkg

        path = self.index if version is None else self.index / str(version)
        searcher = index_pkg.open_index(str(path))
        manifest = dict(searcher.manifest)
        model_version = manifest.get("model_version")
        encoder = self.source.open(int(model_version) if model_version is not None else None)
        check_pair(encoder.info, manifest, str(path))
        # Warm up before the pair takes traffic: the first call of a loaded SavedModel traces
        # and allocates (tens of ms), which must not land on a request.
        encoder.embed(embedder.build_inputs([{}]), timeout=30.0)
        if version is None:
            version = int(manifest.get("version", path.name if path.name.isdigit() else 0))
        return Pair(encoder, searcher, version, str(path), str(manifest.get("backend", "")))

    def _swap(self, pair: Pair) -> None:
        old, self.pair = self.pair, pair
        self.waiting_for = ""
        self.source.release({pair.model_version})
        log.info("serving pair", extra={"index_version": pair.index_version,
                                        "model_version": pair.model_version,
                                        "index_path": pair.index_path, "backend": pair.backend,
                                        "previous": None if old is None else
                                        [old.index_version, old.model_version]})
        self._on_change(pair)

    def poll_once(self, *, at_start: bool = False) -> str:
        """Loads the newest index version if it is new; returns what happened.

        A mismatch raises at start and is refused (logged, old pair kept) afterwards; a model
        version the index needs that is not available yet is retried on the next poll."""
        if self.fixed:
            if self.pair is not None:
                return "current"
            target = None
        else:
            versions = index_versions(self.index)
            if not versions:
                self.waiting_for = f"an index version under {self.index}"
                return "no-index"
            target = versions[-1]
            if self.pair is not None and target <= self.pair.index_version:
                return "current"
            if target in self._refused:
                return "refused"
        try:
            pair = self._load(target)
        except embedder.ModelUnavailable as e:
            self.waiting_for = str(e)
            if target not in self._waiting:  # once per version, not once per poll
                self._waiting.add(target)
                log.warning("index waits for its model",
                            extra={"index_version": target, "reason": str(e)})
                self._on_reload("waiting")
            return "waiting"
        except (ModelIndexMismatch, ValueError, OSError) as e:
            if at_start or target is None:
                raise
            self._refused[target] = str(e)
            log.error("refused new index version; previous pair keeps serving",
                      extra={"index_version": target, "reason": str(e)})
            self._on_reload("refused")
            return "refused"
        self._swap(pair)
        self._on_reload("ok")
        return "loaded"

    def start_polling(self, every: float) -> None:
        if self.fixed or every <= 0:
            return

        def loop():
            while not self._stop.wait(every):
                try:
                    self.poll_once()
                except Exception:  # a poll must never kill the poller
                    log.exception("index poll failed")

        self._thread = threading.Thread(target=loop, name="index-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


# ---------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    def __init__(self, registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("ebr_retrieval_requests_total", "Retrieve requests by status code",
                                ["code"], registry=r)
        self.errors = Counter("ebr_retrieval_errors_total", "Failed Retrieve requests by code",
                              ["code"], registry=r)
        self.latency = Histogram("ebr_retrieval_latency_seconds", "Retrieve latency by stage",
                                 ["stage"], registry=r,
                                 buckets=(.0005, .001, .002, .003, .005, .0075, .01, .015, .025,
                                          .05, .1, .25, .5, 1, 2.5, 5))
        self.scanned = Histogram("ebr_retrieval_documents_scanned", "Documents scored per query",
                                 registry=r, buckets=tuple(4 ** i for i in range(2, 12)))
        self.in_flight = Gauge("ebr_retrieval_in_flight", "Retrieve requests executing", registry=r)
        self.ready = Gauge("ebr_retrieval_ready", "1 when a model/index pair is serving",
                           registry=r)
        self.model_version = Gauge("ebr_retrieval_model_version", "Serving query tower version",
                                   registry=r)
        self.index_version = Gauge("ebr_retrieval_index_version", "Serving index version",
                                   registry=r)
        self.embed_batch = Histogram("ebr_retrieval_embed_batch_size",
                                     "Queries per query-tower call (dynamic batching)", registry=r,
                                     buckets=(1, 2, 4, 8, 16, 32, 64))
        self.reloads = Counter("ebr_retrieval_reloads_total", "Index reload attempts by result",
                               ["result"], registry=r)


# ---------------------------------------------------------------------------------------------
# The servicer


class _Undecodable:
    """Stands in for a request whose bytes are not a RetrieveRequest (answered INVALID_ARGUMENT
    rather than gRPC's default INTERNAL)."""

    def __init__(self, error: str):
        self.error = error


def _deserialize(data: bytes):
    try:
        return retrieval_pb2.RetrieveRequest.FromString(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        return _Undecodable(str(e) or type(e).__name__)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class RetrievalServicer:
    def __init__(self, manager: PairManager, metrics: Metrics, config: ServeConfig,
                 ensemble_registry: dict):
        self.manager = manager
        self.metrics = metrics
        self.config = config
        self.ensembles = ensemble_registry
        self._parse_filter, self._filter_errors = _filter_parser()
        self._params = config.search_params or None
        self.batcher = (embedder.EmbedBatcher(config.embed_batch, config.embed_threads,
                                              on_batch=metrics.embed_batch.observe)
                        if config.embed_batch > 1 else None)

    def _remaining(self, context) -> float | None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        return remaining

    def Retrieve(self, request, context):
        start = time.perf_counter()
        m = self.metrics
        m.in_flight.inc()
        try:
            response = self._retrieve(request, context, start)
            code = grpc.StatusCode.OK
        except _Abort as e:
            code, details = e.code, e.details
        except Exception as e:  # a bug answers INTERNAL and the server keeps serving
            log.exception("Retrieve failed")
            code, details = grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"
        finally:
            m.in_flight.dec()
        elapsed = time.perf_counter() - start
        m.latency.labels("total").observe(elapsed)
        m.requests.labels(code.name).inc()
        if code is grpc.StatusCode.OK:
            return response
        m.errors.labels(code.name).inc()
        if code is not grpc.StatusCode.INVALID_ARGUMENT:
            log.warning("Retrieve error", extra={"code": code.name, "details": details,
                                                 "micros": int(elapsed * 1e6)})
        context.abort(code, details)

    def _retrieve(self, request, context, start: float):
        if isinstance(request, _Undecodable):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"request: not a RetrieveRequest ({request.error})")
        pair = self.manager.pair  # one read: the whole request uses this pair
        if pair is None:
            raise _Abort(grpc.StatusCode.UNAVAILABLE,
                         f"not ready: waiting for {self.manager.waiting_for}")
        try:
            values = validate(request, max_k=self.config.max_k, backends=[pair.backend],
                              ensemble_names=list(self.ensembles),
                              parse_filter=self._parse_filter)
        except InvalidRequest as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        k = request.k
        filt = request.filter or None
        radius = request.radius if request.HasField("radius") else None
        t_valid = time.perf_counter()
        stages = [("validate", t_valid - start)]
        remaining = self._remaining(context)
        set_search_threads(self.config.search_threads)
        if request.ensemble:
            inputs = embedder.build_inputs([values])
            try:
                result = self._call(lambda: self.ensembles[request.ensemble](
                    EnsembleCall(pair, inputs, k, filt, radius, remaining)))
            except ValueError as e:  # an ensemble's refusal of this request (e.g. k > its n)
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"ensemble: {e}") from None
            t_done = time.perf_counter()
            stages.append(("ensemble", t_done - t_valid))
            doc_ids, scores = list(result.doc_ids), list(result.scores)
            scanned = int(result.scanned)
        else:
            if self.batcher is not None:
                vector = self._call(lambda: self.batcher.embed(pair.encoder, values, remaining))
            else:
                vector = self._call(lambda: pair.encoder.embed(embedder.build_inputs([values]),
                                                               timeout=remaining))
            t_embed = time.perf_counter()
            stages.append(("embed", t_embed - t_valid))
            self._remaining(context)
            result = self._call(lambda: pair.searcher.search(
                vector, k, filter=filt, radius=radius, params=self._params))
            t_done = time.perf_counter()
            stages.append(("search", t_done - t_embed))
            doc_ids = list(result.doc_ids[0])
            scores = np.asarray(result.scores[0], dtype=np.float32).tolist()
            scanned = int(result.scanned[0])
        stages.append(("total", t_done - start))
        for stage, seconds in stages[:-1]:
            self.metrics.latency.labels(stage).observe(seconds)
        self.metrics.scanned.observe(scanned)
        debug = retrieval_pb2.RetrieveDebug(
            latency=[retrieval_pb2.StageLatency(stage=s, micros=int(sec * 1e6))
                     for s, sec in stages],
            documents_scanned=scanned, model_version=pair.model_version,
            index_version=pair.index_version, backend=pair.backend)
        return retrieval_pb2.RetrieveResponse(doc_ids=doc_ids, scores=scores, debug=debug)

    def _call(self, fn):
        """Runs one stage, mapping its failures onto gRPC status codes."""
        try:
            return fn()
        except grpc.RpcError as e:  # from the model server
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            details = e.details() if hasattr(e, "details") else str(e)
            if code is grpc.StatusCode.NOT_FOUND:
                # The model server dropped the version our index is pinned to (TF Serving keeps
                # only the newest unless its version policy keeps two): retryable, not a bug.
                raise _Abort(grpc.StatusCode.UNAVAILABLE,
                             f"model server no longer serves the pinned query tower version "
                             f"(serve the newest 2 versions): {details}") from None
            if code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.RESOURCE_EXHAUSTED):
                code = grpc.StatusCode.INTERNAL
            raise _Abort(code, f"model server: {details}") from None
        except self._filter_errors as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"filter: {e}") from None


# ---------------------------------------------------------------------------------------------
# The server


_thread_state = threading.local()


def set_search_threads(n: int) -> None:
    """FAISS OpenMP threads for searches started by the *calling* thread.

    OpenMP keeps the setting per thread, so each request worker sets it once for itself
    (setting it in the main thread would leave every worker at the default, all cores)."""
    if n <= 0 or getattr(_thread_state, "omp_threads", None) == n:
        return
    try:
        import faiss
    except ImportError:  # an index without FAISS backends needs no setting
        _thread_state.omp_threads = n
        return
    faiss.omp_set_num_threads(n)
    _thread_state.omp_threads = n


class RetrievalServer:
    """gRPC server + health + metrics + index poller. `start()` raises ModelIndexMismatch when
    the newest index does not fit its model; `stop(grace)` drains."""

    def __init__(self, config: ServeConfig, *, ensemble_registry: dict | None = None):
        self.config = config
        self.metrics = Metrics()
        self.source = embedder.open_source(config.model, config.model_address, config.model_name,
                                           config.model_tls_ca)
        self.manager = PairManager(config.index, self.source, on_change=self._on_change,
                                   on_reload=lambda r: self.metrics.reloads.labels(r).inc())
        self.health = health.HealthServicer()
        registry = ensembles if ensemble_registry is None else ensemble_registry
        self.servicer = RetrievalServicer(self.manager, self.metrics, config, registry)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.Server | None = None
        self._http = None
        self._stopped = threading.Event()
        self._draining = False

    def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def set_not_serving(self) -> None:
        """Readiness off (health NOT_SERVING) while still answering: the start of a drain."""
        self._draining = True
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.metrics.ready.set(0)

    def _on_change(self, pair: Pair) -> None:
        if self._draining:  # a reload during a drain must not flip readiness back on
            return
        self.metrics.model_version.set(pair.model_version)
        self.metrics.index_version.set(pair.index_version)
        self.metrics.ready.set(1)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def start(self) -> "RetrievalServer":
        cfg = self.config
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="retrieve"),
            maximum_concurrent_rpcs=cfg.workers + cfg.max_queue,
            # One process per port: a second server must fail to bind, not share the traffic.
            options=[("grpc.so_reuseport", 0)])
        handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Retrieve": grpc.unary_unary_rpc_method_handler(
                self.servicer.Retrieve, request_deserializer=_deserialize,
                response_serializer=retrieval_pb2.RetrieveResponse.SerializeToString)})
        server.add_generic_rpc_handlers((handler,))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert or cfg.tls_key:
            if not (cfg.tls_cert and cfg.tls_key):
                raise ValueError("TLS needs both --tls-cert and --tls-key")
            client_ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
            creds = grpc.ssl_server_credentials(
                [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
                root_certificates=client_ca, require_client_auth=client_ca is not None)
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot bind {address}")
        if cfg.metrics_port is not None:
            from prometheus_client import start_http_server

            self._http, _ = start_http_server(cfg.metrics_port, registry=self.metrics.registry)
            self.metrics_port = self._http.server_port
        server.start()
        self._server = server
        log.info("retrieval service listening", extra={"port": self.port,
                                                       "metrics_port": self.metrics_port,
                                                       "index": cfg.index,
                                                       "model": cfg.model_address or cfg.model})
        try:
            self.manager.poll_once(at_start=True)
        except Exception:
            self.stop(grace=0)
            raise
        self.manager.start_polling(cfg.poll_seconds)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stops taking requests, lets those in flight finish within `grace` seconds."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.metrics.ready.set(0)
        self.manager.stop()
        if self._server is not None:
            self._server.stop(self.config.drain_seconds if grace is None else grace).wait()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self.servicer.batcher is not None:
            self.servicer.batcher.close()
        self.source.close()
        log.info("retrieval service stopped")

    def wait(self) -> None:
        self._stopped.wait()


def serve(config: ServeConfig) -> int:
    """Runs until SIGTERM / SIGINT, then drains (the k8s termination path)."""
    server = RetrievalServer(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    print(json.dumps({"event": "listening", "port": server.port,
                      "metrics_port": server.metrics_port}), flush=True)
    stop.wait()
    log.info("draining", extra={"delay_seconds": config.drain_delay_seconds,
                                "grace_seconds": config.drain_seconds})
    server.set_not_serving()
    time.sleep(config.drain_delay_seconds)
    server.stop()
    return 0
