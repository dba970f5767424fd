"""Bounded waits on a server's state (shared by the service tests): poll, never sleep blindly."""

from __future__ import annotations

import asyncio

from alignd_server.common.batching import DynamicBatcher


async def until_queued(batcher: DynamicBatcher, count: int, timeout: float = 10.0) -> None:
    """Waits until ``count`` items wait in ``batcher``'s queue; fails after ``timeout`` s."""
    for _ in range(int(timeout / 0.01)):
        if batcher.queued == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{batcher.queued} items queued, expected {count}")
