"""The fuzz tests' harness: fires requests drawn by hypothesis at one live server, counts
them and checks their status codes (the requests themselves come from :mod:`malformed`).

A request is a message, raw bytes (which the server must parse, or refuse as bad input), or —
for a client stream — a list of either. Every answer must be a status a caller can act on:
OK, or a bad-input or capacity code; never INTERNAL or UNKNOWN (a bug), and
DEADLINE_EXCEEDED only when the example itself set a short deadline.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

# Codes a malformed request may get. UNAVAILABLE is not among them: every service here is up.
ANSWERS = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ABORTED,
    }
)
SHORT_DEADLINES = (0.001, 0.02)
"""Deadlines (seconds) some examples set: their calls may end DEADLINE_EXCEEDED."""
CALL_TIMEOUT_S = 60.0
"""Every other call's deadline: only there so a hang fails the test instead of stalling it."""
MAX_RECEIVE_BYTES = 128 * 1024 * 1024


@dataclass(frozen=True)
class Answer:
    """The outcome of one call."""

    code: grpc.StatusCode
    details: str
    response: Any  # the decoded response (a list of them for a response stream); None if failed


@dataclass(frozen=True)
class Shot:
    """One request and the deadline it is sent with (None = :data:`CALL_TIMEOUT_S`)."""

    payload: Any
    deadline: float | None = None


def _bytes(payload: Any) -> bytes:
    return payload if isinstance(payload, bytes) else payload.SerializeToString()


class Fuzzer:
    """Fires requests at one service of a live server, counts them and checks their codes.

    Args:
        target: ``host:port`` of the server.
        service: the service's descriptor (``*_pb2.DESCRIPTOR.services_by_name[NAME]``).
    """

    def __init__(self, target: str, service) -> None:
        self.service = service
        self.counts: Counter[str] = Counter()  # requests by label (the method, by default)
        self.codes: Counter[tuple[str, str]] = Counter()  # (label, code name)
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", -1),
                ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ],
        )

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Fuzzer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def total(self) -> int:
        """Requests fired so far, over every method."""
        return sum(self.counts.values())

    @property
    def refused(self) -> int:
        """Requests fired so far that the server refused (any code but OK)."""
        return sum(n for (_, code), n in self.codes.items() if code != "OK")

    def call(self, method: str, payload: Any, deadline: float | None = None) -> Answer:
        """Sends ``payload`` (a message, bytes, or a list of them for a client stream)."""
        descriptor = self.service.methods_by_name[method]
        path = f"/{self.service.full_name}/{method}"
        decode = message_factory.GetMessageClass(descriptor.output_type).FromString
        kind = (descriptor.client_streaming, descriptor.server_streaming)
        factory = {
            (False, False): self.channel.unary_unary,
            (False, True): self.channel.unary_stream,
            (True, False): self.channel.stream_unary,
        }[kind]
        stub = factory(path, request_serializer=_bytes, response_deserializer=decode)
        timeout = CALL_TIMEOUT_S if deadline is None else deadline
        request = iter(list(payload)) if descriptor.client_streaming else payload
        try:
            response = stub(request, timeout=timeout)
            if descriptor.server_streaming:
                response = list(response)
        except grpc.RpcError as err:
            return Answer(err.code(), err.details() or "", None)
        return Answer(grpc.StatusCode.OK, "", response)

    def fire(self, method: str, shot: Shot, label: str | None = None) -> Answer:
        """Sends one fuzzed request and checks its code (:meth:`check`)."""
        return self.check(method, shot, self.call(method, shot.payload, shot.deadline), label)

    def check(self, method: str, shot: Shot, answer: Answer, label: str | None = None) -> Answer:
        """Counts an answer under ``label`` (default: the method); fails unless its code is
        one a bad request may get."""
        self.counts[label or method] += 1
        self.codes[label or method, answer.code.name] += 1
        allowed = ANSWERS | ({grpc.StatusCode.DEADLINE_EXCEEDED} if shot.deadline else set())
        if answer.code not in allowed:
            request = repr(shot.payload)
            raise AssertionError(
                f"{method} answered {answer.code.name}: {answer.details!r}\nrequest: "
                f"{request[:4000]}{' ...' if len(request) > 4000 else ''}"
            )
        return answer

    def run(
        self,
        method: str,
        strategy: st.SearchStrategy,
        examples: int,
        after: Callable[[Shot, Answer], None] | None = None,
        label: str | None = None,
        together: int = 1,
    ) -> None:
        """Fires ``examples`` requests drawn from ``strategy`` (payloads) at ``method``, a
        tenth of them as raw bytes derived from a drawn message and some with a short deadline;
        ``after(shot, answer)`` runs after each one (state checks). They are counted under
        ``label`` (default: the method). With ``together`` > 1, an example is up to that many
        requests sent at once, so that the server batches them together."""
        streaming = self.service.methods_by_name[method].client_streaming
        drawn = shots(strategy, streaming=streaming)

        @settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=(Phase.explicit, Phase.generate, Phase.shrink),
        )
        @given(st.lists(drawn, min_size=1, max_size=together))
        def fire_some(group: list[Shot]) -> None:
            with ThreadPoolExecutor(len(group)) as pool:
                answers = list(pool.map(lambda s: self.call(method, s.payload, s.deadline), group))
            for shot, answer in zip(group, answers, strict=True):
                self.check(method, shot, answer, label)
                if after is not None:
                    after(shot, answer)

        fire_some()


