"""Settings shared by every service: network, limits, security, observability.

One pydantic-settings class per service (a subclass of :class:`ServerSettings`) declares its
fields with a docstring each. Values come from, in order of precedence: command-line flags
(``--metrics-port``), environment variables (``ALIGND_METRICS_PORT``), then the defaults here.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from alignd_server.common.memory import trim_interval

S = TypeVar("S", bound="ServerSettings")

MiB = 1024 * 1024


class ServerSettings(BaseSettings):
    """Network, limit and security settings of one gRPC server process."""

    model_config = SettingsConfigDict(
        env_prefix="ALIGND_", extra="forbid", use_attribute_docstrings=True
    )

    host: str = "127.0.0.1"
    """Interface the gRPC server binds to (``0.0.0.0`` in containers)."""
    port: int = Field(50050, ge=0, le=65535)
    """gRPC port; 0 picks a free port (reported in the start-up log line)."""
    metrics_host: str = "127.0.0.1"
    """Interface of the Prometheus ``/metrics`` HTTP endpoint."""
    metrics_port: int = Field(9090, ge=-1, le=65535)
    """Port of the Prometheus endpoint; 0 picks a free port, -1 disables it."""
    max_message_bytes: int = Field(64 * MiB, ge=4 * MiB, le=2**31 - 1)
    """Largest gRPC message accepted or sent, in bytes."""
    keepalive_time_s: float = Field(30.0, gt=0)
    """Seconds between HTTP/2 keepalive pings the server sends on idle connections."""
    keepalive_timeout_s: float = Field(10.0, gt=0)
    """Seconds to wait for a keepalive ack before closing the connection."""
    grace_s: float = Field(30.0, ge=0)
    """On SIGTERM: seconds in-flight RPCs get to finish after the server stops accepting."""
    auth_token_file: Path | None = None
    """File of accepted bearer tokens, one per line (several allow rotation); unset = no auth."""
    tls_cert: Path | None = None
    """PEM server certificate (chain); enables TLS together with ``tls_key``."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert``."""
    tls_client_ca: Path | None = None
    """PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Logging level of the server process."""
    metrics_auth_token_file: Path | None = None
    """File of bearer tokens the ``/metrics`` endpoint requires (``Authorization: Bearer``,
    one token per line, read at start as auth_token_file is); unset = the endpoint is open."""
    max_concurrent_streams: int = Field(64, ge=1, le=65536)
    """Most RPCs (HTTP/2 streams) one client connection may have open at once."""
    max_concurrent_rpcs: int | None = Field(None, ge=1)
    """Most RPCs the server handles at once over all connections, counted from their headers
    (so half-sent requests count); beyond it RESOURCE_EXHAUSTED. Unset = no limit."""
    max_connection_idle_s: float | None = Field(3600.0, gt=0)
    """Close a client connection that had no RPC in flight for this long (clients reconnect
    on their next call); unset = never."""
    max_connection_age_s: float | None = Field(None, gt=0)
    """Ask a client connection to go away (HTTP/2 GOAWAY) after this long, whatever it carries;
    with ``max_connection_age_grace_s`` this bounds how long a connection, and anything it has
    half sent, stays in memory. Unset = connections live as long as their clients."""
    max_connection_age_grace_s: float = Field(300.0, gt=0)
    """After ``max_connection_age_s``: how long RPCs in flight get before the connection is
    cut."""
    malloc_trim_interval_s: float | None = Field(None, ge=0)
    """Seconds between handing freed heap memory back to the OS (glibc ``malloc_trim``), so
    RSS falls after bursts of large or abandoned requests; 0 = never; unset = every 60 s where
    the C library has ``malloc_trim``."""

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        trim_interval(self.malloc_trim_interval_s)  # an interval this platform cannot honour
        return self


def _flag_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """Maps a field annotation to an argparse ``type`` (and choices for Literals)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(inner[0])
    if origin is Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), {"choices": choices}
    if annotation in (int, float, str, Path):
        return annotation, {}
    if origin is list:
        return typing.get_args(annotation)[0], {"action": "append"}
    return str, {}


def add_settings_flags(parser: argparse.ArgumentParser, cls: type[ServerSettings]) -> None:
    """Adds one ``--flag`` per settings field (``metrics_port`` -> ``--metrics-port``).

    Flags default to ``None`` so that only flags given on the command line override the
    environment and the defaults.
    """
    for name, field in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"ALIGND_{name.upper()}"
        default = field.default_factory() if field.default_factory else field.default
        help_text = f"{field.description or ''} [env {env}, default {default!r}]"
        if field.annotation is bool:
            parser.add_argument(
                flag, dest=name, default=None, action=argparse.BooleanOptionalAction, help=help_text
            )
            continue
        kind, extra = _flag_type(field.annotation)
        parser.add_argument(flag, dest=name, default=None, type=kind, help=help_text, **extra)


def settings_from_args(cls: type[S], args: argparse.Namespace) -> S:
    """Builds settings from parsed flags (given ones win), the environment and defaults."""
    given = {k: v for k, v in vars(args).items() if k in cls.model_fields and v is not None}
    return cls(**given)


class ModelServerSettings(ServerSettings):
    """Settings of a service that holds a model: which one, where it runs, request limits."""

    model: str = "smollm2-135m"
    """A bundled model name (see ``alignd models list``) or a local model directory."""
    device: str = "cpu"
    """torch device, e.g. ``cpu`` or ``cuda:0``."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype. bfloat16/float16 are meant for GPUs (on CPU they run, slowly and
    less exactly)."""
    max_batch_size: int = Field(64, ge=1, le=65536)
    """Most items (prompts, sequences, pairs) accepted in one request."""
    deterministic: bool = False
    """Deterministic torch algorithms (``torch.use_deterministic_algorithms``; on CUDA also
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8``): the same batch gives bit-identical outputs on GPU
    too, where some kernels are then slower. With jobs' ``deterministic: true`` (isolated
    batches) runs repeat exactly."""
    max_sequence_length: int = Field(2048, ge=2, le=1_048_576)
    """Most tokens in one sequence (prompt plus completion); lowered at start to the model's
    position limit (``max_position_embeddings``) when that is smaller. Texts longer than
    ``TEXT_BYTES_PER_TOKEN`` (32) bytes per allowed token are refused before tokenization."""


class BatchingServerSettings(ModelServerSettings):
    """Settings of a service that batches items across requests (reward, reference)."""

    max_queue_size: int = Field(1024, ge=1)
    """Most items waiting for the model before new requests get RESOURCE_EXHAUSTED."""
    max_batch_tokens: int = Field(16384, ge=1)
    """Most padded tokens (items x longest item) the server puts in one model batch."""
    max_wait_ms: float = Field(5.0, ge=0)
    """How long the oldest queued item waits for more items to fill a batch, in ms."""


class StorageServerSettings(ModelServerSettings):
    """Settings of a model service that takes filesystem paths in requests."""

    storage_root: list[Path] = Field(default_factory=list)
    """Directories that paths in requests must stay inside (repeat the flag for several;
    relative request paths resolve in the first). ``..`` escapes and symlinks leading out are
    refused. Empty = alignd's home (``ALIGND_HOME``). Prepared bundled models are always
    readable."""
