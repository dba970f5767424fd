"""The platform: where the four services are, how to reach them, and a local one on loopback.

A :class:`Platform` holds the targets of the generation (one or more replicas), reward,
reference and trainer services, the TLS files and the bearer token, and hands out one cached
client per service. It comes from arguments, a YAML file (:class:`PlatformConfig`), ``ALIGND_*``
environment variables (:class:`PlatformEnv`), or :meth:`Platform.local`, which starts the
services as child processes on 127.0.0.1 and records them in ``<dir>/platform.json``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, cast

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from alignd import settings
from alignd.channel import TLSConfig
from alignd.clients import GenerationClient, ReferenceClient, RewardClient, TrainerClient
from alignd.clients.base import ClientBase
from alignd.errors import AligndError
from alignd.local import CLIENTS, LocalService, free_port
from alignd.models import resolve_model

log = logging.getLogger(__name__)

ROLES: tuple[str, ...] = tuple(CLIENTS)
STATE_FILE = "platform.json"
DEFAULT_MODELS = {
    "generation": "smollm2-135m",
    "reward": "minilm-l6",
    "reference": "smollm2-135m",
    "trainer": "smollm2-135m",
}
"""The model each service of a local platform serves unless told otherwise."""

Role = Literal["generation", "reward", "reference", "trainer"]
Target = Annotated[str, Field(min_length=1, pattern=r"^\S+$")]
M = TypeVar("M", bound=BaseModel)


class PlatformConfigError(ValueError):
    """A platform configuration that does not validate; the message names each bad field."""


class TLSFiles(BaseModel):
    """TLS files of the platform's clients (the ``tls:`` section)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    ca: Path | None = None
    """PEM CA bundle that signed the servers' certificates; unset = the system roots."""
    cert: Path | None = None
    """PEM client certificate, for mutual TLS (together with ``key``)."""
    key: Path | None = None
    """PEM private key of ``cert``."""
    server_name: str | None = None
    """Expected server name, when it differs from the targets' host."""

    @model_validator(mode="after")
    def _pair(self) -> TLSFiles:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key must be given together (mutual TLS)")
        return self

    def to_tls(self) -> TLSConfig:
        return TLSConfig(self.ca, self.cert, self.key, self.server_name)


class ServiceTargets(BaseModel):
    """``host:port`` of each service (the ``services:`` section); any may be absent."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    generation: list[Target] = []
    """Generation replicas: one target or a list (jobs spread requests over them)."""
    generation_dns: Target | None = None
    """Instead of ``generation``: ``HOST:PORT`` of a name whose DNS records are the replicas
    (a headless Service: one record per ready pod), resolved when the platform is made and
    again when a replica fails (:meth:`Platform.rediscover`)."""
    reward: Target | None = None
    """The reward service."""
    reference: Target | None = None
    """The reference service."""
    trainer: Target | None = None
    """The trainer service."""

    @field_validator("generation", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _some(self) -> ServiceTargets:
        if self.generation and self.generation_dns:
            raise ValueError("give generation or generation_dns, not both")
        if not any(self.targets().values()) and not self.generation_dns:
            raise ValueError(f"no service configured; set at least one of {', '.join(ROLES)}")
        return self

    def targets(self) -> dict[str, list[str]]:
        """Every role with its targets (an empty list when the service is absent)."""
        return {role: _as_list(getattr(self, role)) for role in ROLES}


class PlatformConfig(BaseModel):
    """A platform as written in YAML: ``services``, ``tls`` and ``token`` or ``token_file``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    services: ServiceTargets
    """Targets of the services."""
    tls: TLSFiles | None = None
    """TLS files; unset = plaintext."""
    token: SecretStr | None = None
    """Bearer token sent on every call."""
    token_file: Path | None = None
    """File whose first non-empty line is the bearer token (instead of ``token``)."""

    @field_validator("token_file")
    @classmethod
    def _one_token(cls, value: Path | None, info: Any) -> Path | None:
        if value is not None and info.data.get("token") is not None:
            raise ValueError("give token or token_file, not both")
        return value

    def relative_to(self, base: Path) -> PlatformConfig:
        """The same config with relative file paths taken from ``base``."""

        def resolve(path: Path | None) -> Path | None:
            return None if path is None else base / path.expanduser()

        tls = self.tls and self.tls.model_copy(
            update={name: resolve(getattr(self.tls, name)) for name in ("ca", "cert", "key")}
        )
        return self.model_copy(update={"tls": tls, "token_file": resolve(self.token_file)})


