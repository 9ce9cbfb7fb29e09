"""The Retrieve RPC: a request validated, embedded and searched (or handed to an ensemble),
answered with document ids, scores and per-stage latencies.

Place in the data flow: the end of it (paper section 5, "serving"). A request's query text and
searcher features are checked (`serving.retrieval.validation`), embedded by the serving pair's
query tower (`serving.retrieval.embedder`: TF Serving's PredictionService or in-process) and
searched in the pair's ANN index (`index.open_index(...).search`, docs/contracts.md section 5)
with an optional boolean filter and radius: batched with concurrent requests
(`serving.retrieval.batching`) or, with batching off, on a worker thread. A request naming an
ensemble is answered by the server's ensemble registry (`serving.retrieval.ensembles`) instead.
Deadlines are checked between stages and passed to the model server; each stage's failure maps
onto a gRPC status code.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent import futures

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from serving.retrieval import embedder, retrieval_pb2
from serving.retrieval.batching import BatchedResult, DeadlineExpired, RetrieveBatcher, plan_of
from serving.retrieval.config import ServeConfig
from serving.retrieval.ensembles import EnsembleCall, Registry
from serving.retrieval.metrics import Metrics
from serving.retrieval.pairs import Pair, PairManager
from serving.retrieval.threads import set_search_threads
from serving.retrieval.validation import InvalidRequest, filter_parser, validate

log = logging.getLogger(__name__)


class _Undecodable:
    """Stands in for a request whose bytes are not a RetrieveRequest (answered INVALID_ARGUMENT
    rather than gRPC's default INTERNAL)."""

    def __init__(self, error: str):
        self.error = error


def deserialize_request(data: bytes):
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
                 ensemble_registry: Registry):
        self.manager = manager
        self.metrics = metrics
        self.config = config
        self.ensembles = ensemble_registry
        self._parse_filter, self._filter_errors = filter_parser()
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
            scanned, plan, probes = int(result.scanned), "", 0  # several searches, no one plan
        elif self.batcher is not None:
            try:
                r = await self.batcher.retrieve(pair, values, k, filt, radius, remaining)
            except Exception as e:
                raise self._mapped(e) from None
            t_done = time.perf_counter()
            stages += [("queue", r.queue_seconds), ("embed", r.embed_seconds),
                       ("search", r.search_seconds)]
            doc_ids, scores, scanned, plan, probes = r.doc_ids, r.scores, r.scanned, r.plan, r.probes
        else:
            r = await self._blocking(lambda: self._embed_and_search(
                pair, values, k, filt, radius, remaining, context))
            t_done = time.perf_counter()
            stages += [("embed", r.embed_seconds), ("search", r.search_seconds)]
            doc_ids, scores, scanned, plan, probes = r.doc_ids, r.scores, r.scanned, r.plan, r.probes
        stages.append(("total", t_done - start))
        for stage, seconds in stages[:-1]:
            self.metrics.latency.labels(stage).observe(seconds)
        self.metrics.scanned.observe(scanned)
        if plan:
            self.metrics.plans.labels(plan).inc()
        debug = retrieval_pb2.RetrieveDebug(
            latency=[retrieval_pb2.StageLatency(stage=s, micros=int(sec * 1e6))
                     for s, sec in stages],
            documents_scanned=scanned, model_version=pair.model_version,
            index_version=pair.index_version, backend=pair.backend, search_plan=plan,
            probes=probes)
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
                             int(result.scanned[0]), 0.0, t1 - t0, time.perf_counter() - t1,
                             *plan_of(result, 0))

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
                              f"(pinned while its pair is live: is the model server ours, or "
                              f"does its version policy keep the version?): {details}")
            if code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.RESOURCE_EXHAUSTED):
                code = grpc.StatusCode.INTERNAL
            return _Abort(code, f"model server: {details}")
        if isinstance(e, self._filter_errors):
            return _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"filter: {e}")
        if isinstance(e, DeadlineExpired):
            return _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        return e

