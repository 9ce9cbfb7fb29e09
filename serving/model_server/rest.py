"""TF Serving's REST API for the model server (optional, `--rest-port`).

Routes as in TF Serving's `tensorflow_serving/model_servers/http_rest_api_handler.cc`
(upstream repository tensorflow/serving):
  GET  /v1/models/NAME[/versions/V|/labels/L]            -> GetModelStatus as JSON
  GET  /v1/models/NAME[/versions/V|/labels/L]/metadata   -> GetModelMetadata as JSON
  POST /v1/models/NAME[/versions/V|/labels/L]:predict    -> {"instances": [...]} (row) or
                                                            {"inputs": ...} (columnar)
  GET  /monitoring/prometheus/metrics
Errors are `{"error": "..."}` with the HTTP status that upstream file maps each gRPC code to.
The same handlers as the gRPC front end (`serving.model_server.handlers`) do the work.
"""
from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
from google.protobuf import json_format
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_pb2)

from serving.model_server import handlers as model_handlers
from serving.model_server.metrics import ModelServerMetrics
from serving.model_server.registry import ModelRegistry, ServingError

log = logging.getLogger(__name__)

HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_ROUTE = re.compile(r"^/v1/models/(?P<name>[^/:]+)"
                    r"(?:/versions/(?P<version>-?\d+)|/labels/(?P<label>[^/:]+))?"
                    r"(?:(?P<metadata>/metadata)|:(?P<verb>[A-Za-z]+))?/?$")


