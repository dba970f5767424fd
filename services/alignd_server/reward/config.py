"""Settings of the reward service (env prefix ``ALIGND_``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator

from alignd_server.common.config import BatchingServerSettings

FORMATS = ("alignd", "pair", "concat", "chat")
"""Input formats of model scorers (see :mod:`alignd_server.reward.scorers`)."""


AGGREGATES = ("mean", "min", "mean_minus_std")
"""How an ensemble combines its members' scores (see :mod:`alignd_server.reward.scorers`)."""


@dataclass(frozen=True)
class ScorerSpec:
    """One ``--scorers`` entry, parsed."""

    name: str
    kind: str
    """``model``, ``function`` or ``ensemble``."""
    target: str
    """The model's path or bundled name, the function's ``MODULE:FUNC``, or the ensemble's
    members joined by commas."""
    format: str | None = None
    """A model's input format (None: its card's, else the default for its type)."""
    members: tuple[str, ...] = ()
    """An ensemble's member scorers."""
    aggregate: str = "mean"
    """An ensemble's aggregate, one of :data:`AGGREGATES`."""
    k: float = 1.0
    """``mean_minus_std``'s weight of the members' standard deviation."""


def parse_scorer(spec: str) -> ScorerSpec:
    """``NAME=model:PATH[:FORMAT]``, ``NAME=function:MODULE:FUNC`` or
    ``NAME=ensemble:A,B[,...][:AGGREGATE[:K]]``; a model PATH cannot hold ``:``.

    Raises:
        ValueError: naming the spec and what is wrong with it.
    """
    name, _, rest = spec.partition("=")
    kind, _, target = rest.partition(":")
    if not name or kind not in ("model", "function", "ensemble") or not target:
        forms = "NAME=model:PATH[:FORMAT], NAME=function:MODULE:FUNC or NAME=ensemble:A,B[:AGG[:K]]"
        raise ValueError(f"scorer {spec!r} must be {forms}")
    if kind == "function":
        if ":" not in target:
            raise ValueError(f"scorer {spec!r}: a function is named MODULE:FUNC")
        return ScorerSpec(name, kind, target)
    if kind == "ensemble":
        listed, _, tail = target.partition(":")
        aggregate, _, weight = tail.partition(":")
        members = tuple(m.strip() for m in listed.split(","))
        if len(members) < 2 or not all(members) or len(set(members)) != len(members):
            raise ValueError(f"scorer {spec!r}: an ensemble needs two or more distinct members")
        if name in members:
            raise ValueError(f"scorer {spec!r}: an ensemble cannot be its own member")
        aggregate = aggregate or "mean"
        if aggregate not in AGGREGATES:
            raise ValueError(f"scorer {spec!r}: AGGREGATE {aggregate!r} is not one of "
                             f"{', '.join(AGGREGATES)}")  # fmt: skip
        k = 1.0
        if weight:
            if aggregate != "mean_minus_std":
                raise ValueError(f"scorer {spec!r}: K goes with mean_minus_std only")
            try:
                k = float(weight)
            except ValueError:
                raise ValueError(f"scorer {spec!r}: K {weight!r} is not a number") from None
            if not 0 <= k <= 100:
                raise ValueError(f"scorer {spec!r}: K must be in [0, 100], not {k:g}")
        return ScorerSpec(name, kind, listed, members=members, aggregate=aggregate, k=k)
    path, colon, format = target.partition(":")
    if colon and format not in FORMATS:
        raise ValueError(f"scorer {spec!r}: FORMAT {format!r} is not one of {', '.join(FORMATS)}"
                         " (a model PATH cannot hold ':')")  # fmt: skip
    if not path:
        raise ValueError(f"scorer {spec!r}: PATH is empty")
    return ScorerSpec(name, kind, path, format=format or None)


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
    ``NAME=function:MODULE:FUNC`` (a callable ``f(prompt, response, label) -> float``) or
    ``NAME=ensemble:A,B[,...][:AGGREGATE[:K]]`` (other scorers' scores combined by ``mean``,
    ``min`` or ``mean_minus_std``, mean − K · std, K default 1); repeat the flag for several."""
    default_scorer: str = "default"
    """Scorer used when a request names none."""

    @field_validator("scorers")
    @classmethod
    def _scorer_specs(cls, specs: list[str]) -> list[str]:
        for spec in specs:
            parse_scorer(spec)
        return specs
