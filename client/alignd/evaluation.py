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
    oracle: Estimate | None
    """Scores by a programmatic oracle, when one was given."""
    reward: Estimate
    kl: Estimate
    length: Estimate
    examples: list[tuple[str, str, float]]
    """A few (prompt, completion, oracle score, or reward without an oracle) samples."""
    gold: Estimate | None = None
    """The same completions' scores by the gold scorer, when one was given."""

    def to_dict(self) -> dict:
        return asdict(self)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Each estimate's mean and standard error, e.g. ``eval/reward``, ``eval/reward_se``."""
        out: dict[str, float] = {}
        for name in ("oracle", "reward", "gold", "kl", "length"):
            estimate = getattr(self, name)
            if estimate is not None:
                out[f"{prefix}{name}"], out[f"{prefix}{name}_se"] = estimate.mean, estimate.se
        return out


def evaluate_policy(
    name: str,
    generation,
    reward,
    reference,
    prompts: Sequence,
    oracle: Callable[[str], float] | None = None,
    *,
    samples: int = 2,
    max_new_tokens: int = 32,
    seed: int = 1234,
    scorer: str | None = None,
    isolated: bool = False,
    gold_scorer: str | None = None,
) -> PolicyReport:
    """Samples ``samples`` completions per prompt at temperature 1 from ``generation`` (which
    must serve the policy) and measures them: the ``reward`` service's score (``scorer``),
    KL to the ``reference`` service's model, length, and ``oracle`` (when given).

    KL(π ‖ π_ref) is estimated per completion as Σ_t (log π − log π_ref) over its tokens (k1,
    unbiased for samples drawn from π at temperature 1): π's log-probabilities come with the
    samples, π_ref's from the reference service. ``isolated`` has the generation, reward and
    reference services batch these requests alone (bit-identical numbers whatever else they
    serve). ``gold_scorer`` also scores the same completions with that scorer (``gold``).
    """
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=samples, seed=seed)
    results = generation.generate(list(prompts), params, isolated=isolated)
    flat = [(p, c) for p, group in zip(prompts, results, strict=True) for c in group]
    texts = [c.text for _, c in flat]
    rows = [np.concatenate([c.prompt_token_ids, c.token_ids]) for _, c in flat]
    ref = reference.logprobs(rows, [len(c.prompt_token_ids) for _, c in flat], isolated=isolated)
    kl = [float(c.logprobs.sum() - r.sum()) for (_, c), r in zip(flat, ref, strict=True)]
    rewards = reward.score([p for p, _ in flat], texts, scorer=scorer, isolated=isolated)
    gold = None
    if gold_scorer:
        gold = Estimate.of(reward.score([p for p, _ in flat], texts, scorer=gold_scorer,
                                        isolated=isolated))  # fmt: skip
    oracle_scores = [oracle(t) for t in texts] if oracle is not None else None
    shown = oracle_scores if oracle_scores is not None else [float(r) for r in rewards]
    examples = [(_prompt_text(flat[i][0]), texts[i], shown[i]) for i in range(min(6, len(flat)))]
    return PolicyReport(
        name, Estimate.of(oracle_scores) if oracle_scores is not None else None,
        Estimate.of(rewards), Estimate.of(kl), Estimate.of([len(c.token_ids) for _, c in flat]),
        examples, gold,
    )  # fmt: skip


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]
