"""Run a :class:`~alignd_server.common.server.Server` in a background thread (tests, notebooks).

The server gets its own event loop, so sync clients, subprocesses (grpcurl) and the test body
can all talk to it from the main thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any

from alignd_server.common.server import Server


class ServerThread:
    """Starts ``server`` on a background event loop; stop() always joins the thread.

    Args:
        server: the server to run (its settings decide host and port; port 0 picks one).
        timeout: seconds to wait for start and stop.
    """

    def __init__(self, server: Server, timeout: float = 120.0) -> None:
        self.server = server
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.started: concurrent.futures.Future | None = None

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def start(self, *, wait: bool = True) -> ServerThread:
        """Starts the loop and the server; with ``wait=False``, returns once the loop runs and
        leaves :attr:`started` (a future) to tell when the services are up."""
        self._thread.start()
        self.started = asyncio.run_coroutine_threadsafe(self.server.start(), self._loop)
        if wait:
            try:
                self.started.result(self.timeout)
            except BaseException:
                self.stop()
                raise
        return self

    def stop(self, grace: float = 0.5) -> None:
        if self._thread.is_alive():
            try:
                self._run(self.server.stop(grace))
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(self.timeout)
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
