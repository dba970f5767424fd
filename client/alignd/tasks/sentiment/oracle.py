"""The sentiment oracle: a programmatic ground truth of how positive a text is, in (−1, 1).

A lexicon scorer in the spirit of VADER (Hutto & Gilbert 2014), small enough to read:

1. lower-case the text and split it into words and punctuation;
2. each word of the lexicon contributes its valence v (±1, or ±2 for strong words);
3. an intensifier right before it ("very") multiplies v by 1.5, a dampener ("slightly") by
   0.5;
4. a negator ("not", "never", any "…n't") within the three words before it multiplies v by
   −0.75 ("not bad" is mildly positive, "not good" mildly negative); punctuation and "but"
   end a negation's scope;
5. the k-th repetition of the same word (k = 0, 1, …) counts 0.5^k, so repeating one word
   cannot buy an unbounded score;
6. the sum s is squashed: ``score = s / sqrt(s² + 4)`` (one plain positive word ≈ 0.45,
   three ≈ 0.83, none = 0).
"""

from __future__ import annotations

import math
import re
from collections import Counter

from alignd.tasks.sentiment.lexicon import (
    CLAUSE_BREAKS,
    DAMPENERS,
    INTENSIFIERS,
    NEGATORS,
    valence,
)

_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|[.,;:!?]")
NEGATION_SCOPE = 3
NEGATION_FACTOR = -0.75
INTENSIFIER_FACTOR = 1.5
DAMPENER_FACTOR = 0.5
REPEAT_DECAY = 0.5
ALPHA = 4.0


def tokenize(text: str) -> list[str]:
    """Lower-case words (with an inner apostrophe, as in "isn't") and punctuation marks."""
    return _TOKEN.findall(text.lower().replace("\u2019", "'"))


def _is_negator(token: str) -> bool:
    return token in NEGATORS or token.endswith("n't")


def raw_score(text: str) -> float:
    """The unsquashed sum s of the contributions of every sentiment word (steps 1–5)."""
    total = 0.0
    seen: Counter[str] = Counter()
    scope = 0  # words left under the last negator
    previous = ""
    for token in tokenize(text):
        if token in CLAUSE_BREAKS:
            scope, previous = 0, token
            continue
        negated = scope > 0
        scope = max(scope - 1, 0)
        if _is_negator(token):
            scope, previous = NEGATION_SCOPE, token
            continue
        value = valence(token)
        if value:
            if previous in INTENSIFIERS:
                value *= INTENSIFIER_FACTOR
            elif previous in DAMPENERS:
                value *= DAMPENER_FACTOR
            if negated:
                value *= NEGATION_FACTOR
            total += value * REPEAT_DECAY ** seen[token]
            seen[token] += 1
        previous = token
    return total


def oracle(text: str) -> float:
    """How positive ``text`` is, in (−1, 1): 0 for no sentiment words, > 0 positive.

    Examples:
        >>> round(oracle("The ocean is wonderful."), 3)
        0.707
        >>> oracle("The ocean is wet.")
        0.0
        >>> oracle("not bad") > 0 > oracle("not good")
        True
    """
    s = raw_score(text)
    return s / math.sqrt(s * s + ALPHA)


def oracle_scorer(prompt: object, response: str, label: str | None) -> float:
    """The oracle as a reward-service function scorer: ``f(prompt, response, label)``.

    Serve it with ``alignd serve reward --scorers
    sentiment=function:alignd.tasks.sentiment:oracle_scorer``. The prompt and label are
    ignored: only the response's sentiment counts.

    Raises:
        TypeError: ``response`` is not text (the service reports INVALID_ARGUMENT).
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be text, got {type(response).__name__}")
    return oracle(response)
