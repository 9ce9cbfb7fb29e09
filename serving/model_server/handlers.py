"""What Predict, GetModelMetadata and GetModelStatus do, shared by the gRPC and REST front ends.

Checks and status codes follow TF Serving (upstream repository tensorflow/serving, files under
`tensorflow_serving/`: `servables/tensorflow/predict_util.cc`,
`model_servers/get_model_status_impl.cc`, `servables/tensorflow/get_model_metadata_impl.cc`,
`model_servers/server_core.cc`, `model_servers/model_service_impl.cc`): every refusal is a
`ServingError` carrying the gRPC code. The front ends record each call into
`serving.model_server.metrics`.
"""
from __future__ import annotations

import grpc
import numpy as np
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_management_pb2, model_pb2, predict_pb2, status_pb2)

from serving.model_server.config import DEFAULT_SIGNATURE
from serving.model_server.registry import (ConfiguredModel, ModelRegistry, Servable,
                                           ServingError, VersionPolicy)
from serving.model_server.tensors import (TensorError, dtype_name, ndarray_to_proto,
                                          proto_to_ndarray)

_CODE_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def _version(spec: model_pb2.ModelSpec) -> int | None:
    return spec.version.value if spec.HasField("version") else None


def _set_spec(out: model_pb2.ModelSpec, name: str, version: int, signature: str = "") -> None:
    out.name = name
    out.version.value = version
    if signature:
        out.signature_name = signature


def _shape_ok(shape: tuple[int, ...], expected) -> bool:
    if expected.unknown_rank:
        return True
    if len(shape) != len(expected.dim):
        return False
    return all(d.size < 0 or d.size == s for d, s in zip(expected.dim, shape))


def _shape_str(expected) -> str:
    if expected.unknown_rank:
        return "<unknown>"
    return "[" + ",".join("?" if d.size < 0 else str(d.size) for d in expected.dim) + "]"


def acquire(registry: ModelRegistry, spec: model_pb2.ModelSpec):
    """Lease on the servable a ModelSpec names (NOT_FOUND / INVALID_ARGUMENT otherwise)."""
    return registry.acquire(spec.name, _version(spec), spec.version_label)


def signature(servable: Servable, signature_name: str):
    """(name, SignatureDef, function); an unknown key is FAILED_PRECONDITION as in TF Serving."""
    sig_name = signature_name or DEFAULT_SIGNATURE
    sig = servable.signature_defs.get(sig_name)
    fn = servable.functions.get(sig_name)
    if sig is None or fn is None:
        raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                           f'Serving signature key "{sig_name}" not found.')
    return sig_name, sig, fn


def run_signature(servable: Servable, signature_name: str, inputs: dict, output_filter=(), *,
                  max_tensor_bytes: int = 1 << 30) -> tuple[str, dict]:
    """Validates and runs one signature on numpy-or-TensorProto `inputs` (held servable).

    Returns (signature_name, {output alias: np.ndarray}).
    """
    import tensorflow as tf

    sig_name, sig, fn = signature(servable, signature_name)
    sent, expected = set(inputs), set(sig.inputs)
    if sent != expected:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input size does not match signature: {len(sent)}!={len(expected)} "
            f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
            f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
            f"Missing but required: {{{','.join(sorted(expected - sent))}}}.")
    seen = set()
    for alias in output_filter:
        if alias not in sig.outputs:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"output tensor alias not found in signature: {alias} Outputs expected to "
                f"be in the set {{{','.join(sorted(sig.outputs))}}}.")
        if alias in seen:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"duplicate output tensor alias: {alias}")
        seen.add(alias)
    feeds = {}
    for key in sorted(sent):
        info, value = sig.inputs[key], inputs[key]
        if isinstance(value, np.ndarray):
            arr = value  # REST: already converted to the signature's dtype
        else:
            if value.dtype != info.dtype:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Expects arg[{key}] to be {dtype_name(info.dtype)} but "
                    f"{dtype_name(value.dtype)} is provided")
            try:
                arr = proto_to_ndarray(value, name=key, max_bytes=max_tensor_bytes)
            except TensorError as e:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        if not _shape_ok(arr.shape, info.tensor_shape):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input \"{key}\" has shape {list(arr.shape)}, signature "
                f"\"{sig_name}\" expects {_shape_str(info.tensor_shape)}")
        try:
            feeds[key] = tf.constant(arr, dtype=tf.dtypes.as_dtype(info.dtype))
        except (TypeError, ValueError) as e:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input \"{key}\": cannot convert to {dtype_name(info.dtype)}: {e}") from e
    try:
        result = fn(**feeds)
    except tf.errors.OpError as e:
        raise ServingError(_CODE_BY_NUMBER.get(e.error_code, grpc.StatusCode.UNKNOWN),
                           e.message) from e
    except (TypeError, ValueError) as e:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
    wanted = list(output_filter) or sorted(result)
    return sig_name, {k: result[k].numpy() for k in wanted}


