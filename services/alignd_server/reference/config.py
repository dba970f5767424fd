"""Settings of the reference service (env prefix ``ALIGND_``)."""

from __future__ import annotations

from pydantic import Field

from alignd_server.common.config import BatchingServerSettings


class ReferenceSettings(BatchingServerSettings):
    """Reference service settings."""

    port: int = Field(50053, ge=0, le=65535)
    """gRPC port; 0 picks a free port."""
    metrics_port: int = Field(9093, ge=-1, le=65535)
    """Prometheus port; 0 picks a free port, -1 disables it."""
    max_connection_age_s: float | None = Field(3600.0, gt=0)
    """Ask a client connection to go away (HTTP/2 GOAWAY) after this long, whatever it carries;
    with ``max_connection_age_grace_s`` this bounds how long a connection, and anything it has
    half sent, stays in memory. Unset = connections live as long as their clients."""
    max_batch_tokens: int = Field(8192, ge=1)
    """Most padded tokens per model batch; logits of up to this many positions are held at
    once (x vocabulary x 4 bytes)."""
