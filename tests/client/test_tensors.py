"""The Tensor codec round-trips every API dtype and rejects inconsistent messages."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from alignd.tensors import TensorError, from_numpy, from_ragged, to_numpy, to_ragged
from alignd.v1 import common_pb2 as pb

DTYPES = ["float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"]
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


@st.composite
def arrays(draw):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    elements = None
    if dtype.kind == "f":
        elements = st.floats(allow_nan=False, width=dtype.itemsize * 8)
    return draw(hnp.arrays(dtype, draw(shapes), elements=elements))


@given(arrays())
def test_round_trip_is_exact_for_every_dtype_and_shape(array):
    tensor = from_numpy(array)
    back = to_numpy(tensor)
    assert back.dtype == array.dtype
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


@given(arrays())
def test_round_trip_survives_serialization(array):
    wire = pb.Tensor.FromString(from_numpy(array).SerializeToString())
    np.testing.assert_array_equal(to_numpy(wire), array)


def test_decode_is_zero_copy_and_read_only():
    tensor = from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    view = to_numpy(tensor)
    assert not view.flags.owndata
    assert not view.flags.writeable


def test_big_endian_and_non_contiguous_inputs_encode_as_little_endian():
    big = np.arange(5, dtype=">i4")[::2]
    tensor = from_numpy(big)
    assert tensor.dtype == pb.DTYPE_INT32
    assert tensor.data == np.array([0, 2, 4], dtype="<i4").tobytes()


def test_scalar_has_empty_shape_and_one_element():
    tensor = from_numpy(np.float32(2.5))
    assert list(tensor.shape) == []
    assert to_numpy(tensor).item() == 2.5


@given(hnp.arrays(np.float32, shapes, elements=st.floats(width=32, allow_nan=False)))
def test_bfloat16_rounds_to_nearest_even_and_decodes_to_float32(array):
    back = to_numpy(from_numpy(array, pb.DTYPE_BFLOAT16))
    assert back.dtype == np.float32
    # Expected: keep the top 16 bits after adding the round-to-nearest-even bias.
    bits = array.reshape(-1).view(np.uint32).astype(np.uint64)
    expected = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).astype(np.uint32)
    np.testing.assert_array_equal(back.reshape(-1).view(np.uint32), expected)


def test_bfloat16_exact_values_and_nan():
    values = np.array([1.0, -2.0, 0.15625, np.inf, np.nan], dtype=np.float32)
    back = to_numpy(from_numpy(values, pb.DTYPE_BFLOAT16))
    np.testing.assert_array_equal(back[:4], values[:4])
    assert np.isnan(back[4])
    # 1 + 2^-8 lies exactly between two bfloat16 values: ties go to the even one (1.0).
    assert to_numpy(from_numpy(np.float32(1 + 2**-8), pb.DTYPE_BFLOAT16)).item() == 1.0


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3], data=b"\0" * 8), "data: 8 bytes"),
        (pb.Tensor(dtype=pb.DTYPE_INT64, shape=[2, 2], data=b"\0" * 8), "needs 32"),
        (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\0"), "dtype"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[-1], data=b""), "shape"),
        (pb.Tensor(dtype=99, shape=[0], data=b""), "dtype"),
        # Zero elements, but no array can have that shape: numpy's own error must not escape.
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[0, 2**63 - 1], data=b""), "larger than any"),
        (pb.Tensor(dtype=pb.DTYPE_INT8, shape=[0, 2**40, 2**40], data=b""), "larger than any"),
    ],
)
def test_inconsistent_tensors_are_rejected_with_the_field_named(tensor, message):
    with pytest.raises(TensorError, match=message):
        to_numpy(tensor)


def test_zero_element_tensors_of_a_possible_shape_decode():
    assert to_numpy(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[0, 2**31], data=b"")).shape == (
        0,
        2**31,
    )


def test_unsupported_numpy_dtype_is_rejected():
    with pytest.raises(TensorError, match="unsupported numpy dtype complex64"):
        from_numpy(np.zeros(2, dtype=np.complex64))


ragged_rows = st.lists(
    hnp.arrays(np.int32, st.integers(0, 7), elements=st.integers(-(2**31), 2**31 - 1)),
    max_size=6,
)


@given(ragged_rows)
def test_ragged_round_trip(rows):
    ragged = from_ragged(rows, pb.DTYPE_INT32)
    assert list(ragged.lengths) == [len(r) for r in rows]
    back = to_ragged(pb.RaggedTensor.FromString(ragged.SerializeToString()))
    assert len(back) == len(rows)
    for got, want in zip(back, rows, strict=True):
        np.testing.assert_array_equal(got, want)


def test_ragged_empty_batch_and_empty_rows():
    assert to_ragged(from_ragged([])) == []
    rows = to_ragged(from_ragged([np.zeros(0, np.float32), np.ones(2, np.float32)]))
    assert [r.tolist() for r in rows] == [[], [1.0, 1.0]]


@pytest.mark.parametrize(
    ("lengths", "message"),
    [([2, 2], "sum to 4, but values has 3"), ([4, -1], "must be >= 0")],
)
def test_ragged_inconsistent_lengths_are_rejected(lengths, message):
    ragged = pb.RaggedTensor(values=from_numpy(np.arange(3, dtype=np.int32)), lengths=lengths)
    with pytest.raises(TensorError, match=message):
        to_ragged(ragged)


def test_ragged_rows_must_be_one_dimensional():
    with pytest.raises(TensorError, match=r"rows\[1\]: must be 1-D"):
        from_ragged([np.zeros(2), np.zeros((2, 2))])
    bad = pb.RaggedTensor(values=from_numpy(np.zeros((2, 2))), lengths=[4])
    with pytest.raises(TensorError, match="values: must be 1-D"):
        to_ragged(bad)


@given(
    st.integers(-3, 12),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=70),
    st.binary(max_size=64),
)
def test_arbitrary_messages_decode_or_raise_tensor_error(dtype, shape, data):
    tensor = pb.Tensor(dtype=dtype, shape=shape, data=data)
    try:
        array = to_numpy(tensor)
    except TensorError:
        return
    assert array.nbytes == len(data) or tensor.dtype == pb.DTYPE_BFLOAT16


@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5), st.integers(0, 8))
def test_arbitrary_ragged_lengths_decode_or_raise_tensor_error(lengths, count):
    ragged = pb.RaggedTensor(values=from_numpy(np.zeros(count, np.int32)), lengths=lengths)
    try:
        rows = to_ragged(ragged)
    except TensorError:
        return
    assert [len(r) for r in rows] == lengths


@pytest.mark.parametrize(
    ("values", "dtype", "message"),
    [
        (np.array([2**40]), pb.DTYPE_INT32, "do not fit int32"),
        (np.array([300.0]), pb.DTYPE_UINT8, "do not fit uint8"),
        (np.array([1.5]), pb.DTYPE_INT32, "non-integer"),
        (np.array([-1]), pb.DTYPE_UINT8, "do not fit uint8"),
    ],
)
def test_narrowing_casts_that_change_values_are_refused(values, dtype, message):
    with pytest.raises(TensorError, match=message):
        from_numpy(values, dtype)


def test_lossless_narrowing_casts_are_allowed():
    assert to_numpy(from_numpy(np.array([1, 2**31 - 1]), pb.DTYPE_INT32)).tolist() == [1, 2**31 - 1]
    assert to_numpy(from_numpy(np.array([3.0]), pb.DTYPE_INT32)).tolist() == [3]
