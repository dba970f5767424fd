"""Settings of the reward service (env prefix ``ALIGND_``)."""

from __future__ import annotations

from pydantic import Field

from alignd_server.common.config import ModelServerSettings


class RewardSettings(ModelServerSettings):
    """Reward service settings."""

    port: int = Field(50052, ge=0, le=65535)
    """gRPC port; 0 picks a free port."""
    metrics_port: int = Field(9092, ge=-1, le=65535)
    """Prometheus port; 0 picks a free port, -1 disables it."""
    model: str = "minilm-l6"
    """Reward model: a bundled name or a local sequence-classifier directory (one label)."""
    max_sequence_length: int = Field(512, ge=2, le=1_048_576)
    """Most tokens in one (prompt, response) item; longer items are rejected."""
