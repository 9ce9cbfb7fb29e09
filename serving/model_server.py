"""The model server: TF Serving's gRPC API (and optionally its REST API) over its base path.

In production the exported towers run in the official `tensorflow/serving` image; locally and
in the tests this server stands in for it: the same `tensorflow.serving`
PredictionService / ModelService protos from tensorflow-serving-api, the same
`BASE/NAME/VERSION/` layout (`serving.model_registry`), the same status codes
(`serving.model_handlers`), so clients built on `prediction_service_pb2_grpc` work against
either unchanged. Adds what the project needs around it: grpc.health.v1 that says SERVING only
once a version is loaded, Prometheus metrics, optional TLS, and a graceful drain on SIGTERM.

The base path is any URI (local or gs://); only committed versions are loaded, failed loads
are retried with backoff, and a storage error while polling keeps what serves
(`serving.model_registry`).

CLI: `ebr serve model --model-base-path MODEL_DIR [--port 8500] [--rest-port 8501]`
(registered by serving/cli.py through `add_arguments` / `run`), or `python -m serving.model_server`.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

# TensorFlow and the TF Serving protos load inside start_model_server: serving/cli.py imports
# this module to register `ebr serve model`, and `ebr --help` must stay fast (contracts.md).
log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
HEALTH_SERVICES = ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")


class _Frontend:
    """Runs a handler, records metrics, turns ServingError into the gRPC status."""

    def __init__(self, registry: "ModelRegistry", metrics: "ModelServerMetrics", max_tensor_bytes):
        from serving import model_handlers
        from serving.model_registry import ServingError

        self.registry, self.metrics, self.max_tensor_bytes = registry, metrics, max_tensor_bytes
        self.handlers, self._error = model_handlers, ServingError

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
        return f.call("GetModelStatus", request.model_spec.name, context,
                      lambda: f.handlers.model_status(f.registry, request))

    def HandleReloadConfigRequest(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      "model config reload is not supported: every subdirectory of the base "
                      "path is a model, picked up by polling")


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
                       rest_port: int | None = None, poll_seconds: float = 1.0,
                       max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                       tls_cert: str | None = None, tls_key: str | None = None,
                       max_concurrency: int = 0, threads: int = 16, num_versions: int = 1,
                       require_signature: str = "serving_default",
                       wait_for_models: bool = True, load_retry_seconds: float | None = None,
                       max_load_retry_seconds: float | None = None) -> ModelServer:
    """Binds, then loads what the base path holds (health NOT_SERVING meanwhile), then polls.

    `port=0` / `rest_port=0` pick free ports (see `.port` / `.rest_port`); `rest_port=None` is
    no REST. `max_concurrency>0` bounds RPCs in progress (RESOURCE_EXHAUSTED beyond it).
    A failed load is retried after `load_retry_seconds`, doubling up to `max_load_retry_seconds`
    (None: the registry's defaults).
    """
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    from serving.model_handlers import ModelServerMetrics
    from serving import model_registry
    from serving.model_registry import ModelRegistry

    health_servicer = health.HealthServicer(experimental_non_blocking=True)

    def on_change(reg) -> None:
        state = (health_pb2.HealthCheckResponse.SERVING if reg.available()
                 else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in HEALTH_SERVICES:
            health_servicer.set(service, state)

    registry = ModelRegistry(
        str(model_base_path), poll_seconds=poll_seconds, num_versions=num_versions,
        require_signature=require_signature, on_change=on_change,
        load_retry_seconds=(model_registry.DEFAULT_LOAD_RETRY_SECONDS
                            if load_retry_seconds is None else load_retry_seconds),
        max_load_retry_seconds=(model_registry.DEFAULT_MAX_LOAD_RETRY_SECONDS
                                if max_load_retry_seconds is None else max_load_retry_seconds))
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
        from serving.rest import start_rest_server
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-base-path", required=True,
                        help="BASE (any URI, e.g. gs://bucket/models) with committed "
                             "BASE/NAME/VERSION/saved_model.pb; every NAME is a model")
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8500, help="gRPC port (0 = any free port)")
    parser.add_argument("--rest-port", type=int, default=0,
                        help="REST port for /v1/models/... and metrics (0 = no REST)")
    parser.add_argument("--poll-seconds", type=float, default=1.0,
                        help="how often to look for new versions (TF Serving's default 1 s)")
    parser.add_argument("--num-versions", type=int, default=1,
                        help="serve the newest N versions (TF Serving's `latest` policy)")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                        help="largest request accepted (larger ones: RESOURCE_EXHAUSTED)")
    parser.add_argument("--tls-cert", help="PEM certificate chain (enables TLS with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key")
    parser.add_argument("--max-concurrency", type=int, default=0,
                        help="RPCs in progress before RESOURCE_EXHAUSTED (0 = unbounded queue, "
                             "as TF Serving)")
    parser.add_argument("--threads", type=int, default=16, help="gRPC worker threads")
    parser.add_argument("--load-retry-seconds", type=float, default=1.0,
                        help="first retry of a failed load; doubles per failure")
    parser.add_argument("--max-load-retry-seconds", type=float, default=60.0,
                        help="longest wait between retries of a failed load")
    parser.add_argument("--require-signature", default="serving_default",
                        help="a version without this signature is not loaded ('' = any)")
    parser.add_argument("--drain-seconds", type=float, default=10.0,
                        help="on SIGTERM, how long running requests may take to finish")


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %d: draining for up to %.1fs", signum, args.drain_seconds)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        handle = start_model_server(
            args.model_base_path, args.port, host=args.host,
            rest_port=args.rest_port or None, poll_seconds=args.poll_seconds,
            max_message_bytes=args.max_message_bytes, tls_cert=args.tls_cert,
            tls_key=args.tls_key, max_concurrency=args.max_concurrency, threads=args.threads,
            num_versions=args.num_versions, require_signature=args.require_signature,
            load_retry_seconds=args.load_retry_seconds,
            max_load_retry_seconds=args.max_load_retry_seconds)
        # One line a supervisor (or a test) can wait for; the port matters when --port 0.
        print(f"model server listening on port {handle.port}"
              + (f", REST port {handle.rest_port}" if handle.rest_port else ""), flush=True)
        while not stop.wait(0.5):
            pass
        handle.stop(grace=args.drain_seconds)
        log.info("model server stopped")
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.model_server",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