def predict(registry: ModelRegistry, request: predict_pb2.PredictRequest, *,
            max_tensor_bytes: int = 1 << 30) -> predict_pb2.PredictResponse:
    with acquire(registry, request.model_spec) as servable:
        sig_name, outputs = run_signature(
            servable, request.model_spec.signature_name, dict(request.inputs),
            list(request.output_filter), max_tensor_bytes=max_tensor_bytes)
    response = predict_pb2.PredictResponse()
    _set_spec(response.model_spec, servable.name, servable.version, sig_name)
    for key, arr in outputs.items():
        response.outputs[key].CopyFrom(ndarray_to_proto(arr))
    return response


def metadata(registry: ModelRegistry, request: get_model_metadata_pb2.GetModelMetadataRequest
             ) -> get_model_metadata_pb2.GetModelMetadataResponse:
    if not request.metadata_field:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           "GetModelMetadataRequest must specify at least one metadata_field")
    for field in request.metadata_field:
        if field != "signature_def":
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Metadata field {field} is not supported")
    spec = request.model_spec
    with registry.acquire(spec.name, _version(spec), spec.version_label) as servable:
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        _set_spec(response.model_spec, servable.name, servable.version)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        for key, sig in servable.signature_defs.items():
            sig_map.signature_def[key].CopyFrom(sig)
        response.metadata["signature_def"].Pack(sig_map)
        return response


PIN_METADATA = "ebr-keep-loaded-seconds"  # GetModelStatus request metadata: pin the version


def model_status(registry: ModelRegistry, request: get_model_status_pb2.GetModelStatusRequest,
                 pin_seconds: float | None = None
                 ) -> get_model_status_pb2.GetModelStatusResponse:
    """GetModelStatus; with `pin_seconds` (the `ebr-keep-loaded-seconds` metadata) the named
    version is pinned first (`ModelRegistry.pin`): NOT_FOUND until it has been listed."""
    spec = request.model_spec
    version = _version(spec)
    if spec.version_label:
        version = registry.label_version(spec.name, spec.version_label)
    if pin_seconds is not None:
        if version is None or not spec.name:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{PIN_METADATA} needs a model name and a version")
        registry.pin(spec.name, version, pin_seconds)
    response = get_model_status_pb2.GetModelStatusResponse()
    for rec in registry.status(spec.name, version):
        status = response.model_version_status.add(version=rec.version, state=rec.state)
        status.status.CopyFrom(status_pb2.StatusProto(
            error_code=2 if rec.error else 0, error_message=rec.error))  # 2 = UNKNOWN
    return response


def _policy(config) -> VersionPolicy:
    """ModelConfig.model_version_policy; unset is the newest version (TF Serving's default)."""
    policy = config.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return VersionPolicy("all")
    if choice == "specific":
        if not policy.specific.versions:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Model {config.name}: specific version policy lists no versions")
        return VersionPolicy("specific", versions=frozenset(policy.specific.versions))
    return VersionPolicy("latest", max(1, policy.latest.num_versions if choice else 1))


def _absolute(uri: str) -> bool:
    return "://" in uri or uri.startswith("/")


def reload_config(registry: ModelRegistry, request: model_management_pb2.ReloadConfigRequest
                  ) -> model_management_pb2.ReloadConfigResponse:
    """HandleReloadConfigRequest: only a ModelConfigList is accepted; models left out are
    unloaded, new ones loaded before the answer (`ModelRegistry.reload_config`)."""
    config = request.config
    case = config.WhichOneof("config")
    if case is None:  # server_core.cc: "Taking no action for empty config."
        return model_management_pb2.ReloadConfigResponse(status=status_pb2.StatusProto())
    if case != "model_config_list":
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           "ServerModelConfig type not supported by HandleReloadConfigRequest. "
                           "Only ModelConfigList is currently supported")
    models = []
    for entry in config.model_config_list.config:
        if not entry.name:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "A model config has no name")
        if not _absolute(entry.base_path):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Expected model {entry.name} to have an absolute path or URI; "
                               f"got base_path()={entry.base_path}")
        if not entry.model_platform:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               "Illegal setting neither ModelServerConfig::model_type "
                               "(deprecated) nor ModelServerConfig::model_platform.")
        if entry.model_platform != "tensorflow":
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Model {entry.name}: platform {entry.model_platform!r} is not "
                               f"served here (only 'tensorflow')")
        models.append(ConfiguredModel(entry.name, entry.base_path.rstrip("/"), _policy(entry),
                                      tuple(sorted(entry.version_labels.items()))))
    registry.reload_config(models)
    return model_management_pb2.ReloadConfigResponse(status=status_pb2.StatusProto())
