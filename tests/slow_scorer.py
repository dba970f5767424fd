"""A reward-service function scorer that takes its time: the oracle, 20 ms per item."""

from __future__ import annotations

import time

from alignd.tasks.sentiment import oracle_scorer

SLOW = "function:slow_scorer:slow_oracle"


def slow_oracle(prompt: object, response: str, label: str | None) -> float:
    time.sleep(0.02)
    return oracle_scorer(prompt, response, label)
