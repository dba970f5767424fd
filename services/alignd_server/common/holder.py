"""The model slot of a service: empty, loading, or holding a loaded model."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from alignd.models import resolve_model
from alignd_server.common.config import ModelServerSettings
from alignd_server.common.errors import FailedPrecondition, Unavailable
from alignd_server.common.models import LoadedModel

log = logging.getLogger(__name__)
T = TypeVar("T")


async def in_daemon_thread(fn: Callable[[], T]) -> T:
    """Runs a slow ``fn`` (a model load) on a daemon thread and awaits its result.

    A daemon thread, unlike the default executor, does not hold up the process when SIGTERM
    arrives mid-load: the server gives up on the load and exits at once.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if not future.done():
            future.set_result(result) if error is None else future.set_exception(error)

    def target() -> None:
        try:
            result, error = fn(), None
        except BaseException as err:
            result, error = None, err
        with contextlib.suppress(RuntimeError):  # the loop may be gone if we were stopped
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name="alignd-load", daemon=True).start()
    return await future


class ModelHolder:
    """Loads a model off the event loop and hands it to RPCs once ready.

    Args:
        what: how errors name the model ("reward model", "policy").
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.loaded: LoadedModel | None = None
        self._loading = False

    async def load(self, loader: Callable[[], LoadedModel]) -> LoadedModel:
        """Runs ``loader`` in a worker thread and installs its result."""
        self._loading = True
        start = time.perf_counter()
        try:
            loaded = await in_daemon_thread(loader)
        finally:
            self._loading = False
        self.loaded = loaded
        log.info(
            "loaded %s %s (%s, %.1fM parameters, %s on %s) in %.1fs",
            self.what,
            loaded.name,
            loaded.architecture,
            loaded.num_parameters / 1e6,
            loaded.dtype,
            loaded.device,
            time.perf_counter() - start,
        )
        return loaded

    async def load_configured(
        self, settings: ModelServerSettings, loader: Callable[..., LoadedModel]
    ) -> LoadedModel:
        """Loads ``settings.model`` (a bundled name or a directory) with ``loader(path, dtype=,
        device=)`` on the configured dtype and device."""
        path = resolve_model(settings.model)
        return await self.load(lambda: loader(path, dtype=settings.dtype, device=settings.device))

    def require(self) -> LoadedModel:
        """The loaded model.

        Raises:
            Unavailable: the model is still loading (retry shortly).
            FailedPrecondition: no model has been loaded.
        """
        if self.loaded is not None:
            return self.loaded
        if self._loading:
            raise Unavailable(f"the {self.what} is still loading")
        raise FailedPrecondition(f"no {self.what} is loaded")
