"""The retrieval service: `ebr.retrieval.v1.Retrieval/Retrieve` over gRPC.

End of the data flow (paper section 5, "serving"): a request's query text and searcher
features are embedded by the exported query tower (serving/embedder.py: TF Serving's
PredictionService or in-process), and the vector is searched in the ANN index built from the
document tower's embeddings (`index.open_index(...).search`, docs/contracts.md section 5),
with an optional boolean filter and radius.

A *pair* (query-tower version, index version) serves every request; the index manifest names
the model version its embeddings came from, and the service pins the model to that version. A
poller lists INDEX_BASE's committed versions (`ebr.artifacts.versions`, any URI: local or
gs://; a version counts once its `_COMMITTED` marker is written, docs/contracts.md "Commit
protocol"), loads a newer one with its model beside the serving pair, checks they agree
(`artifacts.check_compatible`: dimension, schema hash, model version) and swaps one reference:
requests in flight finish on the old pair, none is dropped. A mismatching pair is refused with
a clear error and the old pair keeps serving (at start the process refuses to come up); a
version that fails to load (corrupt file, storage error) is retried with capped exponential
backoff, and a storage error while listing is logged and skipped, the old pair serving on.
The query tower comes from `--model MODEL_DIR` (committed tower versions, loaded in-process by
`trainer.export.load_tower`) or from TF Serving at `--model-address`.

Throughput on 2 cores comes from batching, not threads: the server is grpc.aio on one event
loop thread, a request is a coroutine, and the RetrieveBatcher embeds *and* searches every
request queued while its previous batch ran in one tower call and one index search (per k,
filter, radius). A request thus costs no thread and no thread hand-off, and the CPU per request
falls as the load rises (bench/serving_bench.py measures it against the in-process baseline).

Operational surface: grpc.health.v1 (SERVING only while a pair is loaded), Prometheus metrics
on their own HTTP port, JSON logs, deadlines checked between stages and passed to the model
server, bounded concurrency (gRPC's `maximum_concurrent_rpcs` answers RESOURCE_EXHAUSTED instead
of queueing without bound), graceful drain on SIGTERM, optional TLS (and mutual TLS).

Ensembles (paper section 6: weighted concatenation, cascade) plug in through the `ensembles`
registry: `ensembles[name](EnsembleCall) -> EnsembleResult`; it is filled from
experiments/ensembles.py. A request naming an ensemble is answered by it instead of the pair.
"""
from __future__ import annotations

import dataclasses
import json
import asyncio
import logging
import math
import signal
import threading
import time
from concurrent import futures
from typing import Callable, Sequence

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from ebr import artifacts, features, storage
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
    # Paths are URIs (local or gs://); only committed versions count (docs/contracts.md).
    index: str  # INDEX_BASE (newest committed version, polled) or INDEX_BASE/VERSION (fixed)
    # MODEL_DIR (or MODEL_DIR/query_tower): the in-process query tower, or, with
    # model_address, where each served version's ebr_metadata.json is read from.
    model: str | None = None
    model_address: str | None = None  # host:port of TF Serving / `ebr serve model`
    model_name: str = "query_tower"
    host: str = "[::]"
    port: int = 8600  # 0 = any free port (tests)
    metrics_port: int | None = None  # None = no metrics endpoint, 0 = any free port
    # workers + max_queue requests are admitted at once (more -> RESOURCE_EXHAUSTED); `workers`
    # threads run the unbatched paths (embed_batch 1, ensembles), batches run on their own.
    workers: int = 8
    max_queue: int = 16
    max_k: int = 1_000
    poll_seconds: float = 1.0  # index version polling; 0 = never reload
    # A new index version that fails to load is retried after retry_seconds, doubling per
    # failure up to retry_max_seconds; the serving pair is kept meanwhile.
    retry_seconds: float = 1.0
    retry_max_seconds: float = 60.0
    drain_seconds: float = 10.0  # grace for in-flight requests on SIGTERM
    # On SIGTERM, report NOT_SERVING but keep answering this long before refusing new requests,
    # so load balancers / k8s endpoints stop routing here first (k8s: < terminationGracePeriod).
    drain_delay_seconds: float = 0.0
    search_params: dict | None = None  # passed to searcher.search(params=...), e.g. nprobe
    embed_batch: int = 32  # dynamic batching of concurrent requests, embed + search (1 = none)
    embed_threads: int = 1  # batches in flight at once (1 = largest batches, least CPU per query)
    # TensorFlow inter/intra-op threads (0 = TF default); applied in a fresh process only.
    tf_threads: int = 1
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


