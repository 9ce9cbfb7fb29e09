"""The model server's settings: `ebr serve model` and `python -m serving.model_server` generate
their flags from `ModelServerConfig` (`ebr.config.add_arguments`), and `start_model_server` and
the registry take their defaults from here. Standard library and `ebr.config` only, so building
the `ebr` parser loads neither gRPC nor TensorFlow.
"""
from __future__ import annotations

import dataclasses

from ebr import config

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_SIGNATURE = "serving_default"
DEFAULT_POLL_SECONDS = 1.0  # TF Serving's file system polling default
DEFAULT_LOAD_RETRY_SECONDS = 1.0  # first retry of a failed load; doubles per failure
DEFAULT_MAX_LOAD_RETRY_SECONDS = 60.0  # cap of the backoff (TF Serving's retry interval)


@dataclasses.dataclass
class ModelServerConfig:
    model_base_path: str = config.required(
        "BASE (any URI, e.g. gs://bucket/models) with committed BASE/NAME/VERSION/saved_model.pb; "
        "every NAME is a model")
    host: str = "0.0.0.0"  # address to bind
    port: int = 8500  # gRPC port (0 = any free port)
    rest_port: int = 0  # REST port for /v1/models/... and metrics (0 = no REST)
    poll_seconds: float = DEFAULT_POLL_SECONDS  # how often to look for new versions
    num_versions: int = dataclasses.field(default=1, metadata={
        "help": "serve the newest N versions (TF Serving's `latest` policy); versions a client "
                "pins (the retrieval service's live pair, docs/contracts.md section 6) stay "
                "loaded beside them"})
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # largest request (more: RESOURCE_EXHAUSTED)
    tls_cert: str | None = None  # PEM certificate chain (enables TLS with --tls-key)
    tls_key: str | None = None  # PEM private key
    max_concurrency: int = dataclasses.field(default=0, metadata={
        "help": "RPCs in progress before RESOURCE_EXHAUSTED (0 = unbounded queue, as TF Serving)"})
    threads: int = 16  # gRPC worker threads
    load_retry_seconds: float = dataclasses.field(default=DEFAULT_LOAD_RETRY_SECONDS, metadata={
        "help": "first retry of a failed load; doubles per failure"})
    max_load_retry_seconds: float = dataclasses.field(default=DEFAULT_MAX_LOAD_RETRY_SECONDS,
                                                      metadata={"help": "longest wait between "
                                                                "retries of a failed load"})
    require_signature: str = dataclasses.field(default=DEFAULT_SIGNATURE, metadata={
        "help": "a version without this signature is not loaded ('' = any)"})
    drain_seconds: float = 10.0  # on SIGTERM, how long running requests may take to finish
