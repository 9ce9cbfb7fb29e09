"""The model server: TF Serving's gRPC API (and optionally its REST API) over its base path.

In production the exported towers run in the official `tensorflow/serving` image; locally and
in the tests this server stands in for it: the same `tensorflow.serving`
PredictionService / ModelService protos from tensorflow-serving-api, the same
`BASE/NAME/VERSION/` layout (`serving.model_server.registry`), the same status codes
(`serving.model_server.handlers`), so clients built on `prediction_service_pb2_grpc` work
against either unchanged. Adds what the project needs around it: grpc.health.v1 that says
SERVING only once a version is loaded, Prometheus metrics (`serving.model_server.metrics`),
optional TLS, and a graceful drain on SIGTERM.

The base path is any URI (local or gs://); only committed versions are loaded, failed loads
are retried with backoff, and a storage error while polling keeps what serves
(`serving.model_server.registry`).

CLI: `ebr serve model --model-base-path MODEL_DIR [--port 8500] [--rest-port 8501]`
(serving/cli.py), or `python -m serving.model_server` with the same flags; both build a
`ModelServerConfig` (serving/model_server/config.py) and call `run`.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from serving.model_server.config import (DEFAULT_LOAD_RETRY_SECONDS,
                                         DEFAULT_MAX_LOAD_RETRY_SECONDS,
                                         DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_POLL_SECONDS,
                                         DEFAULT_SIGNATURE, ModelServerConfig)

if TYPE_CHECKING:
    from serving.model_server.metrics import ModelServerMetrics
    from serving.model_server.registry import ModelRegistry

# TensorFlow and the TF Serving protos load inside start_model_server, so importing this module
# stays cheap.
log = logging.getLogger(__name__)

HEALTH_SERVICES = ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")


class _Frontend:
    """Runs a handler, records metrics, turns ServingError into the gRPC status."""

    def __init__(self, registry: "ModelRegistry", metrics: "ModelServerMetrics", max_tensor_bytes):
        from serving.model_server import handlers
        from serving.model_server.registry import ServingError

        self.registry, self.metrics, self.max_tensor_bytes = registry, metrics, max_tensor_bytes
        self.handlers, self._error = handlers, ServingError

    def call(self, api: str, model: str, context, fn):
        started = time.perf_counter()
        code, message = grpc.StatusCode.OK, ""
        try:
            return fn()
        except self._error as e:
            code, message = e.code, e.message
        except Exception as e:  # noqa: BLE001 - a bug answers INTERNAL and the server goes on
            log.exception("%s on model %r failed", api, model)
            code, message = grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"
        finally:
            self.metrics.observe(model, api, "GRPC", code, time.perf_counter() - started)
        context.abort(code, message)


# Plain classes: grpc's generated add_*_to_server only looks the methods up by name.
class PredictionServicer:
    """tensorflow.serving.PredictionService."""

    def __init__(self, front: _Frontend):
        self.front = front

    def Predict(self, request, context):
        f = self.front
        return f.call("predict", request.model_spec.name, context, lambda: f.handlers.predict(
            f.registry, request, max_tensor_bytes=f.max_tensor_bytes))

    def GetModelMetadata(self, request, context):
        f = self.front
        return f.call("GetModelMetadata", request.model_spec.name, context,
                      lambda: f.handlers.metadata(f.registry, request))

    def Classify(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Classify is not implemented by this server")

    def Regress(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Regress is not implemented by this server")

    def MultiInference(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      "MultiInference is not implemented by this server")


class ModelServicer:
    """tensorflow.serving.ModelService."""

    def __init__(self, front: _Frontend):
        self.front = front

    def GetModelStatus(self, request, context):
        f = self.front
        pin = None
        for key, value in context.invocation_metadata() or ():
            if key == f.handlers.PIN_METADATA:
                try:
                    pin = float(value)
                except ValueError:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"{key}: not a number of seconds: {value!r}")
        return f.call("GetModelStatus", request.model_spec.name, context,
                      lambda: f.handlers.model_status(f.registry, request, pin))

    def HandleReloadConfigRequest(self, request, context):
        f = self.front
        return f.call("HandleReloadConfigRequest", "", context,
                      lambda: f.handlers.reload_config(f.registry, request))


@dataclasses.dataclass
class ModelServer:
    """A running server: `port` (gRPC), `rest_port` (0 when off), `stop()`."""

    server: grpc.Server
    port: int
    registry: "ModelRegistry"
    metrics: "ModelServerMetrics"
    health: object  # grpc_health.v1.health.HealthServicer
    rest: object | None = None
    rest_port: int = 0

    def stop(self, grace: float | None = 5.0) -> None:
        """Drains: health NOT_SERVING, refuse new RPCs, let running ones finish within `grace`."""
        self.health.enter_graceful_shutdown()
        if self.rest is not None:
            self.rest.shutdown()
        self.server.stop(grace).wait()
        self.registry.stop()
        self.registry.unload_all()

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.registry.available():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no model version loaded from {self.registry.base_path} "
                                   f"within {timeout}s")
            time.sleep(0.05)


def _read(path: str | Path, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {p} does not exist")
    return p.read_bytes()


def start_model_server(model_base_path: str | Path, port: int = 0, *, host: str = "127.0.0.1",
                       rest_port: int | None = None,
                       poll_seconds: float = DEFAULT_POLL_SECONDS,
                       max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                       tls_cert: str | None = None, tls_key: str | None = None,
                       max_concurrency: int = ModelServerConfig.max_concurrency,
                       threads: int = ModelServerConfig.threads,
                       num_versions: int = ModelServerConfig.num_versions,
                       require_signature: str = DEFAULT_SIGNATURE,
                       wait_for_models: bool = True,
                       load_retry_seconds: float = DEFAULT_LOAD_RETRY_SECONDS,
                       max_load_retry_seconds: float = DEFAULT_MAX_LOAD_RETRY_SECONDS
                       ) -> ModelServer:
    """Binds, then loads what the base path holds (health NOT_SERVING meanwhile), then polls.

    `port=0` / `rest_port=0` pick free ports (see `.port` / `.rest_port`); `rest_port=None` is
    no REST. `max_concurrency>0` bounds RPCs in progress (RESOURCE_EXHAUSTED beyond it).
    A failed load is retried after `load_retry_seconds`, doubling up to `max_load_retry_seconds`.
    Defaults: `ModelServerConfig`, except the host (loopback) and port (any free one).
    """
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    from serving.model_server.metrics import ModelServerMetrics
    from serving.model_server.registry import ModelRegistry

    health_servicer = health.HealthServicer(experimental_non_blocking=True)

    def on_change(reg) -> None:
        state = (health_pb2.HealthCheckResponse.SERVING if reg.available()
                 else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in HEALTH_SERVICES:
            health_servicer.set(service, state)

    registry = ModelRegistry(
        str(model_base_path), poll_seconds=poll_seconds, num_versions=num_versions,
        require_signature=require_signature, on_change=on_change,
        load_retry_seconds=load_retry_seconds, max_load_retry_seconds=max_load_retry_seconds)
    on_change(registry)
    metrics = ModelServerMetrics(registry)
    front = _Frontend(registry, metrics, max(max_message_bytes, 1 << 20))
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", -1),
        # A second process on the same port must fail to bind, not silently share it.
        ("grpc.so_reuseport", 0),
    ]
    workers = max(threads, max_concurrency) if max_concurrency > 0 else threads
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                    thread_name_prefix="model-server"),
                         options=options,
                         maximum_concurrent_rpcs=max_concurrency if max_concurrency > 0 else None)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(front), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(front), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{host}:{port}"
    try:
        if tls_cert:
            creds = grpc.ssl_server_credentials([(_read(tls_key, "TLS key"),
                                                  _read(tls_cert, "TLS certificate"))])
            bound = server.add_secure_port(address, creds)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"cannot bind the model server to {address}: {e}") from e
    if not bound:
        raise OSError(f"cannot bind the model server to {address}")
    server.start()
    handle = ModelServer(server, bound, registry, metrics, health_servicer)
    if rest_port is not None:
        from serving.model_server.rest import start_rest_server

        handle.rest = start_rest_server(registry, metrics, host=host, port=rest_port,
                                        max_body_bytes=max_message_bytes)
        handle.rest_port = handle.rest.port
    log.info("model server on %s:%d (%s)%s, base path %s", host, bound,
             "TLS" if tls_cert else "plaintext",
             f", REST on port {handle.rest_port}" if handle.rest else "", model_base_path)
    if wait_for_models:
        registry.poll_once()
    registry.start()
    return handle


def run(cfg: ModelServerConfig) -> int:
    """Serves until SIGTERM / SIGINT, then drains (the k8s termination path)."""
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %d: draining for up to %.1fs", signum, cfg.drain_seconds)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        handle = start_model_server(
            cfg.model_base_path, cfg.port, host=cfg.host,
            rest_port=cfg.rest_port or None, poll_seconds=cfg.poll_seconds,
            max_message_bytes=cfg.max_message_bytes, tls_cert=cfg.tls_cert,
            tls_key=cfg.tls_key, max_concurrency=cfg.max_concurrency, threads=cfg.threads,
            num_versions=cfg.num_versions, require_signature=cfg.require_signature,
            load_retry_seconds=cfg.load_retry_seconds,
            max_load_retry_seconds=cfg.max_load_retry_seconds)
        # One line a supervisor (or a test) can wait for; the port matters when --port 0.
        print(f"model server listening on port {handle.port}"
              + (f", REST port {handle.rest_port}" if handle.rest_port else ""), flush=True)
        while not stop.wait(0.5):
            pass
        handle.stop(grace=cfg.drain_seconds)
        log.info("model server stopped")
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
