"""Query embedding for the retrieval service: request features in, query-tower vectors out.

Two sources of the same exported `query_tower` (docs/contracts.md section 3):
  * remote: TF Serving's `PredictionService.Predict` at a configured address (the official
    `tensorflow/serving` image in Kubernetes, `ebr serve model` locally), pinned to a version;
  * local: the SavedModel loaded in-process when no address is set.
Both take the serving signature's raw string inputs, built here from `features.QUERY_INPUTS`:
scalar kinds as `[B]`, MULTI kinds as `[B, N]` padded with "" (N = longest list in the batch).

The service pins the model version to the one its index was built for (the index manifest's
`model_version`), so a query is never embedded by one model and searched in another's space.
Both sources answer `pin(versions)` (is each version usable now?) and `committed()` (the tower
versions published, when the source can list them) for the pair manager
(`serving.retrieval.pairs`); the remote one also asks the model server to keep those versions
loaded (`ebr-keep-loaded-seconds`, `serving.model_server.registry` "Pins").
Model directories are any URI (local or gs://); only committed tower versions count
(`ebr.artifacts.versions`: both towers of the export committed them), and `ebr_metadata.json`
is read with `ebr.artifacts.read_model_metadata`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ebr import artifacts, features, storage

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"
OUTPUT = "embedding"


PIN_METADATA = "ebr-keep-loaded-seconds"  # serving.model_server.handlers.PIN_METADATA


class ModelUnavailable(RuntimeError):
    """The requested model version is not (yet) loadable; the caller may retry later."""


_CLAIMED: dict[tuple[str, int], int] = {}  # committed versions are immutable: read once


def claimed_version(base: str, version: int) -> int | None:
    """The version `BASE/VERSION/ebr_metadata.json` names (None when unreadable): a copied
    tower directory names the version it was copied from."""
    key = (base, version)
    if key not in _CLAIMED:
        try:
            meta = artifacts.read_model_metadata(storage.join(base, version))
            _CLAIMED[key] = int(meta["version"])
        except (artifacts.ArtifactError, storage.StorageError, KeyError, TypeError, ValueError):
            return None
    return _CLAIMED[key]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    version: int
    dimension: int
    schema_hash: str | None  # None when only a remote address is known (no ebr_metadata.json)
    source: str  # directory or address, for error messages


def build_inputs(rows: Sequence[Mapping[str, object]]) -> dict[str, np.ndarray]:
    """Query-tower signature inputs for a batch of query feature dicts."""
    return features.tower_inputs(rows, features.QUERY_INPUTS)


def pick_version(versions: list[int], version: int | None, where: str) -> int:
    """The requested version, or the newest when none is asked for; ModelUnavailable otherwise."""
    if version is None:
        if not versions:
            raise ModelUnavailable(f"no model version {where}")
        return versions[-1]
    if version not in versions:
        raise ModelUnavailable(f"model version {version} not {where} (have {versions})")
    return version


def read_metadata(version_dir: str | Path) -> dict:
    """`ebr_metadata.json` of a committed tower version (`artifacts.read_model_metadata`); a
    version not committed (yet) is ModelUnavailable, the caller may retry later."""
    vdir = storage.normalize(os.fspath(version_dir))
    if artifacts.version_of(vdir) not in artifacts.versions(storage.parent(vdir)):
        raise ModelUnavailable(f"{vdir}: not a committed model version (no "
                               f"{artifacts.COMMIT_MARKER} in both towers)")
    return artifacts.read_model_metadata(vdir)


class LocalEncoder:
    """One version of the query tower, loaded in-process (`trainer.export.load_tower`, which
    checks its metadata and signature)."""

    def __init__(self, version_dir: str | Path):
        from trainer.export import load_tower

        version_dir = storage.normalize(os.fspath(version_dir))
        self._tower = load_tower(version_dir)
        missing = set(features.QUERY_INPUTS) ^ set(self._tower.input_names)
        if missing:
            raise ValueError(f"{version_dir}: signature inputs {sorted(self._tower.input_names)} "
                             f"differ from ebr.features.QUERY_INPUTS "
                             f"{sorted(features.QUERY_INPUTS)}")
        meta = self._tower.metadata
        self.info = ModelInfo(artifacts.version_of(self._tower.path), int(meta["dimension"]),
                              str(meta["schema_hash"]), self._tower.path)
        self._flat_order = _flat_input_order(self._tower.signature, self._tower.input_names)
        specs = self._tower.input_specs
        self._ranks = {n: len(specs[n].shape) for n in self._tower.input_names}

    def embed(self, inputs: dict[str, np.ndarray], timeout: float | None = None) -> np.ndarray:
        if not all(isinstance(inputs.get(n), np.ndarray) and inputs[n].ndim == rank
                   for n, rank in self._ranks.items()):  # anything else: the checked call
            return np.ascontiguousarray(self._tower(inputs), dtype=np.float32)
        import tensorflow as tf

        # build_inputs already made the signature's exact [B] / [B, N] string arrays: call the
        # concrete function on them directly (the generic tower call re-pads MULTI lists in
        # Python, a fifth of the per-call cost of a small batch).
        sig = self._tower.signature
        if self._flat_order is not None:
            # Flat call: skips binding the keyword arguments against the structured signature
            # (TensorSpec casts per input), about 0.2-0.4 ms of Python per call.
            out = sig._call_flat([tf.constant(inputs[n], dtype=tf.string)
                                  for n in self._flat_order], sig.captured_inputs)
        else:
            out = sig(**{n: tf.constant(inputs[n], dtype=tf.string)
                         for n in self._tower.input_names})
        return np.ascontiguousarray(out[OUTPUT].numpy(), dtype=np.float32)


def _flat_input_order(signature, input_names: Sequence[str]) -> list[str] | None:
    """Input names in the order of the concrete function's flat arguments (its first
    placeholders), or None when that order cannot be established (then the structured call
    is used). `ConcreteFunction._call_flat` is TF-private: checked here, and the test suite
    compares both call paths."""
    if not callable(getattr(signature, "_call_flat", None)):
        return None
    try:
        order = [t.name.split(":")[0] for t in signature.inputs[:len(input_names)]]
        specs = signature.structured_input_signature[1]
    except (AttributeError, IndexError, TypeError):
        return None
    if sorted(order) != sorted(input_names) or not all(
            specs[n].dtype.name == "string" for n in order):
        return None
    return order


class LocalModelSource:
    """`MODEL_DIR/query_tower` on any URI: lists committed versions, loads them in-process."""

    def __init__(self, base: str | Path):
        self.base = storage.normalize(os.fspath(base))
        if not storage.isdir(self.base):
            raise FileNotFoundError(f"model directory {self.base} does not exist")
        self._cache: dict[int, LocalEncoder] = {}
        self._lock = threading.Lock()

    def versions(self) -> list[int]:
        return artifacts.versions(self.base)

    def open(self, version: int | None) -> LocalEncoder:
        version = pick_version(self.versions(), version, f"under {self.base}")
        with self._lock:
            if version not in self._cache:
                path = storage.join(self.base, version)
                log.info("loading query tower", extra={"path": path})
                self._cache[version] = LocalEncoder(path)
            return self._cache[version]

    def committed(self) -> list[int]:
        return self.versions()

    def claimed_version(self, version: int) -> int | None:
        return claimed_version(self.base, version)

    def pin(self, versions: set[int]) -> dict[int, bool]:
        """In-process: a version is usable when loaded here or committed (open loads it); a
        loaded one stays usable through a storage outage."""
        with self._lock:
            loaded = set(self._cache)
        committed: set[int] = set()
        if set(versions) - loaded:
            try:
                committed = set(self.versions())
            except storage.StorageError as e:
                log.warning("cannot list query tower versions", extra={"base": self.base,
                                                                       "reason": str(e)})
        return {v: v in loaded or v in committed for v in versions}

    def release(self, keep: set[int]) -> None:
        """Drops loaded versions no longer served (their memory goes once requests finish)."""
        with self._lock:
            for v in [v for v in self._cache if v not in keep]:
                del self._cache[v]

    def close(self) -> None:
        self._cache.clear()


def tensor_proto(array: np.ndarray):
    """A DT_STRING TensorProto without going through tf.make_tensor_proto (cheaper per call)."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in array.shape])
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=shape,
                                  string_val=list(array.reshape(-1)))


