"""A loss's contract besides its formula: the :class:`LossSpec` each loss file declares.

A spec names the loss (in the API and as its ``alignd.v1.Loss`` oneof field), its
hyperparameters with their defaults and allowed ranges, the model kinds that can compute it,
the statistics it needs from the forward pass, the named inputs it reads and how its rows are
split across data-parallel ranks. Request conversion, the engine and the sharding read the
specs; none of them names a loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from alignd_server.trainer.losses.base import LossOutput


@dataclass(frozen=True)
class Range:
    """An interval of allowed values, closed unless an end is marked open."""

    low: float
    high: float
    open_low: bool = False
    open_high: bool = False


# Wide enough for any real run, narrow enough that a value cannot make the first step NaN.
COEFFICIENT = Range(0.0, 1e3)
"""A term's weight; 0 turns the term off."""
POSITIVE = Range(0.0, 1e3, open_low=True)
CLIP = Range(0.0, 10.0, open_low=True)
FRACTION = Range(0.0, 1.0, open_high=True)
BELOW_HALF = Range(0.0, 0.5, open_high=True)
IS_CAP = Range(1.0, 1e3)
"""The truncation C of an importance weight min(π_old / π_behaviour, C)."""


@dataclass(frozen=True)
class Param:
    """One hyperparameter: the proto field of the loss's message and the keyword argument of
    its function are both ``name``.

    A number has a ``range``; an enum lists its ``choices`` in the order of the proto enum's
    numbers (the first is the proto default). ``default`` is what an unset field means
    (``None``: the feature is off).
    """

    name: str
    default: float | str | None
    range: Range | None = None
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Statistic:
    """A statistic of the forward pass a loss reads: ``entropy``, ``mean_logprobs`` or
    ``values``; always, or only when the parameter ``when`` is above 0."""

    name: Literal["entropy", "mean_logprobs", "values"]
    when: str | None = None


@dataclass(frozen=True)
class Model:
    """The model kinds (``InitSpec.kind``) that can compute a loss, and how errors name them."""

    kinds: frozenset[str]
    described: str


CAUSAL_LM = Model(frozenset({"causal_lm", "causal_lm_value"}), "a causal LM")
VALUE_MODEL = Model(frozenset({"causal_lm_value"}), "a causal_lm_value model (policy + value head)")
CLASSIFIER = Model(frozenset({"sequence_classifier"}), "a sequence_classifier")


@dataclass(frozen=True)
class LossSpec:
    """Everything the trainer needs to know about one loss to accept and run it."""

    name: str
    """The loss's name in the API, metrics and errors."""
    field: str
    """Its field in the ``alignd.v1.Loss`` oneof ``kind``."""
    fn: Callable[..., LossOutput]
    """The loss: ``fn(inputs, **params)``."""
    params: tuple[Param, ...]
    model: Model
    statistics: tuple[Statistic, ...] = ()
    token_inputs: tuple[str, ...] = ()
    """Names in ``Batch.token_inputs`` it reads (required or optional), each (B, T)."""
    sequence_inputs: tuple[str, ...] = ()
    """Names in ``Batch.sequence_inputs`` it reads, (B,) unless per pair, (P,)."""
    temperature: bool = False
    """Its message has a ``temperature``: log π is log softmax(logits / temperature)."""
    shard: Literal["rows", "pairs"] = "rows"
    """``pairs``: rows [0, P) are chosen, [P, 2P) their rejected rows, kept together."""
    replicated: str | None = None
    """A (B,) sequence input whose rows marked 1 every rank computes (KTO's ``kl_rows``)."""

    def defaults(self) -> dict[str, float | str | None]:
        """The parameters an empty message means."""
        return {p.name: p.default for p in self.params}

    def needs(self, params: dict) -> set[str]:
        """The forward statistics this loss reads with ``params``."""
        return {s.name for s in self.statistics if s.when is None or params[s.when] > 0}
