"""A small client for TF Serving's PredictionService / ModelService (ours or the real one).

For scripts and the tests: `ModelClient("host:8500")
.predict("query_tower", {"query": np.array([b"jon smith"]), ...})["embedding"]` (the retrieval
service has its own leaner encoder, `serving.retrieval.embedder`). It speaks only
the public `tensorflow_serving.apis` stubs, so it works unchanged against the official
`tensorflow/serving` image. Errors surface as `grpc.RpcError` (`.code()`, `.details()`).
"""
from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from serving.model_server.tensors import ndarray_to_proto, proto_to_ndarray

_STATE_NAMES = dict((v, k) for k, v in get_model_status_pb2.ModelVersionStatus.State.items())


def _as_bytes(value) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def _tensor_info(info) -> dict:
    from serving.model_server.tensors import dtype_name

    shape = None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim]
    return {"dtype": dtype_name(info.dtype), "shape": shape}


class ModelClient:
    """`address` is host:port. TLS: `tls=True` with optional `root_certificates` (PEM bytes or
    a path; system roots otherwise) and `server_name` to override the name checked."""

    def __init__(self, address: str, timeout: float = 10.0, *, tls: bool = False,
                 root_certificates: bytes | str | Path | None = None,
                 server_name: str | None = None, max_message_bytes: int = 64 << 20):
        self.address, self.timeout = address, timeout
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if tls or root_certificates is not None:
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            creds = grpc.ssl_channel_credentials(root_certificates=_as_bytes(root_certificates))
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> "ModelClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    @staticmethod
    def predict_request(model: str, inputs: dict, signature: str = "serving_default",
                        version: int | None = None, output_filter=None
                        ) -> predict_pb2.PredictRequest:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = signature
        if version is not None:
            request.model_spec.version.value = int(version)
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(ndarray_to_proto(value, use_tensor_content=True))
        request.output_filter.extend(output_filter or [])
        return request

    def predict_with_version(self, model: str, inputs: dict, signature: str = "serving_default",
                             version: int | None = None, output_filter=None,
                             timeout: float | None = None) -> tuple[dict, int]:
        """(outputs as numpy, the model version that answered)."""
        request = self.predict_request(model, inputs, signature, version, output_filter)
        response = self.predictions.Predict(request, timeout=timeout or self.timeout)
        outputs = {k: proto_to_ndarray(v, name=k) for k, v in response.outputs.items()}
        return outputs, response.model_spec.version.value

    def predict(self, model: str, inputs: dict, signature: str = "serving_default",
                version: int | None = None, output_filter=None,
                timeout: float | None = None) -> dict:
        return self.predict_with_version(model, inputs, signature, version, output_filter,
                                         timeout)[0]

    def metadata(self, model: str, version: int | None = None,
                 timeout: float | None = None) -> dict:
        """{"version": V, "signatures": {key: {"inputs": {name: {"dtype", "shape"}},
        "outputs": {...}, "method_name": ...}}} (shape None = unknown rank, -1 = any size)."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = model
        if version is not None:
            request.model_spec.version.value = int(version)
        response = self.predictions.GetModelMetadata(request, timeout=timeout or self.timeout)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(sig_map)
        signatures = {
            key: {"inputs": {n: _tensor_info(i) for n, i in sig.inputs.items()},
                  "outputs": {n: _tensor_info(i) for n, i in sig.outputs.items()},
                  "method_name": sig.method_name}
            for key, sig in sig_map.signature_def.items()}
        return {"version": response.model_spec.version.value, "signatures": signatures}

    def status(self, model: str, version: int | None = None,
               timeout: float | None = None) -> list[dict]:
        """[{"version", "state" ("AVAILABLE", ...), "error_code", "error_message"}]."""
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = model
        if version is not None:
            request.model_spec.version.value = int(version)
        response = self.models.GetModelStatus(request, timeout=timeout or self.timeout)
        return [{"version": s.version, "state": _STATE_NAMES.get(s.state, str(s.state)),
                 "error_code": s.status.error_code, "error_message": s.status.error_message}
                for s in response.model_version_status]

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """grpc.health.v1 status name: SERVING, NOT_SERVING, SERVICE_UNKNOWN, UNKNOWN."""
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                          timeout=timeout or self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_available(self, model: str, timeout: float = 60.0) -> int:
        """Blocks until some version of `model` is AVAILABLE; returns the newest such version."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                available = [s["version"] for s in self.status(model, timeout=2.0)
                             if s["state"] == "AVAILABLE"]
                if available:
                    return max(available)
                last = "no AVAILABLE version"
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"{model} not available at {self.address} after "
                                   f"{timeout}s ({last})")
            time.sleep(0.1)


def as_string_array(values, shape=None) -> np.ndarray:
    """Python strings -> the object array of bytes a DT_STRING input takes."""
    arr = np.array([v.encode("utf-8") if isinstance(v, str) else v
                    for v in np.asarray(values, dtype=object).ravel()], dtype=object)
    return arr.reshape(shape if shape is not None else np.shape(values))