class ModelIndexMismatch(artifacts.ModelMismatch):
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


# name -> callable(EnsembleCall) -> EnsembleResult; filled by experiments/ensembles.py.
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


def tower_base(model: str, model_name: str = "query_tower") -> str:
    """`--model`: MODEL_DIR (-> MODEL_DIR/<model_name>) or MODEL_DIR/<tower> itself, any URI."""
    model = storage.normalize(model)
    return model if storage.basename(model) in artifacts.TOWERS else storage.join(model, model_name)


def open_model_source(config: "ServeConfig"):
    """Remote when an address is set (metadata from --model when given), else in-process."""
    base = tower_base(config.model, config.model_name) if config.model else None
    return embedder.open_source(base, config.model_address, config.model_name,
                                config.model_tls_ca)


def check_pair(model: embedder.ModelInfo, manifest: dict, index_path: str) -> None:
    """The query tower against the index manifest: same dimension and feature schema (and the
    model version the index's embeddings came from, when it names one)."""
    try:
        artifacts.check_compatible(
            f"query tower {model.source} and index {index_path}", manifest,
            schema_hash=model.schema_hash, dimension=model.dimension,
            model_version=model.version if manifest.get("model_version") is not None else None)
    except artifacts.ModelMismatch as e:
        raise ModelIndexMismatch(str(e)) from None


def _isdir(uri: str) -> bool:
    try:
        return storage.isdir(uri)
    except storage.StorageError:
        return True  # unreachable now: a numeric last component names a version all the same


@dataclasses.dataclass
class _Failure:
    """A new index version whose load failed: retried with exponential backoff."""
    attempts: int
    retry_at: float  # time.monotonic()
    reason: str