def _bad(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


# ---- JSON <-> numpy ---------------------------------------------------------------------------
def _decode_strings(value, where: str):
    if isinstance(value, list):
        return [_decode_strings(v, where) for v in value]
    if isinstance(value, dict):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise _bad(f"{where}: a JSON object in a string tensor must be {{\"b64\": \"...\"}}")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except ValueError as e:
            raise _bad(f"{where}: invalid base64: {e}") from e
    if isinstance(value, str):
        return value.encode("utf-8")
    raise _bad(f"{where}: expected a string, got {json.dumps(value)[:50]}")


def _nested_shape(value) -> tuple[int, ...]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return tuple(shape)


def json_to_array(value, info, where: str) -> np.ndarray:
    """One JSON value as the TensorInfo's dtype; ragged lists are refused."""
    import tensorflow as tf

    dtype = tf.dtypes.as_dtype(info.dtype)
    try:
        if dtype == tf.string:
            decoded = _decode_strings(value, where)
            arr = np.array(decoded, dtype=object)
            if arr.shape != _nested_shape(decoded):  # numpy nests ragged lists as objects
                raise _bad(f"{where}: ragged or mixed nesting (shapes differ between elements)")
            return arr
        if dtype.as_numpy_dtype is None or not (dtype.is_integer or dtype.is_floating
                                                or dtype.is_bool):
            raise _bad(f"{where}: dtype {dtype.name} is not supported over REST")
        if dtype.is_bool:
            arr = np.array(value)
            if arr.dtype != np.bool_:
                raise _bad(f"{where}: expected booleans")
            return arr
        return np.array(value, dtype=dtype.as_numpy_dtype)
    except ServingError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise _bad(f"{where}: cannot convert to {dtype.name}: {e}") from e


def _to_json(arr: np.ndarray, name: str):
    if arr.dtype == object:
        if name.endswith("_bytes"):  # TF Serving's convention for binary outputs
            return np.vectorize(lambda b: {"b64": base64.b64encode(b).decode()},
                                otypes=[object])(arr).tolist()
        return np.vectorize(lambda b: b.decode("utf-8", "replace"), otypes=[object])(arr).tolist()
    return arr.tolist()


def parse_predict_body(body: dict, sig) -> tuple[dict, bool]:
    """{input name: np.ndarray} from a row (`instances`) or columnar (`inputs`) request."""
    names = sorted(sig.inputs)
    if ("instances" in body) == ("inputs" in body):
        raise _bad("JSON Value must have exactly one of 'instances' (row format) or 'inputs' "
                   "(columnar format)")
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise _bad("'instances' must be a non-empty JSON list")
        named = all(isinstance(i, dict) and set(i) != {"b64"} for i in instances)
        if not named:
            if len(names) != 1:
                raise _bad(f"'instances' hold unnamed values but the signature takes "
                           f"{len(names)} inputs {names}: use objects keyed by input name")
            return {names[0]: json_to_array(instances, sig.inputs[names[0]], "instances")}, True
        columns = {}
        for i, inst in enumerate(instances):
            if set(inst) != set(names):
                raise _bad(f"instances[{i}]: keys {sorted(inst)} differ from the signature's "
                           f"inputs {names}")
        for n in names:
            columns[n] = json_to_array([inst[n] for inst in instances], sig.inputs[n],
                                       f"instances[*].{n}")
        return columns, True
    inputs = body["inputs"]
    if isinstance(inputs, dict) and set(inputs) != {"b64"}:
        # Unknown names are kept so run_signature reports them as TF Serving does.
        return {n: json_to_array(v, sig.inputs[n], f"inputs.{n}") if n in sig.inputs
                else None for n, v in inputs.items()}, False
    if len(names) != 1:
        raise _bad(f"'inputs' holds one unnamed value but the signature takes {names}")
    return {names[0]: json_to_array(inputs, sig.inputs[names[0]], "inputs")}, False


def format_predict(outputs: dict, row: bool) -> dict:
    if not row:
        if len(outputs) == 1:
            (name, arr), = outputs.items()
            return {"outputs": _to_json(arr, name)}
        return {"outputs": {n: _to_json(a, n) for n, a in outputs.items()}}
    if len(outputs) == 1:
        (name, arr), = outputs.items()
        return {"predictions": _to_json(arr, name)}
    batch = {a.shape[0] if a.ndim else -1 for a in outputs.values()}
    if len(batch) != 1 or -1 in batch:
        raise _bad("row format needs every output to have the same batch size; "
                   "use the columnar 'inputs' format")
    cols = {n: _to_json(a, n) for n, a in outputs.items()}
    return {"predictions": [{n: cols[n][i] for n in cols} for i in range(batch.pop())]}


# ---- server ------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server_version = "ebr-model-server"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # route access logs through logging at debug level
        log.debug("%s - " + fmt, self.address_string(), *args)

    def _send(self, status: int, payload, content_type="application/json") -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        rest = self.server.ebr
        path = self.path.split("?", 1)[0]
        if path == "/monitoring/prometheus/metrics" and method == "GET":
            return self._send(200, rest.metrics.exposition(), "text/plain; version=0.0.4")
        m = _ROUTE.match(path)
        if m is None:
            return self._send(404, {"error": f"Malformed request: {method} {path}"})
        started = time.perf_counter()
        name = m["name"]
        api = ("GetModelMetadata" if m["metadata"] else m["verb"] or "GetModelStatus")
        code = grpc.StatusCode.OK
        try:
            spec = model_pb2.ModelSpec(name=name, version_label=m["label"] or "")
            if m["version"] is not None:
                spec.version.value = int(m["version"])
            if m["verb"]:
                if method != "POST":
                    raise _bad(f"{m['verb']} needs POST")
                if m["verb"] in ("classify", "regress"):
                    raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                                       f"{m['verb']} is not implemented by this server")
                if m["verb"] != "predict":
                    raise _bad(f"Unknown method: {m['verb']}")
                payload = self._predict(spec, rest)
            elif method != "GET":
                raise _bad(f"{path} needs GET")
            elif m["metadata"]:
                payload = self._metadata(spec, rest)
            else:
                response = model_handlers.model_status(
                    rest.registry, get_model_status_pb2.GetModelStatusRequest(model_spec=spec))
                payload = json_format.MessageToDict(
                    response, preserving_proto_field_name=True,
                    always_print_fields_with_no_presence=True)
            self._send(200, payload)
        except ServingError as e:
            code = e.code
            self.close_connection = True  # the body may be unread: do not reuse the stream
            self._send(HTTP_STATUS.get(e.code, 500), {"error": e.message})
        except Exception as e:  # noqa: BLE001 - a bug answers 500 and the server goes on
            code = grpc.StatusCode.INTERNAL
            log.exception("REST %s %s failed", method, path)
            self._send(500, {"error": f"{type(e).__name__}: {e}"})
        finally:
            rest.metrics.observe(name, api, "REST", code, time.perf_counter() - started)

    def _body(self, rest) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > rest.max_body_bytes:
            raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"request body of {length} bytes is over the limit of "
                               f"{rest.max_body_bytes}")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw or b"null")
        except ValueError as e:
            raise _bad(f"JSON Parse error: {e}") from e
        if not isinstance(body, dict):
            raise _bad("request body must be a JSON object")
        return body

    def _predict(self, spec, rest) -> dict:
        body = self._body(rest)
        sig_name = body.get("signature_name", "")
        if not isinstance(sig_name, str):
            raise _bad("'signature_name' must be a string")
        with model_handlers.acquire(rest.registry, spec) as servable:
            _, sig, _ = model_handlers.signature(servable, sig_name)
            inputs, row = parse_predict_body(body, sig)
            _, outputs = model_handlers.run_signature(servable, sig_name, inputs,
                                                      max_tensor_bytes=rest.max_body_bytes)
        return format_predict(outputs, row)

    def _metadata(self, spec, rest) -> dict:
        response = model_handlers.metadata(
            rest.registry, get_model_metadata_pb2.GetModelMetadataRequest(
                model_spec=spec, metadata_field=["signature_def"]))
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(sig_map)
        return {"model_spec": json_format.MessageToDict(response.model_spec,
                                                        preserving_proto_field_name=True,
                                                        always_print_fields_with_no_presence=True),
                "metadata": {"signature_def": json_format.MessageToDict(
                    sig_map, preserving_proto_field_name=True)}}


class RestServer:
    def __init__(self, registry: ModelRegistry, metrics: ModelServerMetrics, host: str,
                 port: int, max_body_bytes: int):
        self.registry, self.metrics, self.max_body_bytes = registry, metrics, max_body_bytes
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.ebr = self
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="model-rest",
                                        daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def start_rest_server(registry: ModelRegistry, metrics: ModelServerMetrics, *,
                      host: str = "127.0.0.1", port: int = 0,
                      max_body_bytes: int = 64 << 20) -> RestServer:
    return RestServer(registry, metrics, host, port, max_body_bytes)
