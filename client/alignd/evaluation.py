"""Evaluating a policy on held-out prompts: sampled completions, their oracle and reward-model
scores, KL to the reference and length, each with its standard error."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from alignd.clients.generation import SamplingParams


@dataclass(frozen=True)
class Estimate:
    """A sample mean and its standard error (std / √n)."""

    mean: float
    se: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Estimate:
        array = np.asarray(values, dtype=np.float64)
        se = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else 0.0
        return cls(float(array.mean()), se, len(array))

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.se:.3f}"


def gain(after: Estimate, before: Estimate) -> tuple[float, float]:
    """(after − before, that difference in standard errors of the difference)."""
    diff = after.mean - before.mean
    se = math.sqrt(after.se**2 + before.se**2)
    return diff, (diff / se if se > 0 else math.inf if diff > 0 else 0.0)


@dataclass(frozen=True)
class PolicyReport:
    """What a policy does on the held-out prompts."""

    name: str
    oracle: Estimate
    reward: Estimate
    kl: Estimate
    length: Estimate
    examples: list[tuple[str, str, float]]
    """A few (prompt, completion, oracle score) samples."""

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_policy(
    name: str,
    platform,
    prompts: Sequence,
    oracle: Callable[[str], float],
    *,
    samples: int = 2,
    max_new_tokens: int = 32,
    seed: int = 1234,
    scorer: str | None = None,
) -> PolicyReport:
    """Samples ``samples`` completions per prompt at temperature 1 from the generation service
    (which must serve the policy) and measures them.

    KL(π ‖ π_ref) is estimated per completion as Σ_t (log π − log π_ref) over its tokens (k1,
    unbiased for samples drawn from π at temperature 1): π's log-probabilities come with the
    samples, π_ref's from the reference service.
    """
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=samples, seed=seed)
    results = platform.generation.generate(list(prompts), params)
    flat = [(p, c) for p, group in zip(prompts, results, strict=True) for c in group]
    texts = [c.text for _, c in flat]
    rows = [np.concatenate([c.prompt_token_ids, c.token_ids]) for _, c in flat]
    ref = platform.reference.logprobs(rows, [len(c.prompt_token_ids) for _, c in flat])
    kl = [float(c.logprobs.sum() - r.sum()) for (_, c), r in zip(flat, ref, strict=True)]
    rewards = platform.reward.score([p for p, _ in flat], texts, scorer=scorer)
    oracle_scores = [oracle(t) for t in texts]
    examples = [
        (_prompt_text(flat[i][0]), texts[i], oracle_scores[i]) for i in range(min(6, len(flat)))
    ]
    return PolicyReport(
        name, Estimate.of(oracle_scores), Estimate.of(rewards), Estimate.of(kl),
        Estimate.of([len(c.token_ids) for _, c in flat]), examples,
    )  # fmt: skip


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]