class PairManager:
    """Holds the serving pair and swaps in newer index versions with their model.

    INDEX_BASE (any URI) is polled through `artifacts.versions`: committed versions only. A
    new version that fails to load (corrupt or missing file, storage error) is retried with
    exponential backoff (`retry_seconds` doubling up to `retry_max_seconds`) while the current
    pair keeps serving; one that does not match its model is refused for good. A storage error
    while listing is logged and the poll is skipped."""

    def __init__(self, index: str, source, *, on_change: Callable[[Pair], None],
                 on_reload: Callable[[str], None] = lambda result: None,
                 retry_seconds: float = 1.0, retry_max_seconds: float = 60.0):
        self.index = storage.normalize(index)
        self.source = source
        # INDEX_BASE/VERSION names one fixed version (artifacts.resolve's rule); else a base.
        self.fixed = artifacts.is_version(storage.basename(self.index)) and _isdir(self.index)
        self.pair: Pair | None = None
        self.waiting_for = "index"  # what readiness waits for, for UNAVAILABLE messages
        self.retry_seconds = max(float(retry_seconds), 0.01)
        self.retry_max_seconds = max(float(retry_max_seconds), self.retry_seconds)
        self._on_change = on_change
        self._on_reload = on_reload
        self._refused: dict[int, str] = {}  # index version -> reason (not retried)
        self._failed: dict[int, _Failure] = {}  # index version -> backoff state
        self._waiting: set = set()  # index versions already reported as waiting for a model
        self._list_error: str | None = None  # the last listing error (logged once per streak)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _load(self, version: int | None) -> Pair:
        import index as index_pkg

        path = self.index if version is None else storage.join(self.index, version)
        searcher = index_pkg.open_index(path)
        manifest = dict(searcher.manifest)
        model_version = manifest.get("model_version")
        encoder = self.source.open(int(model_version) if model_version is not None else None)
        check_pair(encoder.info, manifest, searcher.path)
        # Warm up before the pair takes traffic: the first call of a loaded SavedModel traces
        # and allocates (tens of ms), which must not land on a request.
        encoder.embed(embedder.build_inputs([{}]), timeout=30.0)
        if version is None:
            version = artifacts.version_of(searcher.path)
        return Pair(encoder, searcher, version, searcher.path, str(manifest.get("backend", "")))

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

    def _list(self) -> list[int] | None:
        """Committed index versions, or None after a (logged) storage error."""
        try:
            versions = artifacts.versions(self.index)
        except Exception as e:  # noqa: BLE001 - StorageError mostly; never stops the poller
            if self._list_error != str(e):  # once per streak of the same error, not per poll
                log.warning("cannot list index versions; the serving pair is kept",
                            extra={"index": self.index, "reason": str(e)})
            self._list_error = str(e)
            if self.pair is None:
                self.waiting_for = f"an index version under {self.index} ({e})"
            self._on_reload("list-error")
            return None
        if self._list_error is not None:
            log.info("index versions listed again", extra={"index": self.index})
            self._list_error = None
        return versions

    def poll_once(self, *, at_start: bool = False) -> str:
        """Loads the newest index version if it is new; returns what happened.

        A mismatch raises at start and is refused (logged, old pair kept) afterwards; a model
        version the index needs that is not available yet is retried on the next poll; any
        other failure to load a new version (at start too: the service comes up NOT_SERVING)
        is retried with backoff. A fixed INDEX_BASE/VERSION that fails at start raises."""
        if self.fixed:
            if self.pair is not None:
                return "current"
            target = None
        else:
            versions = self._list()
            if versions is None:
                return "list-error"
            if not versions:
                self.waiting_for = f"an index version under {self.index}"
                return "no-index"
            target = versions[-1]
            if self.pair is not None and target <= self.pair.index_version:
                return "current"
            if target in self._refused:
                return "refused"
            failure = self._failed.get(target)
            if failure is not None and time.monotonic() < failure.retry_at:
                return "backoff"
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
        except (ModelIndexMismatch, artifacts.ModelMismatch) as e:
            if at_start or target is None:
                raise
            self._refused[target] = str(e)
            log.error("refused new index version; previous pair keeps serving",
                      extra={"index_version": target, "reason": str(e)})
            self._on_reload("refused")
            return "refused"
        except Exception as e:  # noqa: BLE001 - corrupt files, storage errors, reader failures
            if target is None:  # a fixed INDEX_BASE/VERSION that cannot load: nothing to retry
                raise
            return self._failed_load(target, e)
        self._failed.pop(target, None)
        self._swap(pair)
        self._on_reload("ok")
        return "loaded"

    def _failed_load(self, target: int, e: Exception) -> str:
        previous = self._failed.get(target)
        attempts = previous.attempts + 1 if previous else 1
        delay = min(self.retry_max_seconds, self.retry_seconds * 2 ** (attempts - 1))
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        self._failed[target] = _Failure(attempts, time.monotonic() + delay, reason)
        if self.pair is None:
            self.waiting_for = f"index version {target} to load ({reason})"
        log.error("new index version failed to load; previous pair keeps serving",
                  extra={"index_version": target, "attempt": attempts,
                         "retry_in_seconds": round(delay, 3), "reason": reason,
                         "error": type(e).__name__})
        self._on_reload("failed")
        return "failed"

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
# Dynamic batching of whole retrievals


class DeadlineExpired(Exception):
    """A batched request's deadline passed while its batch ran (answered DEADLINE_EXCEEDED)."""


@dataclasses.dataclass(frozen=True)
class _Job:
    pair: Pair
    values: dict
    k: int
    filter: str | None
    radius: float | None
    deadline: float | None  # time.monotonic()
    enqueued: float  # time.perf_counter()
    future: asyncio.Future


@dataclasses.dataclass(frozen=True)
class BatchedResult:
    doc_ids: list
    scores: list
    scanned: int
    queue_seconds: float  # waiting for a batch slot (the previous batch was running)
    embed_seconds: float  # the batch's tower call
    search_seconds: float  # the batch's index search for this request's (k, filter, radius)