class ProcessRecord(BaseModel):
    """One service process of a local platform, as recorded in its state file.

    Attributes:
        pid: process id (the leader of its own session when started detached).
        target: ``127.0.0.1:port`` of its gRPC server.
        metrics_port: port of its Prometheus ``/metrics`` endpoint.
        model: the model directory it serves.
        log: file receiving its output.
    """

    model_config = ConfigDict(extra="forbid")

    pid: int
    target: str
    metrics_port: int
    model: str
    log: Path


class PlatformState(PlatformConfig):
    """``<dir>/platform.json`` of a local platform: its config plus the processes."""

    processes: dict[Role, ProcessRecord] = {}
    started_at: float = 0.0


class PlatformEnv(BaseSettings):
    """A platform described by ``ALIGND_*`` environment variables (:meth:`Platform.from_env`)."""

    model_config = SettingsConfigDict(
        env_prefix="ALIGND_", extra="ignore", use_attribute_docstrings=True
    )

    generation_target: str | None = None
    """``host:port`` of the generation service; several replicas separated by commas."""
    generation_dns: str | None = None
    """Instead: ``host:port`` of a name whose DNS records are the generation replicas (a
    headless Service)."""
    reward_target: str | None = None
    """``host:port`` of the reward service."""
    reference_target: str | None = None
    """``host:port`` of the reference service."""
    trainer_target: str | None = None
    """``host:port`` of the trainer service."""
    token: SecretStr | None = None
    """Bearer token sent on every call."""
    token_file: Path | None = None
    """File holding the bearer token (first non-empty line)."""
    tls_ca: Path | None = None
    """PEM CA bundle of the servers' certificates; setting any ``ALIGND_TLS_*`` turns on TLS."""
    tls_client_cert: Path | None = None
    """PEM client certificate, for mutual TLS."""
    tls_client_key: Path | None = None
    """PEM private key of the client certificate."""
    tls_server_name: str | None = None
    """Expected server name, when it differs from the targets' host."""

    def to_config(self) -> PlatformConfig:
        """The equivalent :class:`PlatformConfig`; errors name the environment variables."""
        tls = {
            "ca": self.tls_ca,
            "cert": self.tls_client_cert,
            "key": self.tls_client_key,
            "server_name": self.tls_server_name,
        }
        generation = [t.strip() for t in (self.generation_target or "").split(",") if t.strip()]
        document = {
            "services": {
                "generation": generation,
                "generation_dns": self.generation_dns,
                "reward": self.reward_target,
                "reference": self.reference_target,
                "trainer": self.trainer_target,
            },
            "tls": tls if any(v is not None for v in tls.values()) else None,
            "token": self.token,
            "token_file": self.token_file,
        }
        names = {f"services.{role}": f"ALIGND_{role.upper()}_TARGET" for role in ROLES}
        names["services.generation_dns"] = "ALIGND_GENERATION_DNS"
        names.update(
            {
                "tls.ca": "ALIGND_TLS_CA",
                "tls.cert": "ALIGND_TLS_CLIENT_CERT",
                "tls.key": "ALIGND_TLS_CLIENT_KEY",
                "tls.server_name": "ALIGND_TLS_SERVER_NAME",
            },
            services="ALIGND_{GENERATION,REWARD,REFERENCE,TRAINER}_TARGET",
            tls="ALIGND_TLS_CLIENT_CERT, ALIGND_TLS_CLIENT_KEY",
            token="ALIGND_TOKEN",
            token_file="ALIGND_TOKEN_FILE",
        )
        return _validate(PlatformConfig, document, "environment", names)


def _system_resolver(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (A and AAAA records)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0].split("%")[0] for info in infos]


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _validate(model: type[M], document: Any, source: str, names: Mapping[str, str] = {}) -> M:
    """``model.model_validate(document)``, with one line per error naming the field."""
    try:
        return model.model_validate(document)
    except ValidationError as err:
        lines = []
        for error in err.errors():
            loc = [str(part) for part in error["loc"]]
            field = ".".join(loc) or "(top level)"
            for size in (2, 1):  # a renamed prefix ("services.reward", "tls") keeps its rest
                if ".".join(loc[:size]) in names and len(loc) >= size:
                    field = ".".join([names[".".join(loc[:size])], *loc[size:]])
                    break
            lines.append(f"  {field}: {error['msg'].removeprefix('Value error, ')}")
        raise PlatformConfigError(
            f"invalid platform config ({source}):\n" + "\n".join(lines)
        ) from None


