"""numpy <-> ``alignd.v1.Tensor`` / ``RaggedTensor`` codec.

Tensors travel as little-endian raw bytes with a dtype and a shape. Decoding is zero-copy:
``to_numpy`` returns a read-only view over the message's bytes (``numpy.frombuffer``), except
for bfloat16, which numpy lacks and which is widened to float32 exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from alignd.v1 import common_pb2 as pb

__all__ = [
    "TensorError",
    "from_numpy",
    "from_ragged",
    "to_numpy",
    "to_ragged",
]

MAX_DIMS = 32  # numpy's limit is 64; no API tensor needs more than a few
MAX_ELEMENT_BYTES = 2**62  # product of the non-zero dimensions x item size, below numpy's limit

# Wire dtype -> numpy dtype (little-endian). bfloat16 travels as its raw 16 bits.
_NUMPY: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_BFLOAT16: np.dtype("<u2"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT8: np.dtype("i1"),
    pb.DTYPE_UINT8: np.dtype("u1"),
    pb.DTYPE_BOOL: np.dtype("?"),
}
_WIRE: dict[str, int] = {
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "float64": pb.DTYPE_FLOAT64,
    "int64": pb.DTYPE_INT64,
    "int32": pb.DTYPE_INT32,
    "int8": pb.DTYPE_INT8,
    "uint8": pb.DTYPE_UINT8,
    "bool": pb.DTYPE_BOOL,
}


class TensorError(ValueError):
    """A Tensor message is inconsistent (dtype, shape and byte length disagree)."""


def _wire_dtype(array: np.ndarray, dtype: int | None) -> int:
    if dtype is not None:
        if dtype not in _NUMPY:
            raise TensorError(f"unsupported wire dtype {pb.DType.Name(dtype)}")
        return dtype
    try:
        return _WIRE[array.dtype.name]
    except KeyError:
        supported = ", ".join(_WIRE)
        raise TensorError(
            f"unsupported numpy dtype {array.dtype} (supported: {supported})"
        ) from None


def _to_bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits with round-to-nearest-even (NaN stays NaN)."""
    bits = np.ascontiguousarray(array, dtype="<f4").view("<u4")
    rounding = ((bits >> 16) & 1) + 0x7FFF
    rounded = ((bits + rounding) >> 16).astype("<u2")
    nan = np.isnan(array)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype("<u2")
    return rounded


def _check_lossless(array: np.ndarray, target: np.dtype) -> None:
    """Refuses casts that would change values: out-of-range integers, floats to integers."""
    if array.size == 0 or array.dtype == target:
        return
    integral = np.isfinite(array).all() and np.array_equal(array, np.round(array))
    if target.kind in "iub" and array.dtype.kind == "f" and not integral:
        raise TensorError(f"cannot send non-integer {array.dtype} values as {target}")
    if target.kind in "iu" and array.dtype.kind in "iuf":
        info = np.iinfo(target)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise TensorError(
                f"values in [{low}, {high}] do not fit {target.name} [{info.min}, {info.max}]"
            )


def from_numpy(array: np.ndarray | Sequence, dtype: int | None = None) -> pb.Tensor:
    """Encodes an array as a Tensor message.

    Args:
        array: any array-like; converted with ``numpy.asarray``.
        dtype: wire dtype (``alignd.v1.DTYPE_*``); default inferred from ``array.dtype``.
            ``DTYPE_BFLOAT16`` rounds float values to bfloat16.

    Returns:
        The Tensor, with C-order little-endian bytes.

    Raises:
        TensorError: the dtype is not one the API uses, or a value does not fit the wire dtype.
    """
    array = np.asarray(array)
    wire = _wire_dtype(array, dtype)
    if wire == pb.DTYPE_BFLOAT16:
        data = _to_bfloat16_bits(array.astype(np.float32, copy=False))
    else:
        target = _NUMPY[wire]
        _check_lossless(array, target)
        data = np.ascontiguousarray(array, dtype=target)
    return pb.Tensor(dtype=wire, shape=array.shape, data=data.tobytes())


def to_numpy(tensor: pb.Tensor) -> np.ndarray:
    """Decodes a Tensor message without copying its bytes.

    Returns:
        A read-only array view of ``tensor.data`` with the tensor's shape (bfloat16 is returned
        as a new float32 array, exactly).

    Raises:
        TensorError: unknown dtype, a negative dimension, a shape too large for any array (even
            with zero elements), or a byte length that does not match the shape and dtype.
    """
    if tensor.dtype not in _NUMPY:
        raise TensorError(f"dtype: unsupported value {tensor.dtype}")
    np_dtype = _NUMPY[tensor.dtype]
    shape = tuple(tensor.shape)
    if len(shape) > MAX_DIMS:
        raise TensorError(f"shape: {len(shape)} dimensions, at most {MAX_DIMS}")
    if any(d < 0 for d in shape):
        raise TensorError(f"shape: dimensions must be >= 0, got {list(shape)}")
    count = math.prod(shape)  # Python ints: no overflow
    expected = count * np_dtype.itemsize
    if len(tensor.data) != expected:
        raise TensorError(
            f"data: {len(tensor.data)} bytes, but shape {list(shape)} of "
            f"{pb.DType.Name(tensor.dtype)} needs {expected}"
        )
    nonzero = math.prod(d for d in shape if d)  # numpy refuses shapes whose size overflows,
    if nonzero * np_dtype.itemsize >= MAX_ELEMENT_BYTES:  # even with a zero dimension
        raise TensorError(f"shape: {list(shape)} is larger than any array can be")
    array = np.frombuffer(tensor.data, dtype=np_dtype, count=count).reshape(shape)
    if tensor.dtype == pb.DTYPE_BFLOAT16:
        return (array.astype("<u4") << 16).view("<f4")
    return array


def from_ragged(rows: Sequence[np.ndarray | Sequence], dtype: int | None = None) -> pb.RaggedTensor:
    """Encodes a list of 1-D rows of different lengths as flat values plus lengths.

    Args:
        rows: 1-D array-likes; an empty list gives an empty batch.
        dtype: wire dtype; default inferred from the concatenated values (float64 for an
            all-empty batch of Python lists unless given).

    Raises:
        TensorError: a row is not 1-D.
    """
    arrays = [np.asarray(r) for r in rows]
    for i, a in enumerate(arrays):
        if a.ndim != 1:
            raise TensorError(f"rows[{i}]: must be 1-D, got shape {list(a.shape)}")
    lengths = [a.shape[0] for a in arrays]
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.float32)
    return pb.RaggedTensor(values=from_numpy(flat, dtype), lengths=lengths)


def to_ragged(ragged: pb.RaggedTensor) -> list[np.ndarray]:
    """Decodes a RaggedTensor into a list of 1-D views of its flat values.

    Raises:
        TensorError: values are not 1-D, a length is negative, or lengths do not sum to the
            number of values.
    """
    values = to_numpy(ragged.values) if ragged.HasField("values") else np.zeros(0, np.float32)
    if values.ndim != 1:
        raise TensorError(f"values: must be 1-D, got shape {list(values.shape)}")
    lengths = np.asarray(ragged.lengths, dtype=np.int64)
    if (lengths < 0).any():
        raise TensorError("lengths: every length must be >= 0")
    total = sum(int(n) for n in ragged.lengths)  # Python ints: no overflow
    if total != values.shape[0]:
        raise TensorError(f"lengths: sum to {total}, but values has {values.shape[0]} elements")
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(lengths))]