def run_batch(jobs: Sequence[_Job], params: dict | None,
              on_batch: Callable[[int], None] | None = None) -> list:
    """Embeds and searches a batch of requests; one outcome per job (a BatchedResult or the
    exception that job gets). Blocking: runs on a batch thread, never on the event loop.

    One tower call per encoder (a pair swap can put two in a batch), then one index search
    per (searcher, k, filter, radius) group: a FAISS search of B queries costs about half of
    B single searches (one coarse-quantizer pass, one SWIG crossing, one id mapping) and a
    tower call of 8 about a fifth of 8 calls. Each request gets exactly what searching it
    alone would give: same k, filter, radius and parameters; rows are independent."""
    t0 = time.perf_counter()
    outcomes: list = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    by_encoder: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        by_encoder.setdefault(id(job.pair.encoder), []).append(i)
    vectors: dict[int, np.ndarray] = {}
    for idx in by_encoder.values():
        if on_batch is not None:
            on_batch(len(idx))
        deadlines = [jobs[i].deadline for i in idx if jobs[i].deadline is not None]
        timeout = max(0.001, min(deadlines) - time.monotonic()) if deadlines else None
        try:
            rows = jobs[idx[0]].pair.encoder.embed(
                embedder.build_inputs([jobs[i].values for i in idx]), timeout=timeout)
        except Exception as e:  # every waiter of this encoder gets it; the rest go on
            for i in idx:
                outcomes[i] = e
            continue
        vectors.update(zip(idx, rows))
    t1 = time.perf_counter()
    now = time.monotonic()
    for i, job in enumerate(jobs):
        if i not in vectors:
            continue
        if job.deadline is not None and job.deadline <= now:  # no search for an expired request
            outcomes[i] = DeadlineExpired("deadline exceeded")
            continue
        key = (id(job.pair.searcher), job.k, job.filter, job.radius)
        groups.setdefault(key, []).append(i)
    for idx in groups.values():
        job = jobs[idx[0]]
        ts = time.perf_counter()
        try:
            result = job.pair.searcher.search(np.stack([vectors[i] for i in idx]), job.k,
                                              filter=job.filter, radius=job.radius,
                                              params=params)
        except Exception as e:
            for i in idx:
                outcomes[i] = e
            continue
        search_seconds = time.perf_counter() - ts
        for j, i in enumerate(idx):
            outcomes[i] = BatchedResult(
                list(result.doc_ids[j]), np.asarray(result.scores[j], np.float32).tolist(),
                int(result.scanned[j]), t0 - jobs[i].enqueued, t1 - t0, search_seconds)
    return outcomes


