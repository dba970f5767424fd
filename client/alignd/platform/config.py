"""What a platform is made of, as configuration: the services' targets, TLS files, the token,
and the state file of a local platform; loaded from YAML with errors that name the field."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

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

from alignd.channel import TLSConfig
from alignd.local import CLIENTS

ROLES: tuple[str, ...] = tuple(CLIENTS)
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
        return {role: as_list(getattr(self, role)) for role in ROLES}


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


def as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def validate(model: type[M], document: Any, source: str, names: Mapping[str, str] = {}) -> M:
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


def load(model: type[M], path: Path) -> M:
    """Reads a YAML (or JSON) document from ``path`` and validates it as ``model``."""
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PlatformConfigError(f"invalid platform config ({path}): not YAML: {err}") from None
    if not isinstance(document, dict):
        raise PlatformConfigError(f"invalid platform config ({path}): expected a mapping")
    return validate(model, document, str(path))


def read_token(path: Path | str) -> str:
    """The first non-empty line of a token file (servers accept several lines, for rotation)."""
    for line in Path(path).read_text().splitlines():
        if line.strip():
            return line.strip()
    raise PlatformConfigError(f"token_file {path} holds no token")
