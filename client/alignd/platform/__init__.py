"""The platform: where the four services are, how to reach them, and a local one on loopback.

A :class:`Platform` holds the targets of the generation (one or more replicas, or a DNS name
whose records are the replicas), reward, reference and trainer services, the TLS files and the
bearer token, and hands out one cached client per service. It comes from arguments, a YAML file
(:class:`PlatformConfig`), ``ALIGND_*`` environment variables (:class:`PlatformEnv`), a local
platform's state file, Kubernetes labels, or :meth:`Platform.local`, which starts the services
as child processes on 127.0.0.1 and records them in ``<dir>/platform.json``.

The package: ``config`` (the models and their loading), ``environment``, ``discovery`` (DNS),
``status``, ``supervisor`` (the local platform's processes and state file); this module is the
:class:`Platform` itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

from alignd.channel import TLSConfig
from alignd.clients import GenerationClient, ReferenceClient, RewardClient, TrainerClient
from alignd.clients.base import ClientBase
from alignd.local import CLIENTS, LocalService, stop_all
from alignd.platform.config import (
    ROLES,
    PlatformConfig,
    PlatformConfigError,
    PlatformState,
    ProcessRecord,
    ServiceTargets,
    TLSFiles,
    as_list,
    load,
    read_token,
    validate,
)
from alignd.platform.discovery import replicas, system_resolver
from alignd.platform.environment import PlatformEnv
from alignd.platform.status import ServiceStatus
from alignd.platform.status import check as check_service
from alignd.platform.supervisor import (
    DEFAULT_MODELS,
    STATE_FILE,
    default_directory,
    start_local,
    state_path,
    stop_local,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODELS",
    "ROLES",
    "STATE_FILE",
    "Platform",
    "PlatformConfig",
    "PlatformConfigError",
    "PlatformEnv",
    "PlatformState",
    "ProcessRecord",
    "ServiceStatus",
    "ServiceTargets",
    "TLSFiles",
    "default_directory",
    "read_token",
    "state_path",
    "stop_local",
]


class Platform:
    """The services of one RLHF platform and a cached client for each.

    Args:
        generation: target of the generation service, or a list of replica targets.
        reward: target of the reward service.
        reference: target of the reference service.
        trainer: target of the trainer service.
        tls: TLS settings of every client; None = plaintext.
        token: bearer token sent on every call.
        token_file: file holding the token (first non-empty line), instead of ``token``.
        timeout: default deadline of each call, in seconds; None = each client's own default
            (60 s; the trainer's 30 min). Jobs set their own (``trainer_timeout_s``,
            ``service_timeout_s``).
        generation_dns: instead of ``generation``, ``HOST:PORT`` of a name whose DNS records
            are the replicas (a headless Service), resolved now and by :meth:`rediscover`.
        resolver: how a host becomes its addresses (default: the system resolver).
        **channel_args: passed to every client (see :func:`alignd.channel.create_channel`).
    """

    def __init__(
        self,
        generation: str | Sequence[str] | None = None,
        reward: str | None = None,
        reference: str | None = None,
        trainer: str | None = None,
        *,
        tls: TLSConfig | None = None,
        token: str | None = None,
        token_file: Path | str | None = None,
        timeout: float | None = None,
        generation_dns: str | None = None,
        resolver: Callable[[str, int], Sequence[str]] | None = None,
        **channel_args: Any,
    ) -> None:
        services = {
            "generation": as_list(generation),
            "generation_dns": generation_dns,
            "reward": reward,
            "reference": reference,
            "trainer": trainer,
        }
        self.targets = validate(ServiceTargets, services, "arguments").targets()
        self.generation_dns = generation_dns
        self._resolve = resolver or system_resolver
        if generation_dns is not None:
            self.targets["generation"] = self._replicas()
        if token is not None and token_file is not None:
            raise PlatformConfigError("give token or token_file, not both")
        self.tls = tls
        self.token_file = Path(token_file) if token_file is not None else None
        self._token = read_token(token_file) if token_file is not None else token
        self._client_args = {"timeout": timeout, **channel_args}
        self._clients: dict[str, list[ClientBase]] = {}
        self.directory: Path | None = None
        self.processes: dict[str, ProcessRecord] = {}
        self._owned: list[LocalService] = []

    @classmethod
    def from_config(cls, config: PlatformConfig, **client_args: Any) -> Platform:
        """A platform from a validated :class:`PlatformConfig`."""
        s = config.services
        return cls(
            s.generation or None,
            s.reward,
            s.reference,
            s.trainer,
            generation_dns=s.generation_dns,
            tls=config.tls.to_tls() if config.tls else None,
            token=config.token.get_secret_value() if config.token else None,
            token_file=config.token_file,
            **client_args,
        )

    @classmethod
    def from_yaml(cls, path: Path | str, **client_args: Any) -> Platform:
        """A platform from a YAML file; relative file paths are taken from the file's folder.

        Raises:
            PlatformConfigError: the file is not YAML or does not validate (names the field).
        """
        path = Path(path)
        config = load(PlatformConfig, path).relative_to(path.parent)
        return cls.from_config(config, **client_args)

    @classmethod
    def from_env(cls, **client_args: Any) -> Platform:
        """A platform from ``ALIGND_{GENERATION,REWARD,REFERENCE,TRAINER}_TARGET``, ``ALIGND_TOKEN``
        or ``ALIGND_TOKEN_FILE`` and ``ALIGND_TLS_*`` (see :class:`PlatformEnv`).

        Raises:
            PlatformConfigError: the variables do not validate (the message names them).
        """
        return cls.from_config(PlatformEnv().to_config(), **client_args)

    @classmethod
    def from_state(cls, directory: Path | str, **client_args: Any) -> Platform:
        """The platform a local platform's state file (or its directory) describes."""
        path = state_path(directory)
        if not path.is_file():
            raise FileNotFoundError(f"no local platform in {path.parent} ({path} is missing)")
        state = load(PlatformState, path)
        platform = cls.from_config(state, **client_args)
        platform.directory, platform.processes = path.parent, dict(state.processes)
        return platform

    @classmethod
    def from_kubernetes(
        cls, release: str, namespace: str = "default", *, api_client: Any = None,
        **client_args: Any,
    ) -> Platform:  # fmt: skip
        """The services of Helm release ``release``, found by their labels through the
        Kubernetes API (in-cluster config, else kubeconfig); generation replicas are
        addressed pod by pod. ``client_args`` (tls, token, token_file, …) as for
        :class:`Platform`."""
        from alignd.kube import discover

        targets = discover(release, namespace, api_client)
        if not targets:
            raise PlatformConfigError(
                f"no alignd services of release {release!r} in namespace {namespace!r}"
            )
        singles = {r: t[0] for r, t in targets.items() if r != "generation" and t}
        return cls(generation=targets.get("generation"), **singles, **client_args)

    @classmethod
    def local(
        cls,
        directory: Path | str | None = None,
        *,
        roles: Sequence[str] = ROLES,
        models: Mapping[str, str | Path] | None = None,
        extra_args: Mapping[str, Sequence[str]] | None = None,
        home: Path | str | None = None,
        token_file: Path | str | None = None,
        storage_roots: Sequence[Path | str] | None = None,
        detach: bool = False,
        ready_timeout: float = 300.0,
        stop_timeout: float = 30.0,
    ) -> Platform:
        """Starts the services on 127.0.0.1 as child processes and waits until all serve.

        Args:
            directory: holds ``platform.json`` and ``logs/<role>.log``; default
                :func:`default_directory`.
            roles: the services to start.
            models: model (bundled name or directory) per role; default :data:`DEFAULT_MODELS`.
            extra_args: more ``alignd serve ROLE`` flags per role.
            home: alignd home that bundled model names resolve in.
            token_file: bearer tokens the services require (and the clients send).
            storage_roots: where the trainer and generation services may read and write the
                paths jobs send them (checkpoints, run directories); default: the current
                directory. The trainer may push weights to the generation service started here.
            detach: start each service in its own session, so it outlives this process, and
                leave it running on :meth:`close` (``alignd down`` stops it).
            ready_timeout: seconds to wait for every service to report SERVING.
            stop_timeout: seconds between SIGTERM and SIGKILL when stopping.

        Raises:
            FileNotFoundError: a bundled model is not prepared (the message says how).
            RuntimeError: a platform already runs from ``directory``, or a service exited.
            TimeoutError: a service did not report SERVING in time.
        """
        directory = Path(directory) if directory is not None else default_directory(home)
        services = start_local(
            directory, roles=roles, models=models or {}, extra_args=extra_args or {},
            home=home, token_file=token_file, storage_roots=storage_roots or [Path.cwd()],
            detach=detach, ready_timeout=ready_timeout, stop_timeout=stop_timeout,
        )  # fmt: skip
        try:
            platform = cls.from_state(directory)
        except BaseException:
            stop_all(services)
            raise
        platform._owned = [] if detach else services
        return platform

    @property
    def roles(self) -> list[str]:
        """The services this platform has."""
        return [role for role, targets in self.targets.items() if targets]

    @property
    def generation_targets(self) -> list[str]:
        """Targets of the generation replicas (empty when there is no generation service)."""
        return list(self.targets["generation"])

    def clients(self, role: str) -> list[ClientBase]:
        """The clients of ``role``, one per target, created on first use and cached.

        Raises:
            LookupError: the platform has no such service.
        """
        if role not in self.targets:
            raise ValueError(f"unknown role {role!r}; choose from {', '.join(ROLES)}")
        if not self.targets[role]:
            raise LookupError(
                f"this platform has no {role} service (it has: {', '.join(self.roles)})"
            )
        if role not in self._clients:
            make = CLIENTS[role]
            self._clients[role] = [
                make(t, token=self._token, tls=self.tls, **self._client_args)
                for t in self.targets[role]
            ]
        return self._clients[role]

    def _replicas(self) -> list[str]:
        """``ip:port`` of every address ``generation_dns`` resolves to now (PlatformConfigError
        when it resolves to nothing)."""
        return replicas(self.generation_dns, self._resolve)

    def rediscover(self) -> bool:
        """Resolves ``generation_dns`` again (after a replica failed); returns whether the
        replicas changed. A platform with fixed targets, or a lookup that fails now, keeps
        the replicas it has."""
        if self.generation_dns is None:
            return False
        try:
            replicas = self._replicas()
        except PlatformConfigError as err:
            log.warning("keeping %d generation replicas: %s", len(self.targets["generation"]), err)
            return False
        if replicas == self.targets["generation"]:
            return False
        log.info("generation replicas now %s", ", ".join(replicas))
        self.targets["generation"] = replicas
        for client in self._clients.pop("generation", []):
            client.close()
        return True

    def generation_clients(self) -> list[GenerationClient]:
        """One client per generation replica."""
        return cast(list[GenerationClient], self.clients("generation"))

    @property
    def generation(self) -> GenerationClient:
        """Client of the (first) generation replica."""
        return self.generation_clients()[0]

    @property
    def reward(self) -> RewardClient:
        """Client of the reward service (LookupError when the platform has none)."""
        return cast(RewardClient, self.clients("reward")[0])

    @property
    def reference(self) -> ReferenceClient:
        """Client of the reference service (LookupError when the platform has none)."""
        return cast(ReferenceClient, self.clients("reference")[0])

    @property
    def trainer(self) -> TrainerClient:
        """Client of the trainer service (LookupError when the platform has none)."""
        return cast(TrainerClient, self.clients("trainer")[0])

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Blocks until every service reports SERVING (TimeoutError after ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        for role in self.roles:
            for client in self.clients(role):
                client.wait_ready(max(0.1, deadline - time.monotonic()))

    def status(self, timeout: float = 5.0) -> list[ServiceStatus]:
        """Health (per service name), model, and for generation engine and weights version,
        of every service target, in role order; a check that fails gives its status code."""
        checks = [(role, client) for role in self.roles for client in self.clients(role)]
        with ThreadPoolExecutor(max_workers=len(checks)) as pool:
            return list(pool.map(lambda check: check_service(*check, timeout), checks))

    def close(self) -> None:
        """Closes the clients; stops the services this platform started (unless detached)."""
        for clients in self._clients.values():
            for client in clients:
                client.close()
        self._clients.clear()
        if self._owned:
            stop_all(self._owned)
            self._owned = []
            if self.directory is not None:
                state_path(self.directory).unlink(missing_ok=True)

    def __enter__(self) -> Platform:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        targets = ", ".join(f"{role}={self.targets[role]}" for role in self.roles)
        return f"Platform({targets})"