class RetrieveBatcher:
    """Dynamic batching on the event loop (TF Serving's batching idea, applied to the whole
    retrieval): `threads` batch tasks each take every request queued while their previous
    batch ran and hand the batch to their own thread (run_batch). There is no batching timeout:
    an idle server adds no wait, and under load the batch grows with the queue, so the CPU per
    request falls as the load rises. Requests are plain coroutines waiting on a future, so many
    can be in flight without a thread each (bounded by the server's maximum_concurrent_rpcs)."""

    def __init__(self, max_batch: int = 32, threads: int = 1, *, params: dict | None = None,
                 search_threads: int = 1, on_batch: Callable[[int], None] | None = None):
        self.max_batch = max(1, max_batch)
        self._params = params
        self._on_batch = on_batch
        self._pool = futures.ThreadPoolExecutor(
            max(1, threads), thread_name_prefix="retrieve-batch",
            initializer=set_search_threads, initargs=(search_threads,))
        self._n_tasks = max(1, threads)
        self._queue: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        """Starts the batch tasks; call on the event loop that will call `retrieve`."""
        self._queue = asyncio.Queue()
        self._tasks = [asyncio.get_running_loop().create_task(self._run())
                       for _ in range(self._n_tasks)]

    async def retrieve(self, pair: Pair, values: dict, k: int, filt: str | None,
                       radius: float | None, timeout: float | None = None) -> BatchedResult:
        """One request's results; raises what the encoder or the index raised for it, or
        DeadlineExpired."""
        future = asyncio.get_running_loop().create_future()
        deadline = None if timeout is None else time.monotonic() + timeout
        self._queue.put_nowait(_Job(pair, values, k, filt, radius, deadline,
                                    time.perf_counter(), future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [job for job in batch if not job.future.done()]  # cancelled by the client
            if not batch:
                continue
            try:
                outcomes = await loop.run_in_executor(self._pool, run_batch, batch,
                                                      self._params, self._on_batch)
            except Exception as e:  # a bug in run_batch: its waiters get it, the task lives on
                outcomes = [e] * len(batch)
            for job, outcome in zip(batch, outcomes):
                if job.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pool.shutdown(wait=False)


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
    """Retrieve on a grpc.aio server: validation on the event loop, the work either in the
    RetrieveBatcher (embed_batch > 1) or, unbatched and for ensembles, on a worker thread."""

    def __init__(self, manager: PairManager, metrics: Metrics, config: ServeConfig,
                 ensemble_registry: dict):
        self.manager = manager
        self.metrics = metrics
        self.config = config
        self.ensembles = ensemble_registry
        self._parse_filter, self._filter_errors = _filter_parser()
        self._params = config.search_params or None
        self._pool = futures.ThreadPoolExecutor(max(1, config.workers),
                                                thread_name_prefix="retrieve")
        self.batcher = (RetrieveBatcher(config.embed_batch, config.embed_threads,
                                        params=self._params, search_threads=config.search_threads,
                                        on_batch=metrics.embed_batch.observe)
                        if config.embed_batch > 1 else None)

    def start(self) -> None:
        """On the server's event loop."""
        if self.batcher is not None:
            self.batcher.start()

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        self._pool.shutdown(wait=False)

    def _remaining(self, context) -> float | None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        return remaining

    async def Retrieve(self, request, context):
        start = time.perf_counter()
        m = self.metrics
        m.in_flight.inc()
        try:
            response = await self._retrieve(request, context, start)
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
        await context.abort(code, details)

    async def _blocking(self, fn):
        """fn() on a worker thread (the event loop must not block), errors mapped to statuses."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, fn)

    async def _retrieve(self, request, context, start: float):
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
        if request.ensemble:
            inputs = embedder.build_inputs([values])
            try:
                result = await self._blocking(lambda: self.ensembles[request.ensemble](
                    EnsembleCall(pair, inputs, k, filt, radius, remaining)))
            except ValueError as e:  # an ensemble's refusal of this request (e.g. k > its n)
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"ensemble: {e}") from None
            t_done = time.perf_counter()
            stages.append(("ensemble", t_done - t_valid))
            doc_ids, scores = list(result.doc_ids), list(result.scores)
            scanned = int(result.scanned)
        elif self.batcher is not None:
            try:
                r = await self.batcher.retrieve(pair, values, k, filt, radius, remaining)
            except Exception as e:
                raise self._mapped(e) from None
            t_done = time.perf_counter()
            stages += [("queue", r.queue_seconds), ("embed", r.embed_seconds),
                       ("search", r.search_seconds)]
            doc_ids, scores, scanned = r.doc_ids, r.scores, r.scanned
        else:
            r = await self._blocking(lambda: self._embed_and_search(
                pair, values, k, filt, radius, remaining, context))
            t_done = time.perf_counter()
            stages += [("embed", r.embed_seconds), ("search", r.search_seconds)]
            doc_ids, scores, scanned = r.doc_ids, r.scores, r.scanned
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

    def _embed_and_search(self, pair: Pair, values: dict, k: int, filt: str | None,
                          radius: float | None, remaining: float | None,
                          context) -> BatchedResult:
        """The unbatched path (embed_batch 1), on a worker thread."""
        set_search_threads(self.config.search_threads)
        t0 = time.perf_counter()
        vector = pair.encoder.embed(embedder.build_inputs([values]), timeout=remaining)
        t1 = time.perf_counter()
        self._remaining(context)
        result = pair.searcher.search(vector, k, filter=filt, radius=radius, params=self._params)
        return BatchedResult(list(result.doc_ids[0]),
                             np.asarray(result.scores[0], dtype=np.float32).tolist(),
                             int(result.scanned[0]), 0.0, t1 - t0, time.perf_counter() - t1)

    def _call(self, fn):
        """Runs one stage, mapping its failures onto gRPC status codes."""
        try:
            return fn()
        except Exception as e:
            raise self._mapped(e) from None

    def _mapped(self, e: Exception) -> Exception:
        """The _Abort a stage's failure answers with (other errors are returned unchanged:
        ValueError reaches the ensemble handler, anything else answers INTERNAL)."""
        if isinstance(e, _Abort):
            return e
        if isinstance(e, grpc.RpcError):  # from the model server
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            details = e.details() if hasattr(e, "details") else str(e)
            if code is grpc.StatusCode.NOT_FOUND:
                # The model server dropped the version our index is pinned to (TF Serving keeps
                # only the newest unless its version policy keeps two): retryable, not a bug.
                return _Abort(grpc.StatusCode.UNAVAILABLE,
                              f"model server no longer serves the pinned query tower version "
                              f"(serve the newest 2 versions): {details}")
            if code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.RESOURCE_EXHAUSTED):
                code = grpc.StatusCode.INTERNAL
            return _Abort(code, f"model server: {details}")
        if isinstance(e, self._filter_errors):
            return _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"filter: {e}")
        if isinstance(e, DeadlineExpired):
            return _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        return e


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
    """grpc.aio server + health + metrics + index poller, with a blocking API: `start()` raises
    ModelIndexMismatch when the newest index does not fit its model; `stop(grace)` drains.

    The server runs on its own event loop thread: a request costs no thread of its own and
    no hand-off between threads until its batch runs (about a fifth less CPU per request than
    a thread per request on 2 cores, bench/serving_bench.py)."""

    def __init__(self, config: ServeConfig, *, ensemble_registry: dict | None = None):
        self.config = config
        self.metrics = Metrics()
        self.source = open_model_source(config)
        self.manager = PairManager(config.index, self.source, on_change=self._on_change,
                                   on_reload=lambda r: self.metrics.reloads.labels(r).inc(),
                                   retry_seconds=config.retry_seconds,
                                   retry_max_seconds=config.retry_max_seconds)
        self.health = health_aio.HealthServicer()
        registry = ensembles if ensemble_registry is None else ensemble_registry
        self.servicer = RetrievalServicer(self.manager, self.metrics, config, registry)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._http = None
        self._stopped = threading.Event()
        self._draining = False

    def _run(self, coro, timeout: float | None = None):
        """Runs a coroutine on the server's loop from another thread and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _set_health(self, status) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        for name in ("", SERVICE_NAME):
            self._run(self.health.set(name, status), timeout=10)

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

    async def _start_server(self) -> None:
        cfg = self.config
        server = grpc.aio.server(
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
            client_ca = storage.read_bytes(cfg.tls_client_ca) if cfg.tls_client_ca else None
            creds = grpc.ssl_server_credentials(
                [(storage.read_bytes(cfg.tls_key), storage.read_bytes(cfg.tls_cert))],
                root_certificates=client_ca, require_client_auth=client_ca is not None)
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
        if not port:
            raise OSError(f"cannot bind {address}")
        self.servicer.start()
        await server.start()
        self._server, self.port = server, port

    def start(self) -> "RetrievalServer":
        cfg = self.config
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever,
                                             name="retrieval-loop", daemon=True)
        self._loop_thread.start()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._run(self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING))
        try:
            self._run(self._start_server())
        except BaseException:
            self._close_loop()
            raise
        if cfg.metrics_port is not None:
            from prometheus_client import start_http_server

            self._http, _ = start_http_server(cfg.metrics_port, registry=self.metrics.registry)
            self.metrics_port = self._http.server_port
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

    def _close_loop(self) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._loop_thread is not None:
            self._loop_thread.join(timeout=10)
        self._loop.close()

    def stop(self, grace: float | None = None) -> None:
        """Stops taking requests, lets those in flight finish within `grace` seconds."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.metrics.ready.set(0)
        self.manager.stop()
        if self._server is not None:
            self._run(self._server.stop(self.config.drain_seconds if grace is None else grace))
        if self._loop is not None and not self._loop.is_closed():
            self._run(self.servicer.close())
        self._close_loop()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        self.source.close()
        log.info("retrieval service stopped")

    def wait(self) -> None:
        self._stopped.wait()


_tf_threads_set: list[int] = []


def set_tf_threads(n: int) -> None:
    """TensorFlow's inter- and intra-op thread pools at `n` threads (0 = TF's default).

    The query tower is hundreds of tiny ops: on 2 cores, spreading one small batch over TF's
    pools only adds thread hand-offs next to the batch and gRPC threads (bench: one thread
    each is ~15% less CPU per request). TF takes this only before its runtime starts, i.e. in
    a fresh process, so `serve` (the `ebr serve retrieval` path) sets it, not RetrievalServer:
    an in-process server (tests, notebooks) leaves its host process's TF as it is."""
    if n <= 0 or _tf_threads_set:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_inter_op_parallelism_threads(n)
        tf.config.threading.set_intra_op_parallelism_threads(n)
    except RuntimeError:  # the TF runtime already started in this process
        log.info("TensorFlow threads already fixed; --tf-threads not applied",
                 extra={"tf_threads": n})
    _tf_threads_set.append(n)


def serve(config: ServeConfig, ensemble_registry: dict | None = None) -> int:
    """Runs until SIGTERM / SIGINT, then drains (the k8s termination path)."""
    set_tf_threads(config.tf_threads)  # before the query tower loads (a fresh process)
    server = RetrievalServer(config, ensemble_registry=ensemble_registry)
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
