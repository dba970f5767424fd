"""Settings of the reward service (env prefix ``ALIGND_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from alignd_server.common.config import BatchingServerSettings

FORMATS = ("alignd", "pair", "concat", "chat")
"""Input formats of model scorers (see :mod:`alignd_server.reward.scorers`)."""


def parse_scorer(spec: str) -> tuple[str, str, str, str | None]:
    """``NAME=model:PATH[:FORMAT]`` or ``NAME=function:MODULE:FUNC`` as (name, kind, target,
    format); a model PATH cannot hold ``:``.

    Raises:
        ValueError: naming the spec and what is wrong with it.
    """
    name, _, rest = spec.partition("=")
    kind, _, target = rest.partition(":")
    if not name or kind not in ("model", "function") or not target:
        raise ValueError(
            f"scorer {spec!r} must be NAME=model:PATH[:FORMAT] or NAME=function:MODULE:FUNC"
        )
    if kind == "function":
        return name, kind, target, None
    path, colon, format = target.partition(":")
    if colon and format not in FORMATS:
        raise ValueError(f"scorer {spec!r}: FORMAT {format!r} is not one of {', '.join(FORMATS)}"
                         " (a model PATH cannot hold ':')")  # fmt: skip
    if not path:
        raise ValueError(f"scorer {spec!r}: PATH is empty")
    return name, kind, path, format or None


class RewardSettings(BatchingServerSettings):
    """Reward service settings."""

    port: int = Field(50052, ge=0, le=65535)
    """gRPC port; 0 picks a free port."""
    metrics_port: int = Field(9092, ge=-1, le=65535)
    """Prometheus port; 0 picks a free port, -1 disables it."""
    max_connection_age_s: float | None = Field(3600.0, gt=0)
    """Ask a client connection to go away (HTTP/2 GOAWAY) after this long, whatever it carries;
    with ``max_connection_age_grace_s`` this bounds how long a connection, and anything it has
    half sent, stays in memory. Unset = connections live as long as their clients."""
    model: str = "minilm-l6"
    """Model of the scorer named ``default``: a bundled name or a local sequence-classifier
    directory with one label; ``none`` for no default model scorer."""
    model_format: Literal["", "alignd", "pair", "concat", "chat"] = ""
    """Input format of the default model (how it reads a prompt and response: see the
    README's reward section); empty = its ``alignd_reward.json``, else the default for its
    type (``pair`` for encoders, ``chat`` for decoders with a chat template, else
    ``concat``)."""
    max_sequence_length: int = Field(512, ge=2, le=1_048_576)
    """Most tokens in one (prompt, response) item; longer items are rejected."""
    scorers: list[str] = Field(default_factory=list)
    """More scorers, each ``NAME=model:PATH_OR_BUNDLED_NAME[:FORMAT]`` (FORMAT one of
    ``alignd``, ``pair``, ``concat``, ``chat``; unset as for ``model_format``) or
    ``NAME=function:MODULE:FUNC`` (a callable ``f(prompt, response, label) -> float``); repeat
    the flag for several."""
    default_scorer: str = "default"
    """Scorer used when a request names none."""

    @field_validator("scorers")
    @classmethod
    def _scorer_specs(cls, specs: list[str]) -> list[str]:
        for spec in specs:
            _, kind, target, _ = parse_scorer(spec)
            if kind == "function" and ":" not in target:
                raise ValueError(f"scorer {spec!r}: a function is named MODULE:FUNC")
        return specs
