"""Hypothesis strategies for requests every service must refuse (or answer): the malformed
shapes of the API — tensors with zero elements and a huge dimension, tiny, huge and non-finite
floats, unknown enum values, extreme versions, hostile paths, empty and oversized batches, ids
outside the vocabulary, texts at and over the byte bound, chats with empty roles — mixed into
otherwise valid requests, so that they reach the code behind the first check.

A request is built by a function of :class:`Fields`, which draws each field valid or wild.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from hypothesis import strategies as st

from alignd.v1 import common_pb2 as pb

MiB = 1024 * 1024
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


# -- fields ----------------------------------------------------------------------------------


class Fields:
    """Draws the fields of one request, each either valid or wild.

    A third of the requests are valid in every field (they reach the model, and whatever the
    request can change); the others draw each field wild with a chance of 1/8, 1/4, 1/2 or 1,
    so that many requests carry one bad field behind otherwise good ones and get past the
    first checks, and some are wild throughout.

    Args:
        draw: the ``draw`` of a composite strategy.
    """

    def __init__(self, draw) -> None:
        self.draw = draw
        self.eighths = draw(st.sampled_from([0, 0, 1, 2, 4, 8]))

    def __call__(self, valid: st.SearchStrategy, wild: st.SearchStrategy | None = None) -> Any:
        """A value from ``wild`` (when given and the chance says so), else from ``valid``."""
        if wild is not None and self.wild():
            return self.draw(wild)
        return self.draw(valid)

    def wild(self) -> bool:
        """Whether the next choice is the wild one."""
        return bool(self.eighths) and self.draw(st.sampled_from(range(8))) < self.eighths


def requests(build: Callable[[Fields], Any]) -> st.SearchStrategy:
    """A strategy of the requests ``build(fields)`` makes."""
    return st.composite(lambda draw: build(Fields(draw)))()


# -- numbers ---------------------------------------------------------------------------------

NAN, INF = math.nan, math.inf
SPECIAL_FLOATS = (
    0.0, -0.0, 1e-30, -1e-30, 5e-324, 1e-8, 0.01, 0.1, 0.2, 0.5, 0.999, 1.0, 2.0, 10.0, 1e3,
    65536.0, 1e20, -1e20, 1e308, -1e308, NAN, INF, -INF, -1.0, 3.4028235e38,
)  # fmt: skip


def wild_floats() -> st.SearchStrategy[float]:
    """Floats a float field may carry: edge values (tiny, huge, NaN, infinities, negative)
    and anything else."""
    return st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats())


def floats(low: float, high: float) -> st.SearchStrategy[float]:
    """Finite floats in [low, high]."""
    return st.floats(low, high, allow_nan=False, allow_infinity=False)


def optional(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """``strategy`` or None (a message constructor leaves a None field unset)."""
    return st.one_of(st.none(), strategy)


def number(f: Fields, low: float, high: float, *, unset: bool = True) -> float | None:
    """A float field: in [low, high] (or unset, when ``unset``), or wild."""
    valid = floats(low, high)
    return f(optional(valid) if unset else valid, wild_floats())


def int32s(*special: int) -> st.SearchStrategy[int]:
    edges = (0, 1, -1, 2, 64, 65, INT32_MAX, INT32_MIN, *special)
    return st.one_of(st.sampled_from(edges), st.integers(INT32_MIN, INT32_MAX))


def int64s(*special: int) -> st.SearchStrategy[int]:
    edges = (0, 1, -1, 2, 2**31, 2**32, 2**53 - 1, 2**53, INT64_MAX, INT64_MIN, *special)
    return st.one_of(st.sampled_from(edges), st.integers(INT64_MIN, INT64_MAX))


def uint64s() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([0, 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))


def enums(known: Sequence[int]) -> st.SearchStrategy[int]:
    """Values of an enum field nobody defined (7, 42, 99, -1, ...) besides ``known``."""
    return st.sampled_from([*known, 7, 42, 99, -1, INT32_MAX, INT32_MIN])


def enum(f: Fields, known: Sequence[int]) -> int:
    """An enum field: a known value, or (wild) any value."""
    return f(st.sampled_from(list(known)), enums(known))


def version(f: Fields, serving: int) -> int:
    """A weights version: the next one after ``serving``, or around it, or extreme."""
    near = st.sampled_from([serving, serving + 2**32, serving + 2**32 + 1])
    return f(st.just(serving + 1), st.one_of(near, int64s()))


def batch(f: Fields, element: Callable[[Fields], Any], limit: int, max_size: int = 4) -> list:
    """1 .. ``max_size`` elements, or (wild) none or ``limit + 1`` (an element repeated)."""
    size = f.draw(st.integers(1, max_size))
    if f.wild():
        size = f.draw(st.sampled_from([0, limit + 1]))
    items = [element(f) for _ in range(min(size, max_size))]
    return items + items[:1] * (size - len(items))


def one_of(f: Fields, *builders: Callable[[Fields], Any]) -> Any:
    """The value of one of ``builders``, drawn uniformly."""
    return f.draw(st.sampled_from(builders))(f)


# -- text ------------------------------------------------------------------------------------

TEXT_BOUND = 64 * 1024
"""The text bound of every test server: 32 bytes per token of max_length, at least 64 KiB."""
BIG_TEXTS = (
    "a" * TEXT_BOUND,  # exactly the bound: read, then too many tokens
    "a" * (TEXT_BOUND + 1),  # one byte over: refused unread
    "é" * (TEXT_BOUND // 2 + 1),  # few characters, too many bytes
    "word " * (TEXT_BOUND // 5),
    "x" * (4 * TEXT_BOUND),  # far over it
)
ODD_TEXTS = (
    "", " ", "\x00", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "[CLS] [SEP]", "\n\n",
    "\u202e", "\ufeff", *BIG_TEXTS,
)  # fmt: skip
ROLES = ("user", "assistant", "system")
ODD_ROLES = ("", "tool", "\x00", "r" * 300, "User")


def plain_texts() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["Hello there, how are you today?", "a", "é", "🙂🙂"]),
        st.text(min_size=1, max_size=40),
    )


def text(f: Fields) -> str:
    """A text: short and non-empty, or (wild) empty, special, NUL, at or over the byte bound."""
    return f(plain_texts(), st.one_of(st.sampled_from(ODD_TEXTS), st.text(max_size=8)))


def chat(f: Fields) -> pb.Conversation:
    """1 .. 3 turns, or (wild) none, with odd roles and contents."""

    def message(f: Fields) -> pb.ChatMessage:
        return pb.ChatMessage(
            role=f(st.sampled_from(ROLES), st.sampled_from(ODD_ROLES)), content=text(f)
        )

    return pb.Conversation(messages=batch(f, message, 64, max_size=3))


# -- tensors ---------------------------------------------------------------------------------

DTYPES = tuple(pb.DType.values())
WIRE = {
    pb.DTYPE_FLOAT32: "<f4", pb.DTYPE_FLOAT16: "<f2", pb.DTYPE_BFLOAT16: "<u2",
    pb.DTYPE_FLOAT64: "<f8", pb.DTYPE_INT64: "<i8", pb.DTYPE_INT32: "<i4", pb.DTYPE_INT8: "i1",
    pb.DTYPE_UINT8: "u1", pb.DTYPE_BOOL: "u1",
}  # fmt: skip
HUGE_SHAPES = (
    [0, INT64_MAX], [INT64_MAX, 0], [INT64_MAX], [2**32, 2**32], [2**62, 0, 4], [-1], [1, -1],
    [1] * 33, [0] * 40, [],
)  # fmt: skip


def wild_tensors() -> st.SearchStrategy[pb.Tensor]:
    """Tensors whose dtype, shape and bytes need not agree: unknown dtypes, zero elements with
    a huge dimension ([0, 2^63 - 1]), negative dimensions, too many dimensions, any bytes."""
    shape = st.one_of(st.sampled_from(HUGE_SHAPES), st.lists(st.integers(-2, 70), max_size=3))
    return st.builds(pb.Tensor, dtype=enums(DTYPES), shape=shape, data=st.binary(max_size=64))


def tensor(values: np.ndarray | Sequence, dtype: int) -> pb.Tensor:
    """A well-formed 1-D tensor of ``values`` as ``dtype`` (no range check: a value that does
    not fit wraps, which is the point)."""
    with np.errstate(over="ignore", invalid="ignore"):
        array = np.asarray(values).astype(WIRE[dtype], copy=False)
    return pb.Tensor(dtype=dtype, shape=[array.size], data=array.tobytes())


def ids(f: Fields, vocab: int, min_size: int = 1, max_size: int = 12) -> list[int]:
    """Token ids in [0, vocab), or (wild) with ids outside it."""
    bad = st.sampled_from([-1, vocab, vocab + 1, INT32_MAX, INT32_MIN])
    good = st.integers(0, vocab - 1)
    return f(
        st.lists(good, min_size=min_size, max_size=max_size),
        st.lists(st.one_of(good, bad), max_size=max_size),
    )


def id_tensor(f: Fields, vocab: int) -> pb.Tensor:
    """A 1-D int32 token-id tensor, or (wild) int64 ids beyond int32, or a wild tensor."""
    wild = st.one_of(
        st.lists(st.sampled_from([0, 5, 2**31, 2**40, -(2**40)]), min_size=1, max_size=4).map(
            lambda v: tensor(v, pb.DTYPE_INT64)
        ),
        wild_tensors(),
    )
    return f(st.just(None), wild) or tensor(ids(f, vocab), pb.DTYPE_INT32)


def ragged_ids(f: Fields, vocab: int, max_batch: int, max_length: int) -> pb.RaggedTensor:
    """A ragged token batch of 1 .. 4 rows of 2 .. 12 ids, or (wild) with bad ids, lengths that
    do not add up (negative, huge, too few), too many rows, a row over ``max_length``, another
    dtype, or a wild tensor and lengths."""
    if f.wild() and f.wild():
        return pb.RaggedTensor(
            values=f.draw(wild_tensors()), lengths=f.draw(st.lists(int64s(), max_size=4))
        )
    rows = batch(f, lambda f: ids(f, vocab, min_size=2), max_batch)
    if rows and f.wild():
        rows[0] = [7] * f.draw(st.sampled_from([0, 1, max_length, max_length + 1]))
    lengths = [len(r) for r in rows]
    if f.wild():
        lengths = f.draw(st.sampled_from([
            [], [-1, *lengths], [2**62, -(2**62) + sum(lengths)], lengths[:-1],
            [*lengths[:-1], (lengths or [0])[-1] + 1], [INT64_MAX, INT64_MAX], [0] * 3,
        ]))  # fmt: skip
    dtype = f(
        st.just(pb.DTYPE_INT32), st.sampled_from([pb.DTYPE_INT64, pb.DTYPE_FLOAT32, pb.DTYPE_UINT8])
    )
    return pb.RaggedTensor(
        values=tensor(np.asarray([i for row in rows for i in row], np.int64), dtype),
        lengths=lengths,
    )


def prompt_lengths(f: Fields, ragged: pb.RaggedTensor, low: int = 1) -> list[int]:
    """A prompt length inside each row (``low`` .. len - 1), or (wild) wrong ones: outside the
    row, negative, extreme, too few or too many."""
    lengths = list(ragged.lengths)
    fits = all(low + 1 <= n <= 1024 for n in lengths)
    if fits and not f.wild():
        return [f.draw(st.integers(low, n - 1)) for n in lengths]
    return f.draw(st.lists(int32s(), max_size=len(lengths) + 1))


def float_rows(f: Fields, lengths: Sequence[int], low: float = -5.0, high: float = 5.0):
    """A ragged float32 input with one row per completion length (values in [low, high]), or
    (wild) rows of other lengths, NaN and infinities, huge values in float64, other dtypes."""
    rows = [[f.draw(floats(low, high)) for _ in range(n)] for n in lengths]
    if f.wild():
        rows = [f.draw(st.lists(wild_floats(), max_size=6)) for _ in lengths]
    if f.wild():
        rows = rows[1:] if f.draw(st.booleans()) else [*rows, [0.0]]
    flat = np.asarray([v for row in rows for v in row], np.float64)
    dtype = f(
        st.just(pb.DTYPE_FLOAT32),
        st.sampled_from(
            [pb.DTYPE_FLOAT64, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, pb.DTYPE_INT8, pb.DTYPE_BOOL]
        ),
    )
    if dtype == pb.DTYPE_BFLOAT16:  # the upper half of each float32
        with np.errstate(over="ignore"):
            flat = (flat.astype("<f4").view("<u4") >> 16).astype("<u2")
    values = tensor(flat, dtype)
    if f.wild():
        values = f.draw(wild_tensors())
    return pb.RaggedTensor(values=values, lengths=[len(r) for r in rows])


def prompt(f: Fields, vocab: int) -> pb.Prompt:
    """A prompt of any kind (text, chat, token ids), or (wild) none."""
    if f.wild() and f.wild():
        return pb.Prompt()
    return one_of(
        f,
        lambda f: pb.Prompt(text=text(f)),
        lambda f: pb.Prompt(chat=chat(f)),
        lambda f: pb.Prompt(token_ids=id_tensor(f, vocab)),
    )


def tokenize_requests(vocab: int, max_batch: int) -> st.SearchStrategy[pb.TokenizeRequest]:
    """TokenizeRequests: prompts of every kind, completions, any max_length and truncation."""

    def item(f: Fields) -> pb.TokenizeItem:
        return pb.TokenizeItem(
            prompt=prompt(f, vocab),
            completion=f(optional(plain_texts()), st.sampled_from(ODD_TEXTS)),
        )

    return requests(
        lambda f: pb.TokenizeRequest(
            items=batch(f, item, max_batch),
            max_length=f(st.integers(0, 512), int32s(513)),
            truncation=enum(f, pb.Truncation.values()),
            append_eos=f.draw(optional(st.booleans())),
        )
    )


def raw_requests() -> st.SearchStrategy[bytes]:
    """Bytes for a method whose request is empty (GetInfo and kin): anything goes."""
    return st.one_of(st.just(b""), st.binary(max_size=128))


# -- paths -----------------------------------------------------------------------------------


def hostile_paths(root) -> list[str]:
    """Paths no request may use: escapes from ``root``, system paths, NUL bytes, very long
    ones, and names that are not paths."""
    return [
        "", ".", "..", "../..", "/", "/etc", "/etc/passwd", "/proc/self", "/dev/zero", "~",
        "~/x", f"{root}/..", f"{root}/../../etc", f"{root}/x/../../..", "a\x00b", f"{root}/\x00",
        "x" * 5000, "/" + "a/" * 3000, "\n", " ", "file:///etc", "C:\\Windows", "🙂",
    ]  # fmt: skip


def path(f: Fields, good: Sequence[str], bad: Sequence[str]) -> str:
    """One of the ``good`` paths, or (wild) one of the ``bad`` ones."""
    return f(st.sampled_from(list(good)), st.sampled_from(list(bad)))
