"""What a generation engine is to the servicer, and the gate that keeps the version contract.

An engine (``hf``: :mod:`~alignd_server.generation.hf_engine`, ``vllm``:
:mod:`~alignd_server.generation.vllm_engine`) takes requests as they arrive and serves them
together (continuous batching): :meth:`GenerationEngine.generate` puts one request into the
running engine and returns when its completions are done; cancelling the awaiting task
(the caller went away, its deadline passed) takes the request out of the engine at its next
step. Token callbacks report each token as the engine produces it.

The version contract — a completion reports one weights version and every one of its tokens
came from it — is kept in front of the engine by :class:`SwapGate`, the same way for both
engines: a weight swap waits until no request is inside the engine while new requests wait
behind it (``swap_policy: wait``), or (``restart``) cancels the running requests that have not
streamed anything yet, swaps, and runs them again from the start on the new weights. An
*isolated* request (jobs' ``deterministic: true``) passes the gate alone, like a swap, so its
batches are made of its own rows only and it gives the same bits whatever else is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import numpy as np
import torch

from alignd_server.generation.sampling import Sampling

EOS, STOP, LENGTH = "eos", "stop", "length"

#: Called for each produced token with (row, token, logprob); row indexes the request's rows,
#: prompt-major (prompt p, sample s is row p * n + s). Called from the engine's thread: it must
#: be quick and thread-safe (``loop.call_soon_threadsafe``).
TokenCallback = Callable[[int, int, float], None]

SwapPolicy = Literal["wait", "restart"]
T = TypeVar("T")


@dataclass(frozen=True)
class Output:
    """A finished completion."""

    token_ids: np.ndarray  # (T,) int32
    logprobs: np.ndarray  # (T,) float32
    text: str
    finish_reason: str  # eos | stop | length


@dataclass(frozen=True)
class EngineLoad:
    """What an engine holds now, in requests and rows (prompts x n)."""

    running_requests: int
    waiting_requests: int
    running_rows: int
    waiting_rows: int


class GenerationEngine(Protocol):
    """A generation engine, as the servicer uses it."""

    name: str
    """``hf`` or ``vllm``."""
    version: int
    """Version of the serving weights."""
    model: torch.nn.Module
    """The policy's module tree: names, shapes and tying of its parameters (weight updates are
    checked against it; the vllm engine keeps it on the meta device)."""

    async def generate(
        self, prompts: Sequence[np.ndarray], sampling: Sampling, on_token: TokenCallback | None
    ) -> list[list[Output]]:
        """n completions per prompt. Cancelling the awaiting task aborts the request inside
        the engine within one step (its rows stop being decoded, its cache is freed)."""
        ...

    async def swap(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        """Replaces the named parameters and sets ``version``; called by the gate only while
        no request is inside the engine."""
        ...

    def load(self) -> EngineLoad:
        """Requests and rows running and waiting inside the engine."""
        ...

    async def close(self) -> None:
        """Stops the engine: requests still inside fail with UNAVAILABLE; frees its memory."""
        ...


class SwapGate:
    """Admits requests into the engine and weight swaps between them (see the module doc).

    Requests pass while no exclusive holder (a swap, an isolated request) holds or waits for
    the gate; an exclusive holder waits for the running requests to leave — or, for a swap
    under ``restart``, cancels the restartable ones, which then run again after it — while new
    requests wait behind it. Everything runs on the event loop's thread.
    """

    def __init__(
        self,
        policy: SwapPolicy,
        on_swap_wait: Callable[[float], None] = lambda seconds: None,
        on_restart: Callable[[], None] = lambda: None,
    ) -> None:
        self.policy = policy
        self._on_swap_wait = on_swap_wait
        self._on_restart = on_restart
        self._running: set[_Entry] = set()
        self._exclusive = 0  # exclusive holders and waiters
        self._open = asyncio.Event()  # no exclusive holder or waiter
        self._open.set()
        self._idle = asyncio.Event()  # no request inside the engine
        self._idle.set()
        self._one = asyncio.Lock()  # exclusive holders take turns

    async def run(
        self, call: Callable[[], Awaitable[T]], *, restartable: bool, isolated: bool
    ) -> T:
        """``await call()`` inside the gate. A restartable call that a swap takes out is run
        again after the swap (``call`` starts the request afresh each time); cancelling the
        caller cancels the call."""
        if isolated:
            async with self.exclusive(swap=False):
                return await call()
        while True:
            while self._exclusive:
                await self._open.wait()
            entry = _Entry(asyncio.ensure_future(call()), restartable)
            self._running.add(entry)
            self._idle.clear()
            try:
                return await entry.task
            except asyncio.CancelledError:
                if not entry.restarted or asyncio.current_task().cancelling():
                    raise
            finally:
                self._running.discard(entry)
                if not self._running:
                    self._idle.set()

    @contextlib.asynccontextmanager
    async def exclusive(self, *, swap: bool = True) -> AsyncIterator[None]:
        """Holds the engine alone: new requests wait from the call on, running ones are waited
        for (under ``restart``, a swap first takes the restartable ones out)."""
        start = time.perf_counter()
        self._exclusive += 1
        self._open.clear()
        try:
            async with self._one:
                if swap and self.policy == "restart":
                    for entry in self._running:
                        if entry.restartable and not entry.task.done():
                            entry.restarted = True
                            entry.task.cancel()
                            self._on_restart()
                while self._running:
                    await self._idle.wait()
                if swap:
                    self._on_swap_wait(time.perf_counter() - start)
                yield
        finally:
            self._exclusive -= 1
            if not self._exclusive:
                self._open.set()


@dataclass(eq=False)
class _Entry:
    """A request inside the engine."""

    task: asyncio.Future
    restartable: bool
    restarted: bool = False
