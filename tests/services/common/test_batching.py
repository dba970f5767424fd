"""The dynamic batcher: batch formation, limits, deadlines, cancellation, back-pressure."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from prometheus_client import CollectorRegistry
from waiting import until_queued

from alignd_server.common.batching import BatcherMetrics, DynamicBatcher
from alignd_server.common.errors import DeadlineExceeded, ResourceExhausted, Unavailable


class Recorder:
    """A batch function that records each batch it is given and doubles the payloads.

    With a ``gate``, each call sets :attr:`entered` and then waits for the gate, so that a test
    knows a batch is computing and holds it there.
    """

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = gate
        self.entered = threading.Event()
        self.threads: set[int] = set()

    def __call__(self, payloads: list[int]) -> list[int]:
        self.threads.add(threading.get_ident())
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        self.batches.append(list(payloads))
        return [2 * p for p in payloads]

    async def computing(self) -> None:
        """Waits until a batch is in the batch function (held by the gate)."""
        assert await asyncio.to_thread(self.entered.wait, 10), "no batch started computing"


def make(run, **limits) -> tuple[DynamicBatcher, BatcherMetrics]:
    metrics = BatcherMetrics(CollectorRegistry())
    defaults = {"max_batch_size": 4, "max_batch_tokens": 1000, "max_wait_s": 0.05,
                "max_queue_size": 100}  # fmt: skip
    return DynamicBatcher("test", run, **{**defaults, **limits}, metrics=metrics), metrics


async def test_items_of_concurrent_requests_share_batches_and_keep_their_order():
    run = Recorder()
    batcher, _ = make(run, max_batch_size=5, max_wait_s=60)  # runs when both are queued
    batcher.start()
    results = await asyncio.gather(
        batcher.submit([1, 2, 3], [1, 1, 1]), batcher.submit([4, 5], [1, 1])
    )
    await batcher.stop()
    assert results == [[2, 4, 6], [8, 10]]
    assert run.batches == [[1, 2, 3, 4, 5]]  # one batch for both requests
    assert threading.get_ident() not in run.threads  # never on the event loop thread


async def test_batches_respect_size_and_token_limits_and_group_similar_lengths():
    run = Recorder()
    batcher, _ = make(run, max_batch_size=3, max_batch_tokens=40)
    batcher.start()
    payloads = [1, 2, 3, 4, 5, 6]
    costs = [10, 3, 10, 3, 3, 10]  # padded tokens = items x longest item
    assert await batcher.submit(payloads, costs) == [2 * p for p in payloads]
    await batcher.stop()
    by_cost = dict(zip(payloads, costs, strict=True))
    for batch in run.batches:
        assert len(batch) <= 3
        assert len(batch) * max(by_cost[p] for p in batch) <= 40
    assert sorted(map(sorted, run.batches)) == [[1, 3, 6], [2, 4, 5]]  # short with short


async def test_an_item_larger_than_the_token_limit_runs_alone():
    run = Recorder()
    batcher, _ = make(run, max_batch_tokens=5)
    batcher.start()
    assert await batcher.submit([1, 2], [50, 1]) == [2, 4]
    await batcher.stop()
    assert sorted(run.batches) == [[1], [2]]


async def test_a_lone_item_waits_for_company_within_max_wait():
    run = Recorder()
    batcher, _ = make(run, max_batch_size=2, max_wait_s=60)
    batcher.start()
    try:
        first = asyncio.ensure_future(batcher.submit([1], [1]))
        await until_queued(batcher, 1)  # alone, and waiting for more
        second = asyncio.ensure_future(batcher.submit([2], [1]))
        assert await first == [2] and await second == [4]
    finally:
        await batcher.stop()
    assert run.batches == [[1, 2]]  # the first did not run alone


async def test_a_lone_item_runs_alone_once_max_wait_passed():
    run = Recorder()
    batcher, _ = make(run, max_batch_size=64, max_wait_s=0.05)
    batcher.start()
    try:
        # Far from a full batch: without the max_wait bound these would never run.
        assert await asyncio.wait_for(batcher.submit([7], [1]), 30) == [14]
        assert await asyncio.wait_for(batcher.submit([8], [1]), 30) == [16]
    finally:
        await batcher.stop()
    assert run.batches == [[7], [8]]


async def test_full_queue_rejects_with_resource_exhausted():
    gate = threading.Event()
    run = Recorder(gate=gate)
    batcher, metrics = make(run, max_batch_size=1, max_wait_s=0, max_queue_size=2)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit([1], [1]))
    await run.computing()  # the first item is running, blocked on the gate
    queued = asyncio.ensure_future(batcher.submit([2, 3], [1, 1]))
    await until_queued(batcher, 2)
    with pytest.raises(ResourceExhausted, match="max_queue_size 2"):
        await batcher.submit([4], [1])
    gate.set()
    assert await first == [2]
    assert await queued == [4, 6]
    await batcher.stop()
    assert metrics.rejected.labels("test")._value.get() == 1


async def test_expired_items_are_dropped_before_compute():
    gate = threading.Event()
    run = Recorder(gate=gate)
    batcher, metrics = make(run, max_batch_size=1, max_wait_s=0)
    batcher.start()
    blocker = asyncio.ensure_future(batcher.submit([1], [1]))
    await run.computing()
    # Queued behind the blocker: one whose deadline passes while it waits, one with time left.
    late = asyncio.ensure_future(batcher.submit([2], [1], deadline=time.monotonic()))
    timely = asyncio.ensure_future(batcher.submit([3], [1], deadline=time.monotonic() + 60))
    await until_queued(batcher, 2)
    gate.set()
    with pytest.raises(DeadlineExceeded, match="deadline passed while queued"):
        await late
    assert await blocker == [2] and await timely == [6]
    await batcher.stop()
    assert run.batches == [[1], [3]]
    assert metrics.dropped.labels("test", "deadline")._value.get() == 1


async def test_cancelled_requests_are_dropped_before_compute():
    gate = threading.Event()
    run = Recorder(gate=gate)
    batcher, metrics = make(run, max_batch_size=1, max_wait_s=0)
    batcher.start()
    blocker = asyncio.ensure_future(batcher.submit([1], [1]))
    await run.computing()
    gone = asyncio.ensure_future(batcher.submit([2, 3], [1, 1]))
    await until_queued(batcher, 2)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    after = asyncio.ensure_future(batcher.submit([4], [1]))  # queued behind the cancelled two
    gate.set()
    assert await blocker == [2] and await after == [8]  # so the two were handled before it
    await batcher.stop()
    assert run.batches == [[1], [4]]
    assert metrics.dropped.labels("test", "cancelled")._value.get() == 2


async def test_a_failing_batch_fails_its_items_and_the_batcher_keeps_working():
    calls = []

    def run(payloads):
        calls.append(payloads)
        if 0 in payloads:
            raise ValueError("bad batch")
        return payloads

    batcher, _ = make(run, max_batch_size=1)
    batcher.start()
    with pytest.raises(ValueError, match="bad batch"):
        await batcher.submit([0], [1])
    assert await batcher.submit([5], [1]) == [5]
    await batcher.stop()


async def test_stop_fails_queued_items_with_unavailable():
    gate = threading.Event()
    run = Recorder(gate=gate)
    batcher, _ = make(run, max_batch_size=1, max_wait_s=0)
    batcher.start()
    running = asyncio.ensure_future(batcher.submit([1], [1]))
    await run.computing()
    waiting = asyncio.ensure_future(batcher.submit([2], [1]))
    await until_queued(batcher, 1)
    try:
        await asyncio.wait_for(batcher.stop(), 10)  # does not wait for the computing batch
    finally:
        gate.set()
    for pending in (running, waiting):  # in flight and queued alike
        with pytest.raises(Unavailable):
            await pending
    with pytest.raises(Unavailable):
        await batcher.submit([3], [1])


async def test_a_failing_batch_is_retried_item_by_item_so_only_the_bad_item_fails():
    calls: list[list[int]] = []

    def run(payloads: list[int]) -> list[int]:
        calls.append(list(payloads))
        if -1 in payloads:  # one item that breaks the model breaks any batch it is in
            raise RuntimeError("index out of range in self")
        return [2 * p for p in payloads]

    batcher, metrics = make(run, max_batch_size=3, max_wait_s=60)  # runs when all 3 are queued
    batcher.start()
    try:
        results = await asyncio.gather(
            batcher.submit([1], [1]), batcher.submit([-1], [1]), batcher.submit([3], [1]),
            return_exceptions=True,
        )  # fmt: skip
    finally:
        await batcher.stop()
    assert results[0] == [2] and results[2] == [6]
    assert isinstance(results[1], RuntimeError)
    assert sorted(calls[0]) == [-1, 1, 3] and sorted(map(tuple, calls[1:])) == [(-1,), (1,), (3,)]
    assert metrics.split.labels("test")._value.get() == 1


async def test_capacity_can_be_checked_before_the_items_are_prepared():
    entered, gate = threading.Event(), threading.Event()

    def run(payloads: list[int]) -> list[int]:
        entered.set()
        gate.wait(10)
        return [2 * p for p in payloads]

    batcher, _ = make(run, max_queue_size=2, max_batch_size=1, max_wait_s=0)
    batcher.start()
    try:
        first = asyncio.ensure_future(batcher.submit([1], [1]))
        assert await asyncio.to_thread(entered.wait, 10)  # computing, held by the gate
        waiting = asyncio.ensure_future(batcher.submit([2, 3], [1, 1]))  # fills the queue
        await until_queued(batcher, 2)
        batcher.check_capacity(0)
        with pytest.raises(ResourceExhausted, match="max_queue_size 2"):
            batcher.check_capacity(1)
        gate.set()
        assert await first == [2] and await waiting == [4, 6]
    finally:
        gate.set()
        await batcher.stop()


async def test_an_isolated_request_is_batched_alone_whatever_arrives_with_it():
    batcher, _ = make(Recorder(), max_batch_size=4, max_wait_s=0.2)
    batcher.start()
    try:
        await asyncio.gather(
            batcher.submit([1, 2, 3], [3, 1, 2], isolated=True),
            batcher.submit([10, 11], [1, 1]),
            batcher.submit([20, 21, 22], [2, 2, 2]),
        )
        alone = batcher._run.batches[:]
        batcher._run.batches.clear()
        await batcher.submit([1, 2, 3], [3, 1, 2], isolated=True)
    finally:
        await batcher.stop()
    # The shared items mix (up to 4 a batch), the isolated ones form their own batch, sorted
    # by cost, the same as when it came alone.
    assert [2, 3, 1] in alone and batcher._run.batches == [[2, 3, 1]]
    assert sorted(p for b in alone if b != [2, 3, 1] for p in b) == [10, 11, 20, 21, 22]


async def test_a_large_isolated_request_is_not_split_by_the_window():
    batcher, _ = make(Recorder(), max_batch_size=2, max_wait_s=0.05)
    batcher.start()
    try:
        await asyncio.gather(
            batcher.submit([100], [1]),
            batcher.submit(list(range(12)), list(range(12, 0, -1)), isolated=True),
        )
    finally:
        await batcher.stop()
    groups = [b for b in batcher._run.batches if 100 not in b]
    # 12 items > the window (2 x 4): still packed as one group, by its own costs.
    assert sorted(groups) == [[1, 0], [3, 2], [5, 4], [7, 6], [9, 8], [11, 10]]
