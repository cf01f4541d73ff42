"""MLX arrays as raw bytes + dtype + shape for the wire (bfloat16 included)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..types import WireTensor

_MX = {
    "float32": mx.float32,
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
    "int32": mx.int32,
    "int64": mx.int64,
    "uint32": mx.uint32,
}
_NP = {
    "float32": np.float32,
    "float16": np.float16,
    "int32": np.int32,
    "int64": np.int64,
    "uint32": np.uint32,
}


def dtype_name(dtype: mx.Dtype) -> str:
    for name, value in _MX.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported dtype on the wire: {dtype}")


def to_wire(array: mx.array) -> WireTensor:
    """Evaluates `array` (call on the MLX thread) and copies it out as little-endian bytes."""
    name = dtype_name(array.dtype)
    # numpy has no bfloat16: ship its bits as uint16.
    view = array.view(mx.uint16) if name == "bfloat16" else array
    return WireTensor(np.asarray(view).tobytes(), name, tuple(array.shape))


def from_wire(tensor: WireTensor) -> mx.array:
    shape = tensor.shape
    if tensor.dtype == "bfloat16":
        bits = np.frombuffer(tensor.data, dtype=np.uint16).reshape(shape)
        return mx.array(bits).view(mx.bfloat16)
    if tensor.dtype not in _NP:
        raise ValueError(f"unsupported dtype on the wire: {tensor.dtype!r}")
    return mx.array(np.frombuffer(tensor.data, dtype=_NP[tensor.dtype]).reshape(shape))
