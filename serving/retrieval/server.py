"""The retrieval service's server: `ebr.retrieval.v1.Retrieval/Retrieve` over gRPC.

Place in the data flow: the process at its end (the package docstring, `serving.retrieval`,
gives the whole path). `RetrievalServer` puts the parts together around one grpc.aio server on
its own event loop thread: the pair manager and its index poller (`serving.retrieval.pairs`),
the servicer (`serving.retrieval.servicer`), grpc.health.v1 (SERVING only while a pair is
loaded and its model available; "liveness" SERVING while the process runs), Prometheus metrics
on their own HTTP port (`serving.retrieval.metrics`), bounded concurrency (gRPC's
`maximum_concurrent_rpcs` answers RESOURCE_EXHAUSTED instead of queueing without bound),
optional TLS (and mutual TLS). `serve`
is the `ebr serve retrieval` process: it runs until SIGTERM, then drains.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from ebr import storage
from serving.retrieval import retrieval_pb2
from serving.retrieval.config import ServeConfig
from serving.retrieval.ensembles import Registry, load_registry
from serving.retrieval.metrics import Metrics
from serving.retrieval.pairs import Pair, PairManager, open_model_source
from serving.retrieval.servicer import RetrievalServicer, deserialize_request
from serving.retrieval.threads import set_tf_threads

log = logging.getLogger(__name__)

SERVICE_NAME = "ebr.retrieval.v1.Retrieval"
# Health service name that is SERVING while the process runs, even before a pair is loaded or
# during a drain: for liveness probes (readiness probes use "" or SERVICE_NAME).
LIVENESS_SERVICE = "liveness"


class RetrievalServer:
    """grpc.aio server + health + metrics + index poller, with a blocking API: `start()` raises
    ModelIndexMismatch when the newest index does not fit its model; `stop(grace)` drains.

    The server runs on its own event loop thread: a request costs no thread of its own and
    no hand-off between threads until its batch runs (about a fifth less CPU per request than
    a thread per request on 2 cores, bench/serving_bench.py)."""

    def __init__(self, config: ServeConfig, *, ensemble_registry: Registry | None = None):
        """`ensemble_registry`: the named ensembles requests may ask for; when None, those of
        the file `config.ensembles` names (`serving.retrieval.ensembles.load_registry`)."""
        if not config.index:
            raise ValueError("the retrieval service needs an index (--index INDEX_BASE)")
        if ensemble_registry is None:
            ensemble_registry = load_registry(config.ensembles) if config.ensembles else {}
        self.config = config
        self.metrics = Metrics()
        self.source = open_model_source(config)
        self.manager = PairManager(config.index, self.source, on_change=self._on_change,
                                   on_reload=lambda r: self.metrics.reloads.labels(r).inc(),
                                   on_refused=lambda r: self.metrics.refused_pairs.labels(r).inc(),
                                   on_live=self._on_live,
                                   retry_seconds=config.retry_seconds,
                                   retry_max_seconds=config.retry_max_seconds)
        self.health = health_aio.HealthServicer()
        self.servicer = RetrievalServicer(self.manager, self.metrics, config, ensemble_registry)
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

    def _on_live(self, ok: bool, reason: str) -> None:
        """The live pair's model became unavailable (or available again): readiness follows,
        so load balancers stop routing requests that cannot be answered."""
        if self._draining:
            return
        self.metrics.ready.set(1 if ok else 0)
        self._set_health(health_pb2.HealthCheckResponse.SERVING if ok
                         else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _start_server(self) -> None:
        cfg = self.config
        server = grpc.aio.server(
            maximum_concurrent_rpcs=cfg.workers + cfg.max_queue,
            # One process per port: a second server must fail to bind, not share the traffic.
            options=[("grpc.so_reuseport", 0)])
        handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Retrieve": grpc.unary_unary_rpc_method_handler(
                self.servicer.Retrieve, request_deserializer=deserialize_request,
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



def serve(config: ServeConfig, ensemble_registry: Registry | None = None) -> int:
    """Runs until SIGTERM / SIGINT, then drains (the k8s termination path)."""
    set_tf_threads(config.tf_threads)  # before any tower loads (a fresh process)
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
