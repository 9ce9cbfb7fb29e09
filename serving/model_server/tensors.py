"""TensorProto <-> numpy for the model server and its clients.

Requests arrive as `tensorflow.TensorProto`s inside PredictRequest.inputs; they are decoded with
`tf.make_ndarray` after checks that keep a hostile proto from costing unbounded memory (a proto
may declare shape [10^9] with one value, which TF broadcasts). Responses are encoded the way TF
Serving encodes them by default (typed `*_val` fields, not `tensor_content`), so clients that
read `outputs["y"].float_val` directly see what they would see from TF Serving.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

# Dtypes a request may carry. Resource/variant/quantized/ref types never make sense as inputs.
_DECODABLE = {
    types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_INT32, types_pb2.DT_UINT8,
    types_pb2.DT_INT16, types_pb2.DT_INT8, types_pb2.DT_STRING, types_pb2.DT_INT64,
    types_pb2.DT_BOOL, types_pb2.DT_UINT16, types_pb2.DT_HALF, types_pb2.DT_UINT32,
    types_pb2.DT_UINT64, types_pb2.DT_COMPLEX64, types_pb2.DT_COMPLEX128,
}
# Typed field for each dtype, and how many of its entries make one element.
_FIELD = {
    types_pb2.DT_FLOAT: ("float_val", 1), types_pb2.DT_DOUBLE: ("double_val", 1),
    types_pb2.DT_INT32: ("int_val", 1), types_pb2.DT_UINT8: ("int_val", 1),
    types_pb2.DT_INT16: ("int_val", 1), types_pb2.DT_INT8: ("int_val", 1),
    types_pb2.DT_UINT16: ("int_val", 1), types_pb2.DT_HALF: ("half_val", 1),
    types_pb2.DT_STRING: ("string_val", 1), types_pb2.DT_INT64: ("int64_val", 1),
    types_pb2.DT_BOOL: ("bool_val", 1), types_pb2.DT_UINT32: ("uint32_val", 1),
    types_pb2.DT_UINT64: ("uint64_val", 1), types_pb2.DT_COMPLEX64: ("scomplex_val", 2),
    types_pb2.DT_COMPLEX128: ("dcomplex_val", 2),
}


class TensorError(ValueError):
    """A TensorProto that cannot be decoded; the server answers INVALID_ARGUMENT."""


def dtype_name(enum: int) -> str:
    """TF's short dtype name ("float", "string") as TF Serving prints it in its errors."""
    try:
        name = tf.dtypes.as_dtype(enum).name
        return {"float32": "float", "float64": "double"}.get(name, name)
    except (TypeError, ValueError):
        return "invalid" if enum == 0 else f"dtype enum {enum}"


def proto_to_ndarray(proto: tensor_pb2.TensorProto, *, name: str = "",
                     max_bytes: int = 1 << 30) -> np.ndarray:
    """Decodes one request tensor; `max_bytes` bounds the decoded size (elements x item size)."""
    where = f'input "{name}"' if name else "tensor"
    if proto.dtype not in _DECODABLE:
        raise TensorError(f"{where}: unsupported dtype {dtype_name(proto.dtype)}")
    if proto.tensor_shape.unknown_rank:
        raise TensorError(f"{where}: tensor_shape has unknown rank")
    count = 1
    for dim in proto.tensor_shape.dim:
        if dim.size < 0:
            raise TensorError(f"{where}: negative dimension {dim.size} in tensor_shape")
        count *= dim.size
        if count > max_bytes:  # early exit before the product overflows anything
            break
    dtype = tf.dtypes.as_dtype(proto.dtype)
    field, per_element = _FIELD[proto.dtype]
    values = getattr(proto, field)
    if proto.dtype == types_pb2.DT_STRING:
        if proto.tensor_content:
            raise TensorError(f"{where}: string tensors cannot use tensor_content")
        size = count * 8 + sum(len(v) for v in values)
    else:
        size = count * dtype.size
    if size > max_bytes:
        raise TensorError(f"{where}: decoded tensor would take {size} bytes, above the limit "
                          f"of {max_bytes}")
    if proto.tensor_content:
        if len(proto.tensor_content) != count * dtype.size:
            raise TensorError(f"{where}: tensor_content has {len(proto.tensor_content)} bytes, "
                              f"shape needs {count * dtype.size}")
    elif len(values) > count * per_element or len(values) % per_element:
        raise TensorError(f"{where}: {len(values)} values in {field} do not fit shape "
                          f"{[d.size for d in proto.tensor_shape.dim]}")
    try:
        return tf.make_ndarray(proto)
    except Exception as e:  # noqa: BLE001 - any decode failure is the client's bad proto
        raise TensorError(f"{where}: cannot decode TensorProto: {e}") from e


def ndarray_to_proto(value, dtype=None, *, use_tensor_content: bool = False
                     ) -> tensor_pb2.TensorProto:
    """Encodes an array (or anything `np.asarray` takes); strings become DT_STRING bytes."""
    arr = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    if arr.dtype.kind == "U":
        arr = np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(arr)
    proto = tf.make_tensor_proto(arr, dtype=dtype)
    if use_tensor_content or not proto.tensor_content or proto.dtype not in _FIELD:
        return proto
    # TF Serving's default reply (AsProtoField): values in the typed field.
    field, _ = _FIELD[proto.dtype]
    flat = tf.make_ndarray(proto).ravel()
    if proto.dtype in (types_pb2.DT_COMPLEX64, types_pb2.DT_COMPLEX128):
        flat = np.stack([flat.real, flat.imag], axis=-1).ravel()
    elif proto.dtype == types_pb2.DT_HALF:
        flat = flat.view(np.uint16)
    proto.ClearField("tensor_content")
    getattr(proto, field).extend(flat.tolist())
    return proto
