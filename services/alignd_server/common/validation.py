"""Validation of ragged token batches, shared by every RPC that takes token ids."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from alignd.tensors import TensorError, to_ragged
from alignd.v1 import common_pb2 as pb
from alignd_server.common.errors import InvalidArgument

TOKEN_DTYPES = (pb.DTYPE_INT32, pb.DTYPE_INT64)


def token_rows(
    ragged: pb.RaggedTensor,
    field: str,
    *,
    vocab_size: int,
    max_batch_size: int,
    max_length: int,
    min_length: int = 1,
) -> list[np.ndarray]:
    """Decodes and checks a ragged batch of token ids.

    Returns:
        One (T_i,) integer array per row (views of the message bytes).

    Raises:
        InvalidArgument: naming ``field`` (and the row) for a missing or malformed tensor, an
            empty or oversized batch, a row outside [min_length, max_length], or an id
            outside [0, vocab_size).
    """
    if not ragged.HasField("values"):
        raise InvalidArgument(f"{field}.values", "must be set")
    if ragged.values.dtype not in TOKEN_DTYPES:
        raise InvalidArgument(f"{field}.values.dtype", "must be DTYPE_INT32 (or DTYPE_INT64)")
    try:
        rows = to_ragged(ragged)
    except TensorError as err:
        raise InvalidArgument(field, str(err)) from None
    if not rows:
        raise InvalidArgument(f"{field}.lengths", "must not be empty")
    if len(rows) > max_batch_size:
        raise InvalidArgument(
            f"{field}.lengths", f"{len(rows)} sequences exceed max_batch_size {max_batch_size}"
        )
    lengths = np.asarray(ragged.lengths, dtype=np.int64)
    for bad in np.flatnonzero((lengths < min_length) | (lengths > max_length))[:1]:
        raise InvalidArgument(
            f"{field}[{bad}]",
            f"{lengths[bad]} tokens, must be {min_length} .. max_sequence_length {max_length}",
        )
    values = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    for flat in np.flatnonzero((values < 0) | (values >= vocab_size))[:1]:
        row = int(np.searchsorted(np.cumsum(lengths), flat, side="right"))
        raise InvalidArgument(
            f"{field}[{row}]", f"token id {int(values[flat])} is outside [0, {vocab_size})"
        )
    return rows


def prompt_lengths(
    values: Sequence[int], rows: Sequence[np.ndarray], field: str, *, min_prompt: int = 1
) -> np.ndarray:
    """Checks one prompt length per row, each in [min_prompt, len(row) - 1].

    Returns:
        (B,) int64 prompt lengths.
    """
    lengths = np.asarray(values, dtype=np.int64)
    if len(lengths) != len(rows):
        raise InvalidArgument(field, f"has {len(lengths)} values for {len(rows)} sequences")
    for i, (p, row) in enumerate(zip(lengths, rows, strict=True)):
        if not min_prompt <= p <= len(row) - 1:
            raise InvalidArgument(
                f"{field}[{i}]",
                f"{p} must be in [{min_prompt}, {len(row) - 1}] (sequence length - 1)",
            )
    return lengths


FLOAT32_MAX = float(np.finfo(np.float32).max)
MIN_TEMPERATURE = float(np.float32(0.01))
"""Smallest sampling/scoring temperature above 0 (0.01, as the float32 fields carry it): below
it logits / T overflows float32 on ordinary logits (vLLM raises smaller temperatures to the
same floor)."""
MAX_TEMPERATURE = 100.0
MAX_VERSION = 2**53 - 1
"""Largest weights version: exact as a float (Prometheus gauges, JSON)."""
MAX_VERSION_STEP = 2**32
"""Most a weight update may advance the version, so that no update can exhaust the range."""


def in_range(
    value: float, field: str, low: float, high: float, *, open_low: bool = False,
    open_high: bool = False,
) -> float:  # fmt: skip
    """``value`` as a float, checked to be finite and inside the interval.

    Raises:
        InvalidArgument: naming ``field`` and the interval.
    """
    above = low < value if open_low else low <= value
    below = value < high if open_high else value <= high
    if not (math.isfinite(value) and above and below):
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise InvalidArgument(field, f"must be in {interval}, got {value!r}")
    return float(value)


def optional_in_range(
    message, name: str, field: str, default: float, low: float, high: float, **open_ends: bool
) -> float:
    """An optional float field checked by :func:`in_range`; ``default`` when unset."""
    if not message.HasField(name):
        return default
    return in_range(getattr(message, name), field, low, high, **open_ends)


def temperature(message, field: str = "temperature") -> float:
    """An optional temperature in [MIN_TEMPERATURE, MAX_TEMPERATURE]; 1 when unset."""
    return optional_in_range(message, "temperature", field, 1.0, MIN_TEMPERATURE, MAX_TEMPERATURE)


def check_version(version: int, serving: int, field: str) -> int:
    """A new weights version: above ``serving``, at most MAX_VERSION_STEP above it and at most
    MAX_VERSION.

    Raises:
        InvalidArgument: naming ``field``.
    """
    if version <= serving:
        raise InvalidArgument(
            field, f"{version} must be greater than the serving version {serving}"
        )
    highest = min(serving + MAX_VERSION_STEP, MAX_VERSION)
    if version > highest:
        raise InvalidArgument(
            field,
            f"{version} is above {highest}: a version may advance at most {MAX_VERSION_STEP} "
            f"past the serving one and stay at most {MAX_VERSION}",
        )
    return version
