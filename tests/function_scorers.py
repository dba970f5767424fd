"""Reward-service function scorers for job tests (the reward service imports them by name)."""

from __future__ import annotations

import time

from alignd.tasks.sentiment import oracle_scorer

SLOW = "function:function_scorers:slow_oracle"
BY_LENGTH = "function:function_scorers:by_length"


def slow_oracle(prompt: object, response: str, label: str | None) -> float:
    """The oracle, 20 ms per item: a reward service that takes its time."""
    time.sleep(0.02)
    return oracle_scorer(prompt, response, label)


def by_length(prompt: object, response: str, label: str | None) -> float:
    """The response's length in characters over 10: a reward that differs between the samples
    of a tiny random model (the oracle scores their gibberish 0 alike)."""
    return len(response) / 10


TWICE_LENGTH = "function:function_scorers:twice_length"


def twice_length(prompt: object, response: str, label: str | None) -> float:
    """Twice :func:`by_length`: beside it in an ensemble, the members' mean is 0.15 × length
    and their std (ddof 0) 0.05 × length, a third of the mean."""
    return len(response) / 5
