"""Settings of the trainer service (env prefix ``ALIGND_``) and the ranks torchrun sets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from alignd_server.common.config import StorageServerSettings
from alignd_server.trainer.targets import split_address


class TrainerSettings(StorageServerSettings):
    """Trainer service settings. ``model`` is the default of ``Initialize.model_path``."""

    port: int = Field(50054, ge=0, le=65535)
    """gRPC port; 0 picks a free port."""
    metrics_port: int = Field(9094, ge=-1, le=65535)
    """Prometheus port; 0 picks a free port, -1 disables it."""
    push_targets: list[str] = Field(default_factory=list)
    """Generation services PushWeights may connect to, each ``HOST:PORT``: a target must be
    listed, or be an address that the listed DNS name resolves to (a headless Service's
    records are its pods). Repeat the flag for several. Empty = PushWeights refuses every
    target; the push credentials go to allowed targets only."""
    push_token_file: Path | None = None
    """Bearer token (first line of the file) PushWeights presents to generation services."""
    push_tls_ca: Path | None = None
    """PEM CA bundle that signed the generation services' certificates (TLS for PushWeights)."""
    push_tls_cert: Path | None = None
    """PEM client certificate PushWeights presents (generation services with mutual TLS)."""
    push_tls_key: Path | None = None
    """PEM key of ``push_tls_cert``."""
    nproc: int = Field(1, ge=1, le=1024)
    """Data-parallel ranks on this node (torchrun's --nproc-per-node); rank 0 serves gRPC."""
    nnodes: int = Field(1, ge=1, le=4096)
    """Nodes taking part (each runs ``--nproc`` ranks); > 1 needs master_addr reachable."""
    node_rank: int = Field(0, ge=0)
    """This node's index in 0 .. nnodes - 1 (in Kubernetes: the StatefulSet pod ordinal)."""
    master_addr: str = "127.0.0.1"
    """Address of node 0, where the ranks meet (in Kubernetes: pod 0 of a headless Service)."""
    master_port: int = Field(29500, ge=1, le=65535)
    """Port of the rendezvous store on node 0."""
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Collective backend: ``auto`` = nccl on CUDA devices, gloo on CPU."""
    dist_timeout_s: float = Field(1800.0, gt=0)
    """How long a collective may wait for the other ranks before the group fails."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """How several ranks hold the model: ``ddp`` keeps a replica per rank and all-reduces
    gradients during the backward (PyTorch's DistributedDataParallel); ``fsdp`` shards
    parameters, gradients and optimizer state over the ranks (FSDP2, per transformer block),
    for models whose training state does not fit one device. Needs ``nproc`` × ``nnodes`` > 1
    for ``fsdp``; one rank runs the model whole."""

    @model_validator(mode="after")
    def _parallel_needs_ranks(self) -> TrainerSettings:
        if self.parallel == "fsdp" and self.nproc * self.nnodes == 1:
            raise ValueError(
                "parallel: fsdp shards over several ranks; give --nproc (or --nnodes) > 1"
            )
        return self

    @field_validator("push_targets")
    @classmethod
    def _push_targets(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            split_address(entry)
        return entries


class RankEnvironment(BaseSettings):
    """Where this process sits in the group; torchrun sets these variables (no prefix)."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore")

    rank: int = Field(0, ge=0)
    """Global rank, 0 .. world_size - 1."""
    world_size: int = Field(1, ge=1)
    """Ranks in the group."""
    local_rank: int = Field(0, ge=0)
    """Rank on this node (picks the CUDA device)."""
    torchelastic_run_id: str | None = None
    """Set by torchrun: this process is one of its ranks."""


def settings_environment(settings: TrainerSettings) -> dict[str, str]:
    """``settings`` as the ``ALIGND_*`` variables that reproduce them in another process."""
    env = {}
    for name, value in settings.model_dump(mode="json", exclude_none=True).items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        env[f"ALIGND_{name.upper()}"] = text
    return env