def one_in(n: int) -> st.SearchStrategy[bool]:
    """True with probability 1/n (hypothesis draws small integers far more often than that,
    so a chance is drawn from a uniform sampled_from)."""
    return st.sampled_from(range(n)).map(lambda i: i == n - 1)


# -- bytes -----------------------------------------------------------------------------------


@st.composite
def mangled(draw, message) -> bytes:
    """``message``'s wire bytes, damaged: truncated, a byte flipped, garbage or an unknown
    field appended, or replaced by random bytes."""
    data = message.SerializeToString() if not isinstance(message, bytes) else message
    how = draw(st.sampled_from(["random", "truncate", "flip", "append", "unknown", "huge_len"]))
    if how == "random" or not data:
        return draw(st.binary(max_size=96))
    if how == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "flip":
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    if how == "append":
        return data + draw(st.binary(min_size=1, max_size=16))
    if how == "unknown":  # field 999, varint: parses, and must be ignored
        return data + b"\xb8\x3e" + bytes([draw(st.integers(0, 127))])
    return data + b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length 2^32 - 1, no bytes after


@st.composite
def shots(draw, strategy: st.SearchStrategy, streaming: bool = False) -> Shot:
    """A request from ``strategy`` — one time in ten as damaged bytes (for a stream: one of its
    messages) — sent with a short deadline one time in twelve."""
    payload = draw(strategy)
    if draw(one_in(10)):
        if streaming and payload:
            i = draw(st.integers(0, len(payload) - 1))
            payload = [*payload[:i], draw(mangled(payload[i])), *payload[i + 1 :]]
        elif not streaming:
            payload = draw(mangled(payload))
    deadline = draw(st.sampled_from(SHORT_DEADLINES)) if draw(one_in(12)) else None
    return Shot(payload, deadline)


# -- budgets ---------------------------------------------------------------------------------

MIN_REFUSED = 2000
"""Malformed requests (answered with a refusal) the full run of each service's test fires."""


@dataclass(frozen=True)
class Budget:
    """How much one run of a service's fuzz test fires."""

    examples: dict[str, int]
    """Hypothesis examples per label (the method, by default)."""
    refusals: int
    """Requests the server must have refused by the end, at least."""

    def __getitem__(self, label: str) -> int:
        return self.examples[label]


def budgets(full: dict[str, int]) -> list:
    """The two runs of a service's fuzz test, as ``budget`` parameters: ``smoke``, a fiftieth
    of the examples, in the default test stage; ``full``, marked ``fuzz``, refusing at least
    :data:`MIN_REFUSED` requests."""
    smoke = {label: max(2, count // 50) for label, count in full.items()}
    return [
        pytest.param(Budget(smoke, 0), id="smoke"),
        pytest.param(Budget(full, MIN_REFUSED), id="full", marks=pytest.mark.fuzz),
    ]


def check_counts(fuzz: Fuzzer, budget: Budget) -> None:
    """Every run (by label) got its examples, and enough requests were refused."""
    for label, examples in budget.examples.items():
        assert fuzz.counts[label] >= examples, (label, fuzz.counts)
    assert fuzz.refused >= budget.refusals, fuzz.codes