def _load(model: type[M], path: Path) -> M:
    """Reads a YAML (or JSON) document from ``path`` and validates it as ``model``."""
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PlatformConfigError(f"invalid platform config ({path}): not YAML: {err}") from None
    if not isinstance(document, dict):
        raise PlatformConfigError(f"invalid platform config ({path}): expected a mapping")
    return _validate(model, document, str(path))


def read_token(path: Path | str) -> str:
    """The first non-empty line of a token file (servers accept several lines, for rotation)."""
    for line in Path(path).read_text().splitlines():
        if line.strip():
            return line.strip()
    raise PlatformConfigError(f"token_file {path} holds no token")


def default_directory(home: Path | str | None = None) -> Path:
    """Where a local platform keeps its state file and logs: ``<ALIGND_HOME>/platform``."""
    return (settings.home() if home is None else Path(home).expanduser()) / "platform"


def state_path(directory: Path | str) -> Path:
    """The state file of a local platform given its directory (or the file itself)."""
    path = Path(directory)
    return path if path.suffix == ".json" else path / STATE_FILE


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


def _check(role: str, client: ClientBase, timeout: float) -> ServiceStatus:
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
            "generation": _as_list(generation),
            "generation_dns": generation_dns,
            "reward": reward,
            "reference": reference,
            "trainer": trainer,
        }
        self.targets = _validate(ServiceTargets, services, "arguments").targets()
        self.generation_dns = generation_dns
        self._resolve = resolver or _system_resolver
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
        config = _load(PlatformConfig, path).relative_to(path.parent)
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
        state = _load(PlatformState, path)
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
        unknown = sorted(set(roles) - set(ROLES))
        if unknown:
            raise ValueError(f"unknown roles {unknown}; choose from {', '.join(ROLES)}")
        directory = Path(directory) if directory is not None else default_directory(home)
        _refuse_if_running(directory)
        chosen = {role: (models or {}).get(role, DEFAULT_MODELS[role]) for role in roles}
        resolved = {role: str(resolve_model(model, home)) for role, model in chosen.items()}
        (directory / "logs").mkdir(parents=True, exist_ok=True)
        roots = [str(Path(r).resolve()) for r in storage_roots or [Path.cwd()]]
        logs = directory / "logs"
        services = {
            role: LocalService(role, log_file=logs / f"{role}.log", stop_timeout=stop_timeout)
            for role in resolved
        }
        records: dict[str, ProcessRecord] = {}
        try:
            for role, model in resolved.items():
                flags = ["--auth-token-file", str(token_file)] if token_file else []
                if role in ("generation", "trainer"):
                    flags += [arg for root in roots for arg in ("--storage-root", root)]
                if role == "trainer" and "generation" in services:
                    flags += ["--push-targets", services["generation"].target]
                flags += (extra_args or {}).get(role, ())
                services[role].args = ["--model", model, "--metrics-port", str(free_port()), *flags]
                records[role] = _spawn(services[role], detach)
            _wait_serving(services, ready_timeout)
            targets = {role: s.target for role, s in services.items()}
            state = PlatformState(
                services=targets, token_file=token_file, processes=records, started_at=time.time()
            )
            _write_state(state_path(directory), state)
            platform = cls.from_state(directory)
        except BaseException:
            _stop(services.values())
            raise
        platform._owned = [] if detach else list(services.values())
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
        """``ip:port`` of every address ``generation_dns`` resolves to now, in order.

        Raises:
            PlatformConfigError: it resolves to nothing.
        """
        host, _, port = self.generation_dns.rpartition(":")
        try:
            addresses = sorted(set(self._resolve(host, int(port))))
        except (OSError, ValueError) as err:
            raise PlatformConfigError(f"generation_dns {self.generation_dns!r}: {err}") from None
        if not addresses:
            raise PlatformConfigError(f"generation_dns {self.generation_dns!r} has no records")
        return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses]

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
            return list(pool.map(lambda check: _check(*check, timeout), checks))

    def close(self) -> None:
        """Closes the clients; stops the services this platform started (unless detached)."""
        for clients in self._clients.values():
            for client in clients:
                client.close()
        self._clients.clear()
        if self._owned:
            _stop(self._owned)
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


