"""Wiring of ``alignd serve ROLE``: settings from flags and env, servicer, server."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from alignd_server.common.config import ServerSettings, add_settings_flags, settings_from_args
from alignd_server.common.metrics import ServerMetrics
from alignd_server.common.server import Server, Service, run
from alignd_server.generation.config import GenerationSettings
from alignd_server.generation.servicer import GenerationServicer
from alignd_server.reference.config import ReferenceSettings
from alignd_server.reference.servicer import ReferenceServicer
from alignd_server.reward.config import RewardSettings
from alignd_server.reward.servicer import RewardServicer
from alignd_server.trainer.config import TrainerSettings
from alignd_server.trainer.servicer import TrainerServicer

ROLES: dict[str, tuple[type[ServerSettings], type]] = {
    "generation": (GenerationSettings, GenerationServicer),
    "reward": (RewardSettings, RewardServicer),
    "reference": (ReferenceSettings, ReferenceServicer),
    "trainer": (TrainerSettings, TrainerServicer),
}


def build_server(role: str, settings: ServerSettings) -> Server:
    """A Server hosting the service of ``role`` with ``settings``."""
    _, servicer_cls = ROLES[role]
    metrics = ServerMetrics(servicer_cls.name)
    service: Service = servicer_cls(settings, metrics)
    companions = getattr(service, "companions", list)()  # more services on the same port
    return Server(settings, [service, *companions], metrics)


def parser_for(role: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``alignd serve ROLE``: one flag per settings field."""
    settings_cls, _ = ROLES[role]
    parser = argparse.ArgumentParser(
        prog=prog or f"alignd serve {role}",
        description=f"Serve the {role} service. Flags override ALIGND_* environment variables.",
    )
    add_settings_flags(parser, settings_cls)
    return parser


def main(role: str, argv: Sequence[str] | None = None) -> int:
    """Parses flags, builds the server and runs it until SIGTERM/SIGINT."""
    if role not in ROLES:
        print(f"unknown role {role!r}; choose from {', '.join(ROLES)}", file=sys.stderr)
        return 2
    args = parser_for(role).parse_args(argv)
    settings_cls, _ = ROLES[role]
    try:
        settings = settings_from_args(settings_cls, args)
    except ValueError as err:
        print(f"invalid settings: {err}", file=sys.stderr)
        return 2
    if role == "trainer":
        from alignd_server.trainer.parallel import launch

        code = launch(settings)
        if code is not None:
            return code
    try:
        run(build_server(role, settings))
    except (OSError, RuntimeError, ValueError) as err:  # missing model, port in use, bad files
        print(f"alignd serve {role}: {err}", file=sys.stderr)
        return 1
    return 0
