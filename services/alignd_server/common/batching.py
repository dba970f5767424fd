"""Dynamic batching for forward-only models (reward scoring, reference log-probs).

Requests put their items on one queue; a single worker forms batches bounded by
``max_batch_size`` items and ``max_batch_tokens`` padded tokens, waiting at most ``max_wait_s``
after the oldest item arrived for more to come. It takes a window of the oldest items, sorts it
by length so items of similar length share a batch (less padding), and runs each batch on the
process's one compute thread (never on the event loop). A request may ask to be *isolated*: its
items are then batched only with each other, by the same rule, so the same request always
gives the same batches (and bit-identical results) whatever else the server is doing. Items
whose deadline passed or whose caller went away are dropped before they are computed. A full
queue rejects new work with RESOURCE_EXHAUSTED (:meth:`DynamicBatcher.check_capacity` lets a
caller refuse before it prepares its items). A batch that fails is retried item by item, so one
item that breaks the model fails alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from alignd_server.common.errors import DeadlineExceeded, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")

# All model compute of a process runs on this one thread. torch's OpenMP pool belongs to the
# thread that calls it: compute hopping between pool threads would build one thread team per
# thread, whose idle spinning slows the others (measured: ~15% on 2 cores).
COMPUTE = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignd-compute")

# How many batches' worth of queued items are sorted together by length.
WINDOW_BATCHES = 4
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def deadline_of(context) -> float | None:
    """The ``time.monotonic()`` deadline of a gRPC call, or None when it has none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class BatcherMetrics:
    """Prometheus metrics of the batchers of one server, labelled by batcher name."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batch_size = Histogram(
            "alignd_batch_size", "Items per model batch.", ["batcher"],
            buckets=SIZE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.batch_tokens = Histogram(
            "alignd_batch_padded_tokens", "Padded tokens (items x longest) per model batch.",
            ["batcher"], buckets=tuple(2**i for i in range(4, 18)), registry=registry,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "alignd_queue_depth", "Items waiting for a batch.", ["batcher"], registry=registry
        )
        self.wait = Histogram(
            "alignd_queue_wait_seconds", "Time items wait in the queue before their batch runs.",
            ["batcher"], buckets=TIME_BUCKETS, registry=registry,
        )  # fmt: skip
        self.compute = Histogram(
            "alignd_batch_compute_seconds", "Model time per batch.", ["batcher"],
            buckets=TIME_BUCKETS, registry=registry,
        )  # fmt: skip
        self.dropped = Counter(
            "alignd_items_dropped", "Items dropped before compute, by reason.",
            ["batcher", "reason"], registry=registry,
        )  # fmt: skip
        self.rejected = Counter(
            "alignd_items_rejected", "Items refused because the queue was full.", ["batcher"],
            registry=registry,
        )  # fmt: skip
        self.split = Counter(
            "alignd_batches_split", "Failed batches retried item by item.", ["batcher"],
            registry=registry,
        )  # fmt: skip


@dataclass
class _Item:
    payload: Any
    cost: int  # tokens (1 for items without tokens)
    future: asyncio.Future
    deadline: float | None  # time.monotonic() seconds
    group: int | None = None  # an isolated request's items share a group, batched alone
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher(Generic[P, R]):
    """Batches items from concurrent requests into calls of ``run``.

    Args:
        name: label of this batcher's metrics and logs.
        run: computes one batch: a list of payloads -> a list of results in the same order.
            Runs on the compute thread; when it raises for a batch of several items, each item
            is run again alone, and only the items that fail alone get the exception.
        max_batch_size: most items per call of ``run``.
        max_batch_tokens: most padded tokens (items x largest cost) per call; an item larger
            than this runs alone.
        max_wait_s: longest time the oldest queued item waits for a batch to fill.
        max_queue_size: most items waiting; beyond it, ``submit`` raises ResourceExhausted.
        metrics: where to report batch sizes, queue depth and times.
    """

    def __init__(
        self,
        name: str,
        run: Callable[[list[P]], Sequence[R]],
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_s: float,
        max_queue_size: int,
        metrics: BatcherMetrics | None = None,
    ) -> None:
        self.name = name
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue_size = max_queue_size
        self._metrics = metrics
        self._queue: deque[_Item] = deque()
        self._groups = itertools.count()
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        """Starts the worker task on the running event loop."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work(), name=self.name)

    async def stop(self) -> None:
        """Stops the worker; queued items fail with UNAVAILABLE."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(Unavailable("server is shutting down"))
        self._report_depth()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def check_capacity(self, count: int) -> None:
        """Raises now what :meth:`submit` would raise for ``count`` items, so that callers can
        refuse work before preparing it (tokenizing): a refusal costs microseconds.

        Raises:
            Unavailable: the batcher is not running.
            ResourceExhausted: the queue cannot take ``count`` more items now.
        """
        if self._worker is None:
            raise Unavailable(f"{self.name} is not running")
        if len(self._queue) + count > self.max_queue_size:
            if self._metrics:
                self._metrics.rejected.labels(self.name).inc(count)
            raise ResourceExhausted(
                f"queue full: {len(self._queue)} items waiting, limit max_queue_size "
                f"{self.max_queue_size}; retry later"
            )

    async def submit(
        self,
        payloads: Sequence[P],
        costs: Sequence[int],
        deadline: float | None = None,
        *,
        isolated: bool = False,
    ) -> list[R]:
        """Queues ``payloads`` and waits for their results (in order).

        Args:
            payloads: the items.
            costs: tokens of each item (padding is estimated from them).
            deadline: ``time.monotonic()`` after which unstarted items are dropped.
            isolated: batch these items only with each other (never with another request's),
                packed by the same rule from their own costs: the same request always gives the
                same batches, and so bit-identical results.

        Raises:
            ResourceExhausted: the queue cannot take this many items now.
            DeadlineExceeded: the deadline passed before the items were computed.
        """
        self.check_capacity(len(payloads))
        loop = asyncio.get_running_loop()
        group = next(self._groups) if isolated else None
        items = [
            _Item(p, max(1, int(c)), loop.create_future(), deadline, group)
            for p, c in zip(payloads, costs, strict=True)
        ]
        self._queue.extend(items)
        self._report_depth()
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(i.future for i in items)))
        except BaseException:
            for item in items:  # the caller is gone or failed: drop what is still queued
                item.future.cancel()
            raise

    def _report_depth(self) -> None:
        if self._metrics:
            self._metrics.queue_depth.labels(self.name).set(len(self._queue))

    async def _work(self) -> None:
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._fill()
            window = self._take_window()
            for batch in self._pack(window):
                await self._run_batch(batch)

    async def _fill(self) -> None:
        """Waits until a full batch is queued or the oldest item has waited max_wait_s."""
        oldest = self._queue[0].enqueued
        while len(self._queue) < self.max_batch_size:
            remaining = oldest + self.max_wait_s - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take_window(self) -> list[_Item]:
        """The oldest items, up to a few batches' worth; an isolated group is never split."""
        window: list[_Item] = []
        limit = self.max_batch_size * WINDOW_BATCHES
        while self._queue and len(window) < limit:
            item = self._queue.popleft()
            window.append(item)
            while item.group is not None and self._queue and self._queue[0].group == item.group:
                window.append(self._queue.popleft())  # a group's items are queued together
        self._report_depth()
        return window

    def _pack(self, window: list[_Item]) -> list[list[_Item]]:
        """Batches within both limits: the shared items of the window together, each isolated
        group alone; the batch holding the oldest item goes first."""
        groups: dict[int | None, list[_Item]] = {}
        for item in window:
            groups.setdefault(item.group, []).append(item)
        batches = [batch for items in groups.values() for batch in self._pack_items(items)]
        batches.sort(key=lambda b: min(i.enqueued for i in b))
        return batches

    def _pack_items(self, items: list[_Item]) -> list[list[_Item]]:
        """``items``, sorted by cost (stably: equal costs keep their order), in batches."""
        batches: list[list[_Item]] = []
        current: list[_Item] = []
        for item in sorted(items, key=lambda i: i.cost):
            padded = (len(current) + 1) * item.cost  # sorted: this item is the longest so far
            if current and (len(current) >= self.max_batch_size or padded > self.max_batch_tokens):
                batches.append(current)
                current = []
            current.append(item)
        if current:
            batches.append(current)
        return batches

    def _live(self, batch: list[_Item]) -> list[_Item]:
        now = time.monotonic()
        live = []
        for item in batch:
            if item.future.done():  # cancelled by its caller
                self._drop("cancelled")
            elif item.deadline is not None and now >= item.deadline:
                item.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                self._drop("deadline")
            else:
                live.append(item)
        return live

    def _drop(self, reason: str) -> None:
        if self._metrics:
            self._metrics.dropped.labels(self.name, reason).inc()

    async def _run_batch(self, batch: list[_Item]) -> None:
        batch = self._live(batch)
        if not batch:
            return
        start = time.monotonic()
        if self._metrics:
            m = self._metrics
            m.batch_size.labels(self.name).observe(len(batch))
            m.batch_tokens.labels(self.name).observe(len(batch) * max(i.cost for i in batch))
            for item in batch:
                m.wait.labels(self.name).observe(start - item.enqueued)
        try:
            error = await self._compute(batch)
            if error is not None and len(batch) > 1:
                # One bad item must not fail its neighbours: run each alone, so only the items
                # that fail by themselves get the error.
                log.warning("%s: a batch of %d failed (%r); retrying item by item",
                            self.name, len(batch), error)  # fmt: skip
                if self._metrics:
                    self._metrics.split.labels(self.name).inc()
                for item in batch:
                    if not item.future.done():
                        await self._compute([item])
        finally:
            if self._metrics:
                self._metrics.compute.labels(self.name).observe(time.monotonic() - start)

    async def _compute(self, batch: list[_Item]) -> Exception | None:
        """Runs ``batch`` and settles its futures with the results; on failure, returns the
        error (a single item's future gets it)."""
        try:
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(COMPUTE, self._run, [i.payload for i in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} items")
        except asyncio.CancelledError:  # stop() while computing
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(Unavailable("server is shutting down"))
            raise
        except Exception as err:
            if len(batch) == 1 and not batch[0].future.done():
                batch[0].future.set_exception(err)
            return err
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)
        return None
