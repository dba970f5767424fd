"""What each service of a platform reports: health, model, engine, weights version."""

from __future__ import annotations

from dataclasses import dataclass

from alignd.clients.base import ClientBase
from alignd.errors import AligndError


@dataclass(frozen=True)
class ServiceStatus:
    """What one service reports (see :meth:`Platform.status`).

    Attributes:
        role: ``generation``, ``reward``, ``reference`` or ``trainer``.
        target: where it was asked.
        health: ``SERVING``, ``NOT_SERVING``…, or the status code of the failed check.
        model: name of the served model ("" before the trainer's Initialize).
        engine: generation engine (generation only).
        weights_version: version of the serving weights (generation only).
        detail: the error message when the check failed.
    """

    role: str
    target: str
    health: str
    model: str = ""
    engine: str = ""
    weights_version: int | None = None
    detail: str = ""

    @property
    def serving(self) -> bool:
        return self.health == "SERVING"


def check(role: str, client: ClientBase, timeout: float) -> ServiceStatus:
    try:
        health = client.health(timeout=timeout)
        if health != "SERVING":
            return ServiceStatus(role, client.target, health)
        info = client.info(timeout=timeout)  # type: ignore[attr-defined]
    except AligndError as err:
        return ServiceStatus(role, client.target, err.code.name, detail=err.details)
    if role != "generation":
        return ServiceStatus(role, client.target, health, info.server.model.name)
    return ServiceStatus(
        role, client.target, health, info.server.model.name, info.engine, info.weights_version
    )
