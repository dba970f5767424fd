"""Settings of the trainer service (env prefix ``ALIGND_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from alignd_server.common.config import ModelServerSettings


class TrainerSettings(ModelServerSettings):
    """Trainer service settings. ``model`` is the default of ``Initialize.model_path``."""

    port: int = Field(50054, ge=0, le=65535)
    """gRPC port; 0 picks a free port."""
    metrics_port: int = Field(9094, ge=-1, le=65535)
    """Prometheus port; 0 picks a free port, -1 disables it."""
    push_token_file: Path | None = None
    """Bearer token (first line of the file) PushWeights presents to generation services."""
    push_tls_ca: Path | None = None
    """PEM CA bundle that signed the generation services' certificates (TLS for PushWeights)."""
