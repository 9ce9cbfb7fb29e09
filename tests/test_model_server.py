"""The model server against TF Serving's own client stubs, over real gRPC on loopback.

Models: a small SavedModel built here with tf.Module (as TF Serving's tests use half_plus_two):
inputs `text` (string [B]) and `x` (float [B, 3]); outputs `y = 0.5 x + version` and
`length = strlen(text)`, so every response tells which version answered. Versions are published
as the exporter publishes them (`ebr.artifacts.publish_dir`: staged, uploaded, `_COMMITTED`
last).
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import tempfile

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                     get_model_status_pb2, inference_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc, regression_pb2)

from ebr import artifacts
from serving.model_server.client import ModelClient, as_string_array
from serving.model_server.server import start_model_server

REPO = Path(__file__).resolve().parents[1]
C = grpc.StatusCode


class Toy(tf.Module):
    def __init__(self, version: int):
        super().__init__()
        self.offset = tf.Variable(float(version))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text"),
                                  tf.TensorSpec([None, 3], tf.float32, name="x")])
    def serve(self, text, x):
        return {"y": 0.5 * x + self.offset, "length": tf.strings.length(text)}

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def double(self, x):
        return {"z": 2.0 * x}


def publish(base, version: int, name: str = "toy") -> str:
    """Publishes a version the way our exporter does: staged locally, uploaded with
    saved_model.pb last, then the commit marker (`base` may be a gs:// URI)."""
    model = Toy(version)
    with tempfile.TemporaryDirectory() as staging:
        tf.saved_model.save(model, staging, signatures={"serving_default": model.serve,
                                                        "double": model.double})
        return artifacts.publish_dir(staging, f"{base}/{name}", version=version,
                                     last=("saved_model.pb",))


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def toy_request(name="toy", n=2, version=None, signature="", **override):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    inputs = {"text": tf.make_tensor_proto([b"ab"] * n),
              "x": tf.make_tensor_proto(np.arange(3 * n, dtype=np.float32).reshape(n, 3))}
    inputs.update(override)
    for k, v in inputs.items():
        if v is not None:
            request.inputs[k].CopyFrom(v)
    return request


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    publish(base, 1)
    return base


@pytest.fixture(scope="module")
def server(toy_base):
    handle = start_model_server(toy_base, 0, rest_port=0, poll_seconds=0.2)
    yield handle
    handle.stop(grace=1)


@pytest.fixture(scope="module")
def stubs(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield (prediction_service_pb2_grpc.PredictionServiceStub(channel),
           model_service_pb2_grpc.ModelServiceStub(channel),
           health_pb2_grpc.HealthStub(channel))
    channel.close()


def rpc_code(call, request):
    try:
        call(request, timeout=10)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return C.OK, ""


def test_predict_with_official_stub(stubs):
    predict, _, health = stubs
    response = predict.Predict(toy_request(n=2), timeout=10)
    assert response.model_spec.name == "toy"
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    # TF Serving's default reply puts values in the typed fields, which clients read directly.
    x = np.arange(6, dtype=np.float32)
    assert list(response.outputs["y"].float_val) == pytest.approx(list(0.5 * x + 1))
    assert [d.size for d in response.outputs["y"].tensor_shape.dim] == [2, 3]
    assert list(response.outputs["length"].int_val) == [2, 2]
    assert tf.make_ndarray(response.outputs["y"]).shape == (2, 3)
    # Named signature, output filter.
    request = toy_request(signature="double", text=None)
    request.output_filter.append("z")
    assert list(predict.Predict(request, timeout=10).outputs["z"].float_val) == list(2 * x)
    request = toy_request()
    request.output_filter.append("length")
    assert list(predict.Predict(request, timeout=10).outputs) == ["length"]
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING


def test_model_client(server):
    with ModelClient(f"127.0.0.1:{server.port}", timeout=10) as client:
        x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
        out, version = client.predict_with_version(
            "toy", {"text": as_string_array(["a", "bb", "", "日本"]), "x": x})
        assert version == 1
        np.testing.assert_allclose(out["y"], 0.5 * x + 1, rtol=1e-6)
        np.testing.assert_array_equal(out["length"], [1, 2, 0, 6])
        assert set(client.predict("toy", {"x": x}, signature="double")) == {"z"}
        meta = client.metadata("toy")
        assert meta["version"] == 1
        sig = meta["signatures"]["serving_default"]
        assert sig["inputs"] == {"text": {"dtype": "string", "shape": [-1]},
                                 "x": {"dtype": "float", "shape": [-1, 3]}}
        assert sig["method_name"] == "tensorflow/serving/predict"
        assert client.status("toy") == [{"version": 1, "state": "AVAILABLE", "error_code": 0,
                                         "error_message": ""}]
        assert client.health() == "SERVING"
        assert client.wait_until_available("toy", timeout=5) == 1


def test_error_statuses_match_tf_serving(stubs, server):
    predict, models, _ = stubs
    f32 = tf.make_tensor_proto(np.zeros((2, 3), np.float32))
    cases = [
        (toy_request(name="nope"), C.NOT_FOUND, "Servable not found for request: Latest(nope)"),
        (toy_request(version=7), C.NOT_FOUND, "Servable not found for request: Specific(toy, 7)"),
        (toy_request(name=""), C.INVALID_ARGUMENT, ""),
        (toy_request(signature="nope"), C.FAILED_PRECONDITION,
         'Serving signature key "nope" not found.'),
        (toy_request(text=None), C.INVALID_ARGUMENT, "Missing but required: {text}"),
        (toy_request(extra=f32), C.INVALID_ARGUMENT, "Sent extra: {extra}"),
        (toy_request(text=f32), C.INVALID_ARGUMENT, "to be string but float is provided"),
        (toy_request(x=tf.make_tensor_proto(np.zeros((2, 4), np.float32))),
         C.INVALID_ARGUMENT, "expects [?,3]"),
        (toy_request(x=tf.make_tensor_proto(np.zeros((2, 3), np.float64))),
         C.INVALID_ARGUMENT, "to be float but double is provided"),
    ]
    labelled = toy_request()
    labelled.model_spec.version_label = "stable"
    cases.append((labelled, C.INVALID_ARGUMENT, "Unrecognized servable version label: stable"))
    bad_filter = toy_request()
    bad_filter.output_filter.append("nope")
    cases.append((bad_filter, C.INVALID_ARGUMENT, "output tensor alias not found"))
    for request, code, message in cases:
        got, details = rpc_code(predict.Predict, request)
        assert got == code, (request.model_spec, details)
        assert message in details
    # Other APIs.
    assert rpc_code(predict.Classify, classification_pb2.ClassificationRequest())[0] == \
        C.UNIMPLEMENTED
    assert rpc_code(predict.Regress, regression_pb2.RegressionRequest())[0] == C.UNIMPLEMENTED
    assert rpc_code(predict.MultiInference, inference_pb2.MultiInferenceRequest())[0] == \
        C.UNIMPLEMENTED
    meta = get_model_metadata_pb2.GetModelMetadataRequest()
    meta.model_spec.name = "toy"
    assert rpc_code(predict.GetModelMetadata, meta)[0] == C.INVALID_ARGUMENT  # no field
    meta.metadata_field.append("signature_def")
    meta.model_spec.name = "nope"
    assert rpc_code(predict.GetModelMetadata, meta)[0] == C.NOT_FOUND
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "nope"
    assert rpc_code(models.GetModelStatus, status)[0] == C.NOT_FOUND
    status.model_spec.name = "toy"
    status.model_spec.version.value = 9
    assert rpc_code(models.GetModelStatus, status)[0] == C.NOT_FOUND
    # Still serving after every one; metrics counted them by status.
    assert predict.Predict(toy_request(), timeout=10).model_spec.version.value == 1
    assert server.metrics.count("_unknown", "NOT_FOUND") >= 1  # client names not labels
    assert server.metrics.count("toy", "INVALID_ARGUMENT") >= 6
    assert server.metrics.count("toy", "OK") >= 1


def test_message_over_limit_is_resource_exhausted(toy_base):
    handle = start_model_server(toy_base, 0, max_message_bytes=64 * 1024)
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(f"127.0.0.1:{handle.port}"))
        big = toy_request(n=20_000)  # ~240 kB of floats + strings
        assert rpc_code(stub.Predict, big)[0] == C.RESOURCE_EXHAUSTED
        assert stub.Predict(toy_request(), timeout=10).model_spec.version.value == 1
    finally:
        handle.stop(grace=1)


def _http(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_rest_api(server):
    root = f"http://127.0.0.1:{server.rest_port}"
    status, body = _http(f"{root}/v1/models/toy")
    assert status == 200
    assert json.loads(body) == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK",
                                                          "error_message": ""}}]}
    status, body = _http(f"{root}/v1/models/toy/versions/1/metadata")
    meta = json.loads(body)
    assert status == 200 and meta["model_spec"]["version"] == "1"
    assert set(meta["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]) \
        == {"text", "x"}
    # Row format, named inputs; b64 strings.
    status, body = _http(f"{root}/v1/models/toy:predict", {"instances": [
        {"text": "abc", "x": [1, 2, 3]}, {"text": {"b64": "eHk="}, "x": [0, 0, 0]}]})
    assert status == 200
    assert json.loads(body) == {"predictions": [{"length": 3, "y": [1.5, 2.0, 2.5]},
                                                {"length": 2, "y": [1.0, 1.0, 1.0]}]}
    # Columnar format; single-input signature with bare instances.
    status, body = _http(f"{root}/v1/models/toy/versions/1:predict",
                         {"inputs": {"text": ["a"], "x": [[2, 2, 2]]}})
    assert status == 200 and json.loads(body) == {"outputs": {"length": [1], "y": [[2, 2, 2]]}}
    status, body = _http(f"{root}/v1/models/toy:predict",
                         {"signature_name": "double", "instances": [[1, 1, 1]]})
    assert status == 200 and json.loads(body) == {"predictions": [[2, 2, 2]]}
    # Errors with TF Serving's HTTP mapping.
    assert _http(f"{root}/v1/models/nope")[0] == 404
    assert _http(f"{root}/v1/models/toy/versions/5:predict", {"instances": [[1, 1, 1]]})[0] == 404
    status, body = _http(f"{root}/v1/models/toy:predict", {"signature_name": "x",
                                                           "instances": [1]})
    assert status == 400 and b"not found" in body
    assert _http(f"{root}/v1/models/toy:predict", {"instances": [{"x": [1, 2, 3]}]})[0] == 400
    assert _http(f"{root}/v1/models/toy:predict", {"inputs": {"text": ["a"],
                                                              "x": [[1, 2], [3]]}})[0] == 400
    assert _http(f"{root}/v1/models/toy:regress", {"examples": []})[0] == 501
    status, body = _http(f"{root}/monitoring/prometheus/metrics")
    assert status == 200
    text = body.decode()
    assert ':tensorflow:serving:request_count{model_name="toy",status="OK"}' in text
    assert ":tensorflow:serving:request_latency_bucket" in text
    assert 'entrypoint="REST"' in text


def test_version_switch_under_load_and_health(tmp_path):
    base = tmp_path / "models"
    (base / "toy").mkdir(parents=True)
    handle = start_model_server(base, 0, poll_seconds=0.1, load_retry_seconds=0.1,
                                max_load_retry_seconds=0.4)
    try:
        address = f"127.0.0.1:{handle.port}"
        client = ModelClient(address, timeout=10)
        assert client.health() == "NOT_SERVING"  # nothing loaded yet
        assert rpc_code(client.predictions.Predict, toy_request())[0] == C.NOT_FOUND
        publish(base, 1)
        wait_for(lambda: client.health() == "SERVING", what="v1 loaded")

        failures, seen, stop = [], [], threading.Event()

        def loop():
            while not stop.is_set():
                try:
                    out, version = client.predict_with_version(
                        "toy", {"text": as_string_array(["q"]),
                                "x": np.ones((1, 3), np.float32)})
                    seen.append((version, float(out["y"][0, 0])))
                except grpc.RpcError as e:  # any failure fails the test
                    failures.append(f"{e.code()}: {e.details()}")

        threads = [threading.Thread(target=loop) for _ in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: len(seen) > 20, what="v1 traffic")
        publish(base, 2)
        wait_for(lambda: seen[-1][0] == 2 and len(seen) > 50, what="switch to v2")
        n = len(seen)
        wait_for(lambda: len(seen) > n + 30, what="v2 traffic")
        stop.set()
        for t in threads:
            t.join()
        assert failures == []
        versions = [v for v, _ in seen]
        first_v2 = versions.index(2)
        assert 1 in versions[:first_v2]
        # Each response's value matches the version that claims it: 0.5 * 1 + version.
        assert all(y == pytest.approx(0.5 + v) for v, y in seen)
        # After the switch, nothing answers from v1 (allow the few already in flight).
        assert versions[first_v2 + 10:].count(1) == 0
        # v1 is unloaded (latest policy keeps 1 version); pinning it is NOT_FOUND like TF Serving.
        wait_for(lambda: [s["state"] for s in client.status("toy")] == ["END", "AVAILABLE"],
                 what="v1 unloaded")
        assert rpc_code(client.predictions.Predict, toy_request(version=1))[0] == C.NOT_FOUND
        assert client.predict("toy", {"x": np.ones((1, 3), np.float32)}, signature="double",
                              version=2)["z"].tolist() == [[2, 2, 2]]

        # Uncommitted versions are never loaded, however complete their files look; committed
        # versions that fail to load are recorded and retried with backoff; v2 keeps serving.
        toy = base / "toy"
        shutil.copytree(toy / "2", toy / "3")
        (toy / "3" / artifacts.COMMIT_MARKER).unlink()  # a complete copy, never committed
        good_pb = (toy / "2" / "saved_model.pb").read_bytes()
        (toy / "4").mkdir()
        (toy / "4" / "saved_model.pb").write_bytes(good_pb[: len(good_pb) // 2])
        artifacts.commit(str(toy / "4"))  # committed, but its SavedModel does not parse
        no_vars = toy / "5"
        no_vars.mkdir()
        (no_vars / "saved_model.pb").write_bytes(good_pb)  # variables/ missing
        artifacts.commit(str(no_vars))
        def failed(version):  # END with its error (between two retries; LOADING during one)
            state = {s["version"]: s for s in client.status("toy")}.get(version, {})
            return state.get("state") == "END" and bool(state.get("error_message"))

        for v in (4, 5):
            wait_for(lambda: failed(v), what=f"v{v} load failure recorded")
        assert 3 not in {s["version"] for s in client.status("toy")}  # not even attempted
        # Retried with backoff (load_retry_seconds=0.1 doubling to 0.4 below), not every poll.
        wait_for(lambda: handle.registry._models["toy"][5].failures >= 3, timeout=10,
                 what="v5 retried")
        rec = handle.registry._models["toy"][5]
        assert rec.retry_at - time.monotonic() <= 0.4 + 0.05
        assert handle.registry.available() == {"toy": [2]}
        assert client.predict_with_version("toy", {"x": np.ones((1, 3), np.float32)},
                                           signature="double")[1] == 2
        # A model without the required signature is refused too.
        plain = tf.Module()
        plain.v = tf.Variable(1.0)
        plain.f = tf.function(lambda x: {"o": x * plain.v},
                              input_signature=[tf.TensorSpec([None], tf.float32)])
        with tempfile.TemporaryDirectory() as staging:
            tf.saved_model.save(plain, staging, signatures={"other": plain.f})
            artifacts.publish_dir(staging, str(toy), version=6)
        wait_for(lambda: failed(6) and "serving_default" in {
            s["version"]: s for s in client.status("toy")}[6]["error_message"], what="v6 refused")
        # Once version 5's files are complete its next retry loads it and it is served.
        shutil.copytree(toy / "2" / "variables", no_vars / "variables")
        wait_for(lambda: handle.registry.available() == {"toy": [5]}, what="v5 served")
        assert client.health() == "SERVING"
        assert 3 not in {s["version"] for s in client.status("toy")}
        client.close()
    finally:
        handle.stop(grace=1)


def test_storage_outage_keeps_serving_and_uncommitted_never_loads(tmp_path):
    """The base path vanishes (renamed away: what an unreachable bucket looks like to a
    poll) and comes back: the served version never unloads; a version whose upload is done
    but whose commit marker is missing is never loaded, and loads once committed."""
    base = tmp_path / "models"
    publish(base, 1)
    handle = start_model_server(base, 0, poll_seconds=0.05)
    try:
        client = ModelClient(f"127.0.0.1:{handle.port}", timeout=10)
        x = {"x": np.ones((1, 3), np.float32)}
        assert client.predict_with_version("toy", x, signature="double")[1] == 1
        # A new version, every file uploaded, no _COMMITTED: polls ignore it.
        v2 = Path(publish(base, 2))
        (v2 / artifacts.COMMIT_MARKER).unlink()
        away = tmp_path / "models.away"
        os.rename(base, away)  # the whole base path is gone for a while
        time.sleep(0.5)  # ten polls
        assert handle.registry.available() == {"toy": [1]}
        assert client.health() == "SERVING"
        assert client.predict_with_version("toy", x, signature="double")[1] == 1
        (away / "toy").rename(away / ".toy-moved")  # and the model directory too
        os.rename(away, base)
        time.sleep(0.5)
        assert handle.registry.available() == {"toy": [1]}
        assert client.predict_with_version("toy", x, signature="double")[1] == 1
        (base / ".toy-moved").rename(base / "toy")
        time.sleep(0.5)
        assert handle.registry.available() == {"toy": [1]}
        assert 2 not in {s["version"] for s in client.status("toy")}  # never attempted
        artifacts.commit(str(v2))
        wait_for(lambda: handle.registry.available() == {"toy": [2]}, what="v2 served")
        assert client.predict_with_version("toy", x, signature="double")[1] == 2
        client.close()
    finally:
        handle.stop(grace=1)


# ---- hypothesis: arbitrary PredictRequests never crash the server ---------------------------
_dtypes = st.sampled_from([types_pb2.DT_FLOAT, types_pb2.DT_STRING, types_pb2.DT_INT64,
                           types_pb2.DT_DOUBLE, types_pb2.DT_BOOL, types_pb2.DT_INVALID,
                           types_pb2.DT_RESOURCE, types_pb2.DT_VARIANT, types_pb2.DT_HALF, 99])


@st.composite
def tensor_protos(draw):
    proto = tensor_pb2.TensorProto(dtype=draw(_dtypes))
    if draw(st.booleans()):
        proto.tensor_shape.unknown_rank = draw(st.booleans())
    dims = draw(st.lists(st.one_of(st.integers(-2, 4), st.sampled_from([10**12, 2**62])),
                         max_size=3))
    proto.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims)
    proto.float_val.extend(draw(st.lists(st.floats(width=32), max_size=8)))
    proto.string_val.extend(draw(st.lists(st.binary(max_size=8), max_size=8)))
    proto.int64_val.extend(draw(st.lists(st.integers(-2**63, 2**63 - 1), max_size=4)))
    proto.bool_val.extend(draw(st.lists(st.booleans(), max_size=4)))
    if draw(st.booleans()):
        proto.tensor_content = draw(st.binary(max_size=32))
    return proto


@st.composite
def predict_requests(draw):
    request = predict_pb2.PredictRequest()
    # Mostly well-addressed requests so that many reach the model itself.
    request.model_spec.name = draw(st.sampled_from(["toy"] * 6 + ["", "nope", "toy\x00"]))
    if draw(st.integers(0, 3)) == 0:
        request.model_spec.version.value = draw(st.sampled_from([1, 1, 0, -1, 2**63 - 1]))
    request.model_spec.signature_name = draw(st.sampled_from(["", "", "serving_default",
                                                              "double", "zz"]))
    if draw(st.integers(0, 9)) == 0:
        request.model_spec.version_label = "x"
    if draw(st.booleans()):  # well-typed inputs with arbitrary shapes and values
        n = draw(st.integers(0, 3))
        text = draw(st.lists(st.binary(max_size=20), min_size=n, max_size=n))
        request.inputs["text"].CopyFrom(tf.make_tensor_proto(np.array(text, dtype=object),
                                                             dtype=tf.string))
        rows = draw(st.integers(0, 3))
        cols = draw(st.sampled_from([3, 3, 2]))
        x = draw(st.lists(st.floats(width=32), min_size=rows * cols, max_size=rows * cols))
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(
            np.array(x, np.float32).reshape(rows, cols)))
    else:
        for key in draw(st.lists(st.sampled_from(["text", "x", "other", ""]), max_size=3,
                                 unique=True)):
            request.inputs[key].CopyFrom(draw(tensor_protos()))
    if draw(st.integers(0, 3)) == 0:
        request.output_filter.extend(draw(st.lists(st.sampled_from(["y", "length", "z", "q"]),
                                                   max_size=3)))
    return request


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=predict_requests())
def test_hypothesis_requests_never_crash(stubs, request):
    predict, _, health = stubs
    code, details = rpc_code(predict.Predict, request)
    event(code.name)
    assert code in (C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION), details


def test_garbage_bytes_then_still_serving(server, stubs):
    predict, _, health = stubs
    rng = np.random.default_rng(0)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        raw = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
        for blob in [b"\xff\xff\xff", b"\x0a\x05hello", rng.bytes(300), rng.bytes(3000)]:
            with pytest.raises(grpc.RpcError):
                raw(blob, timeout=5)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    assert predict.Predict(toy_request(), timeout=10).model_spec.version.value == 1


# ---- TLS --------------------------------------------------------------------------------------
def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls(toy_base, tmp_path):
    cert, key = _self_signed(tmp_path)
    handle = start_model_server(toy_base, 0, tls_cert=str(cert), tls_key=str(key))
    try:
        with ModelClient(f"localhost:{handle.port}", timeout=10, root_certificates=cert) as c:
            out = c.predict("toy", {"x": np.ones((1, 3), np.float32)}, signature="double")
            assert out["z"].tolist() == [[2, 2, 2]]
        with ModelClient(f"127.0.0.1:{handle.port}", timeout=3) as plain:
            with pytest.raises(grpc.RpcError) as err:
                plain.status("toy")
            assert err.value.code() == C.UNAVAILABLE
    finally:
        handle.stop(grace=1)


# ---- process lifecycle: kill -9 mid-load, restart on the same port, SIGTERM drain -----------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(base: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", "serving.model_server", "--model-base-path", str(base),
         "--host", "127.0.0.1", "--port", str(port), "--poll-seconds", "0.2",
         "--drain-seconds", "2"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill9_mid_load_then_restart_and_sigterm(tmp_path):
    base = tmp_path / "models"
    for name in ("a", "b", "c", "d"):  # several models so loading takes a while
        publish(base, 1, name=name)
    port = _free_port()
    proc = _spawn(base, port)
    client = ModelClient(f"127.0.0.1:{port}", timeout=2)
    try:
        # Killed as soon as the port answers: the server binds first, then loads.
        def answers():
            try:
                return client.health(timeout=0.5) in ("NOT_SERVING", "SERVING")
            except grpc.RpcError:
                return proc.poll() is not None

        wait_for(answers, timeout=60, what="first server bound")
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()

        proc = _spawn(base, port)
        wait_for(lambda: proc.poll() is not None or answers() and client.health() == "SERVING",
                 timeout=60, what="restarted server SERVING")
        assert proc.poll() is None, proc.stdout.read()
        out = client.predict("d", {"x": np.ones((1, 3), np.float32)}, signature="double")
        assert out["z"].tolist() == [[2, 2, 2]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        log = proc.stdout.read()
        assert "draining" in log and "model server stopped" in log
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- the project's real exported query tower ----------------------------------------------
def _query_batch(searchers) -> dict:
    """Query-tower inputs by schema name: scalar kinds [B], MULTI kinds [B, N] padded with ""."""
    from ebr import features

    rows = [features.query_values(q, s, h) for q, s, h in [
        ("music club", searchers[0], ["d1", "d2"]),
        ("chses", searchers[1], []),
        ("", searchers[2], ["d7"]),
    ]]
    batch = {}
    for name in features.QUERY_INPUTS:
        values = [r[name] for r in rows]
        if features.BY_NAME[name].kind == features.MULTI:
            width = max(1, max(len(v) for v in values))
            values = [list(v) + [""] * (width - len(v)) for v in values]
        batch[name] = as_string_array(values)
    return batch


def test_serves_exported_query_tower(tmp_path):
    import serving_fixtures
    from trainer.export import load_tower

    stack = serving_fixtures.Stack(tmp_path)
    stack.publish_model(1)  # trainer.task.train: a few real steps, then export_towers
    handle = start_model_server(stack.model_dir, 0)
    try:
        with ModelClient(f"127.0.0.1:{handle.port}", timeout=30) as client:
            assert handle.registry.available() == {"doc_tower": [1], "query_tower": [1]}
            sig = client.metadata("query_tower")["signatures"]["serving_default"]
            assert sig["outputs"]["embedding"]["dtype"] == "float"
            assert all(i["dtype"] == "string" for i in sig["inputs"].values())
            batch = _query_batch(stack.searchers)
            served = client.predict("query_tower", batch)["embedding"]
            local = load_tower(str(stack.query_tower))(batch)  # in-process, same SavedModel
            dim = load_tower(str(stack.query_tower)).dimension
            assert served.shape == (3, dim) and served.dtype == np.float32
            np.testing.assert_allclose(served, local, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, rtol=1e-4)
            assert not np.allclose(served[0], served[1])  # inputs reach the embedding
            # A MULTI input sent as [B] is refused with INVALID_ARGUMENT, and serving goes on.
            bad = dict(batch, searcher_friends=as_string_array(["a", "b", "c"]))
            with pytest.raises(grpc.RpcError) as err:
                client.predict("query_tower", bad)
            assert err.value.code() == C.INVALID_ARGUMENT
            assert "searcher_friends" in err.value.details()
            np.testing.assert_allclose(client.predict("query_tower", batch)["embedding"], served)
    finally:
        handle.stop(grace=1)


def _reload(stub, *models, timeout=60):
    """HandleReloadConfigRequest with a ModelConfigList of (name, base_path[, policy, labels])."""
    from tensorflow_serving.apis import model_management_pb2
    from tensorflow_serving.config import model_server_config_pb2

    request = model_management_pb2.ReloadConfigRequest()
    for name, base_path, *rest in models:
        entry = request.config.model_config_list.config.add(
            name=name, base_path=str(base_path), model_platform="tensorflow")
        policy = rest[0] if rest else None
        if policy == "all":
            entry.model_version_policy.all.SetInParent()
        elif isinstance(policy, list):
            entry.model_version_policy.specific.versions.extend(policy)
        elif isinstance(policy, int):
            entry.model_version_policy.latest.num_versions = policy
        for label, version in (rest[1] if len(rest) > 1 else {}).items():
            entry.version_labels[label] = version
    return stub.HandleReloadConfigRequest(request, timeout=timeout)


def test_reload_config_as_tf_serving(tmp_path):
    """HandleReloadConfigRequest: the ModelConfigList replaces the models (left-out ones
    unload, new ones load before the answer), version policies and labels apply; invalid
    configs are refused with TF Serving's codes and change nothing, a new model that does not
    load or a label on an unavailable version answers an error (the config stays applied, as
    in server_core.cc)."""
    from tensorflow_serving.apis import model_management_pb2
    from tensorflow_serving.config import model_server_config_pb2

    base = tmp_path / "models"
    publish(base, 1)
    publish(base, 2)
    other = tmp_path / "elsewhere"
    publish(other, 1, name="other")
    publish(other, 3, name="other")
    handle = start_model_server(base, 0, poll_seconds=0.1)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        client = ModelClient(f"127.0.0.1:{handle.port}", timeout=10)
        assert handle.registry.available() == {"toy": [2]}

        # A new model with two versions (specific policy) and a label; toy stays, latest 2.
        response = _reload(stub, ("toy", base / "toy", 2),
                           ("other", other / "other", [1, 3], {"stable": 1}))
        assert response.status.error_code == 0
        assert handle.registry.available() == {"toy": [2, 1], "other": [3, 1]}  # before answering
        x = {"x": np.ones((1, 3), np.float32)}
        assert client.predict_with_version("other", x, signature="double")[1] == 3
        by_label = toy_request(name="other")
        by_label.model_spec.version_label = "stable"
        out = client.predictions.Predict(by_label, timeout=10)
        assert out.model_spec.version.value == 1

        # Left out: unloaded (NOT_FOUND), even though its directory is still there.
        _reload(stub, ("other", other / "other", "all"))
        wait_for(lambda: handle.registry.available() == {"other": [3, 1]}, what="toy unloaded")
        assert rpc_code(client.predictions.Predict, toy_request())[0] == C.NOT_FOUND
        by_label.model_spec.version_label = "stable"  # labels went with the old config
        assert rpc_code(client.predictions.Predict, by_label)[0] == C.INVALID_ARGUMENT
        publish(base, 3)  # the base path of a left-out model is no longer polled
        time.sleep(0.5)
        assert "toy" not in handle.registry.available()

        # Refused: duplicates, relative paths, no platform, another config kind (nothing
        # changes); a new model that does not load, a label on a version not available.
        def refused(make, code, words):
            with pytest.raises(grpc.RpcError) as e:
                make()
            assert e.value.code() == code, e.value.details()
            assert words in e.value.details()
        refused(lambda: _reload(stub, ("a", other / "other"), ("a", other / "other")),
                C.INVALID_ARGUMENT, "Illegal to list model a multiple times in config list")
        refused(lambda: _reload(stub, ("a", "relative/path")), C.INVALID_ARGUMENT,
                "Expected model a to have an absolute path or URI")
        request = model_management_pb2.ReloadConfigRequest()
        request.config.model_config_list.config.add(name="a", base_path=str(other / "other"))
        refused(lambda: stub.HandleReloadConfigRequest(request, timeout=10), C.INVALID_ARGUMENT,
                "model_platform")
        request = model_management_pb2.ReloadConfigRequest()
        request.config.custom_model_config.Pack(model_server_config_pb2.ModelConfigList())
        refused(lambda: stub.HandleReloadConfigRequest(request, timeout=10), C.INVALID_ARGUMENT,
                "Only ModelConfigList is currently supported")
        refused(lambda: _reload(stub, ("other", other / "other", "all"),
                                ("ghost", tmp_path / "nothing-here")),
                C.UNKNOWN, "Some models did not become available")
        refused(lambda: _reload(stub, ("other", other / "other", 1, {"stable": 1})),
                C.FAILED_PRECONDITION, "not currently available")
        # An empty config takes no action (server_core.cc).
        empty = stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(),
                                               timeout=10)
        assert empty.status.error_code == 0
        assert client.predict_with_version("other", x, signature="double")[1] == 3
        channel.close()
        client.close()
    finally:
        handle.stop(grace=1)


def test_pinned_version_stays_loaded_beyond_the_version_policy(tmp_path):
    """A version named in GetModelStatus with `ebr-keep-loaded-seconds` stays served while the
    pin lasts (and loads again when it was not), whatever `--num-versions` says; then the
    latest policy retires it."""
    base = tmp_path / "models"
    publish(base, 1)
    handle = start_model_server(base, 0, poll_seconds=0.1)  # latest 1
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        client = ModelClient(f"127.0.0.1:{handle.port}", timeout=10)

        def pin(version, seconds):
            request = get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = "toy"
            request.model_spec.version.value = version
            return stub.GetModelStatus(request, timeout=10,
                                       metadata=(("ebr-keep-loaded-seconds", str(seconds)),))

        assert pin(1, 60).model_version_status[0].state == 30  # AVAILABLE
        publish(base, 2)
        wait_for(lambda: handle.registry.available() == {"toy": [2, 1]}, what="v2 beside v1")
        assert ':ebr:model_server:pinned_versions{model_name="toy"} 1.0' in \
            handle.metrics.exposition().decode()
        assert client.predict_with_version("toy", {"x": np.ones((1, 3), np.float32)},
                                           signature="double", version=1)[1] == 1
        # Latest (no version) is the newest; a renewal replaces the expiry: once the pin
        # lapses the policy retires v1.
        assert client.predict_with_version("toy", {"x": np.ones((1, 3), np.float32)},
                                           signature="double")[1] == 2
        pin(1, 0.3)
        wait_for(lambda: handle.registry.available() == {"toy": [2]}, what="pin lapsed")
        # Pinning a committed version that is not loaded loads it again.
        assert [s.state for s in pin(1, 30).model_version_status] == [50]  # END: unloaded
        wait_for(lambda: handle.registry.available() == {"toy": [2, 1]}, what="v1 reloaded")
        with pytest.raises(grpc.RpcError) as e:
            stub.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(), timeout=10,
                                metadata=(("ebr-keep-loaded-seconds", "x"),))
        assert e.value.code() == C.INVALID_ARGUMENT
        channel.close()
        client.close()
    finally:
        handle.stop(grace=1)