def _spawn(service: LocalService, detach: bool) -> ProcessRecord:
    """Starts ``service``'s process without waiting for it; ``detach`` gives it its own session
    (and process group), so it outlives this process and a Ctrl-C here does not reach it.

    ``service.args`` start with ``--model MODEL --metrics-port PORT``.
    """
    service.launch(detach)
    log_file = cast(Path, service.log_file)
    return ProcessRecord(
        pid=service.process.pid,
        target=service.target,
        metrics_port=int(service.args[3]),
        model=service.args[1],
        log=log_file,
    )


def _wait_serving(services: Mapping[str, LocalService], timeout: float) -> None:
    """Polls every service's health until all report SERVING; fails as soon as one exits."""
    deadline = time.monotonic() + timeout
    clients = {role: s.client(timeout=10, retries=1) for role, s in services.items()}
    pending = dict(services)
    try:
        while pending:
            for role, service in list(pending.items()):
                code = cast(subprocess.Popen, service.process).poll()
                if code is not None:
                    raise RuntimeError(
                        f"{role} service exited with code {code}; see {service.log_file}"
                    )
                with contextlib.suppress(AligndError):
                    if clients[role].health(timeout=1.0) == "SERVING":
                        del pending[role]
            if pending and time.monotonic() > deadline:
                logs = ", ".join(str(s.log_file) for s in pending.values())
                raise TimeoutError(
                    f"not SERVING after {timeout:.0f}s: {', '.join(pending)}; see {logs}"
                )
            time.sleep(0.2 if pending else 0)
    finally:
        for client in clients.values():
            client.close()


def _stop(services: Iterable[LocalService]) -> None:
    """SIGTERM to every process at once, then each waited for (SIGKILL after its timeout)."""
    services = [s for s in services if s.process is not None]
    for service in services:
        if service.process.poll() is None:
            service.process.terminate()
    for service in services:
        service.stop()


def _write_state(path: Path, state: PlatformState) -> None:
    """Writes the state file atomically (a temporary sibling, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(state.model_dump_json(indent=2, exclude_none=True) + "\n")
    os.replace(tmp, path)


def _alive(pid: int, role: str) -> bool:
    """Whether ``pid`` is still the ``role`` service (not exited, a zombie, or a reused pid)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    if not Path("/proc/self").exists():  # no procfs: trust the pid
        return True
    try:
        return f"alignd_server.{role}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _refuse_if_running(directory: Path) -> None:
    path = state_path(directory)
    if not path.is_file():
        return
    state = _load(PlatformState, path)
    running = [role for role, p in state.processes.items() if _alive(p.pid, role)]
    if running:
        raise RuntimeError(
            f"a platform already runs from {directory} ({', '.join(running)}); "
            f"stop it first: alignd down --dir {directory}"
        )


def stop_local(directory: Path | str, timeout: float = 30.0) -> dict[str, str]:
    """Stops the processes a local platform's state file lists and removes the file.

    Each gets SIGTERM (a graceful shutdown); those still running after ``timeout`` seconds get
    SIGKILL, with their process group when they lead one (``detach``).

    Returns:
        Per role: ``stopped``, ``killed`` or ``not running``.

    Raises:
        FileNotFoundError: there is no state file.
    """
    path = state_path(directory)
    if not path.is_file():
        raise FileNotFoundError(f"no local platform in {path.parent} ({path} is missing)")
    state = _load(PlatformState, path)
    outcome = {role: "not running" for role in state.processes}
    live = {role: p.pid for role, p in state.processes.items() if _alive(p.pid, role)}
    for role, pid in live.items():
        os.kill(pid, signal.SIGTERM)
        outcome[role] = "stopped"
    live = _wait_gone(live, timeout)
    for role, pid in live.items():
        log.warning("%s (pid %d) did not stop in %.0fs; killing it", role, pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        outcome[role] = "killed"
    _wait_gone(live, 10.0)
    path.unlink()
    return outcome


def _wait_gone(pids: Mapping[str, int], timeout: float) -> dict[str, int]:
    """Polls until the processes exit or ``timeout`` passes; returns those still running."""
    deadline = time.monotonic() + timeout
    live = {role: pid for role, pid in pids.items() if _alive(pid, role)}
    while live and time.monotonic() < deadline:
        time.sleep(0.1)
        live = {role: pid for role, pid in live.items() if _alive(pid, role)}
    return live