def float_array(proto) -> np.ndarray:
    """TensorProto (DT_FLOAT) -> np.float32 array, from tensor_content or float_val."""
    shape = [d.size for d in proto.tensor_shape.dim]
    if proto.tensor_content:
        arr = np.frombuffer(proto.tensor_content, dtype=np.float32)
    else:
        arr = np.asarray(proto.float_val, dtype=np.float32)
    return arr.reshape(shape)


class RemoteEncoder:
    """One version of the query tower behind TF Serving's PredictionService."""

    def __init__(self, source: "RemoteModelSource", info: ModelInfo):
        self._source = source
        self.info = info

    def embed(self, inputs: dict[str, np.ndarray], timeout: float | None = None) -> np.ndarray:
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        request.model_spec.name = self._source.model_name
        request.model_spec.signature_name = SIGNATURE
        request.model_spec.version.value = self.info.version
        for name, arr in inputs.items():
            request.inputs[name].CopyFrom(tensor_proto(arr))
        request.output_filter.append(OUTPUT)
        response = self._source.predict_stub.Predict(request, timeout=timeout or 10.0)
        return float_array(response.outputs[OUTPUT])


class RemoteModelSource:
    """A query tower served by TF Serving (or `ebr serve model`) at `address`.

    `metadata_dir` (the same `MODEL_DIR/query_tower` the model server reads: a shared volume or
    a gs:// URI) supplies `ebr_metadata.json` so the schema hash can be checked against the index;
    without it only the dimension is checked (read from the signature's output shape)."""

    def __init__(self, address: str, model_name: str = "query_tower",
                 metadata_dir: str | Path | None = None, tls_ca: str | None = None,
                 pin_seconds: float = 60.0):
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.address = address
        self.model_name = model_name
        self.pin_seconds = pin_seconds
        self.metadata_dir = storage.normalize(os.fspath(metadata_dir)) if metadata_dir else None
        options = [("grpc.max_receive_message_length", 64 << 20)]
        if tls_ca:
            creds = grpc.ssl_channel_credentials(storage.read_bytes(tls_ca))
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model_stub = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def versions(self) -> list[int]:
        import grpc
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        try:
            response = self.model_stub.GetModelStatus(request, timeout=5.0)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.DEADLINE_EXCEEDED):
                return []
            raise
        available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return sorted(s.version for s in response.model_version_status if s.state == available)

    def _dimension(self, version: int) -> int:
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = self.model_name
        request.model_spec.version.value = version
        request.metadata_field.append("signature_def")
        response = self.predict_stub.GetModelMetadata(request, timeout=5.0)
        sigs = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(sigs)
        sig = sigs.signature_def[SIGNATURE]
        dims = [d.size for d in sig.outputs[OUTPUT].tensor_shape.dim]
        if len(dims) != 2 or dims[1] <= 0:
            raise ValueError(f"{self.address} {self.model_name}/{version}: output {OUTPUT!r} "
                             f"has shape {dims}, expected [batch, dimension]")
        return dims[1]

    def open(self, version: int | None) -> RemoteEncoder:
        version = pick_version(self.versions(), version,
                               f"AVAILABLE of {self.model_name} at {self.address}")
        source = f"{self.address}/{self.model_name}/{version}"
        if self.metadata_dir is not None:
            try:
                meta = read_metadata(storage.join(self.metadata_dir, version))
            except artifacts.ArtifactError as e:  # served, but its export not readable here
                raise ModelUnavailable(str(e)) from None
            info = ModelInfo(version, int(meta["dimension"]), str(meta["schema_hash"]), source)
        else:
            info = ModelInfo(version, self._dimension(version), None, source)
        return RemoteEncoder(self, info)

    def committed(self) -> list[int] | None:
        """Tower versions published under the metadata directory; None without one."""
        return artifacts.versions(self.metadata_dir) if self.metadata_dir else None

    def claimed_version(self, version: int) -> int | None:
        return claimed_version(self.metadata_dir, version) if self.metadata_dir else version

    def pin(self, versions: set[int]) -> dict[int, bool] | None:
        """Asks the model server to keep `versions` loaded for `pin_seconds` (and to load a
        committed one it does not hold: `serving.model_server.registry` "Pins"; stock TF
        Serving answers the status and ignores the metadata). Version -> AVAILABLE now; None
        when the model server cannot be asked (down, overloaded)."""
        import grpc
        from tensorflow_serving.apis import get_model_status_pb2

        available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        out = {}
        for version in sorted(versions):
            request = get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = self.model_name
            request.model_spec.version.value = version
            try:
                response = self.model_stub.GetModelStatus(
                    request, timeout=5.0, metadata=((PIN_METADATA, f"{self.pin_seconds:g}"),))
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    out[version] = False
                    continue
                log.warning("cannot ask the model server for its versions",
                            extra={"address": self.address, "code": e.code().name,
                                   "reason": e.details()})
                return None
            out[version] = any(s.version == version and s.state == available
                               for s in response.model_version_status)
        return out

    def release(self, keep: set[int]) -> None:
        pass  # the model server owns the loaded versions (pins lapse on their own)

    def close(self) -> None:
        self.channel.close()


def open_source(model_dir: str | None, address: str | None, model_name: str = "query_tower",
                tls_ca: str | None = None, pin_seconds: float = 60.0):
    """The configured model source: remote when an address is set, else in-process."""
    if address:
        return RemoteModelSource(address, model_name, metadata_dir=model_dir, tls_ca=tls_ca,
                                 pin_seconds=pin_seconds)
    if not model_dir:
        raise ValueError("set a model address (--model-address) or a model directory (--model)")
    return LocalModelSource(model_dir)
