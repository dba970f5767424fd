"""Validation of ragged token batches, shared by every RPC that takes token ids."""

from __future__ import annotations

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


def positive(message, field: str, *, default: float) -> float:
    """An optional float field that must be finite and > 0 when set; ``default`` when unset."""
    if not message.HasField(field):
        return default
    value = getattr(message, field)
    if not np.isfinite(value) or value <= 0:
        raise InvalidArgument(field, f"must be a finite number > 0, got {value}")
    return float(value)
