"""Generates the sentiment task's files from the word banks, reproducibly (pure Python).

Every file has its own ``random.Random`` stream seeded from the seed and the file's name, so
the output is byte-identical on every Python ≥ 3.10 and platform. ``scripts/make_task.py``
is the command line; the shipped files are its output with :data:`SEED`.

* prompts: every (topic, prompt template); 32 topics are held out entirely.
* ``sft.jsonl``: neutral-to-mixed demonstrations (55 % without sentiment words, 25 % with
  one positive and one negative word, 10 % mildly positive, 10 % mildly negative), so the
  policy after SFT has room to become more positive.
* preferences: pairs on one template with different slot fillers, the chosen one scored
  higher by the oracle by at least :data:`MIN_MARGIN`: ``clear`` (positive vs negative, 40 %),
  ``moderate`` (one sentiment word against none, 40 %) and ``hard`` (20 %: stronger vs milder
  word, negated vs plain word, two positive words vs one). Train pairs use training prompts,
  eval pairs held-out prompts.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignd.tasks.sentiment import banks
from alignd.tasks.sentiment.oracle import oracle

SEED = 7
HELD_OUT_TOPICS = 32
SFT_EXAMPLES = 512
TRAIN_PAIRS = 640
EVAL_PAIRS = 160
MIN_MARGIN = 0.1
FILES = {
    "train_prompts": "prompts_train.jsonl",
    "held_out_prompts": "prompts_held_out.jsonl",
    "sft": "sft.jsonl",
    "preferences_train": "preferences_train.jsonl",
    "preferences_eval": "preferences_eval.jsonl",
}

Topic = tuple[str, bool]  # (phrase, plural)
Polarities = dict[str, str]  # slot -> "++", "+", "0", "-", "--", or "!+" / "!-" (negated)
_SLOT = re.compile(r"\{([PQBVD]\d)\}")
_BANKS = {
    "P": banks.ADJECTIVES,
    "Q": banks.ADJECTIVES,
    "B": banks.ADJECTIVES,
    "V": banks.VERBS,
    "D": banks.ADVERBS,
}


def split_topics(seed: int) -> tuple[list[Topic], list[Topic]]:
    """(training topics, held-out topics), each in the banks' order."""
    everything = banks.topics()
    held = set(random.Random(f"{seed}/topics").sample(range(len(everything)), HELD_OUT_TOPICS))
    train = [t for i, t in enumerate(everything) if i not in held]
    return train, [t for i, t in enumerate(everything) if i in held]


def prompt_records(topics: list[Topic]) -> list[dict[str, Any]]:
    """One chat prompt per (topic, prompt template)."""
    return [
        {"prompt": [{"role": "user", "content": template.format(t=phrase)}], "topic": phrase}
        for phrase, _ in topics
        for template in banks.PROMPT_TEMPLATES
    ]


def _word(slot: str, polarity: str, used: set[str], rng: random.Random) -> str:
    base = polarity.lstrip("!")
    word = rng.choice([w for w in _BANKS[slot[0]][base].split() if w not in used])
    used.add(word)
    if slot[0] in "PQ" and base in ("+", "-") and rng.random() < 0.15:
        word = f"{rng.choice(banks.INTENSIFIERS)} {word}"
    if polarity.startswith("!"):
        word = f"not {word}"
    if slot[0] == "B":
        word = f"{banks.article(word)} {word}"
    return word


def _render(template: str, topic: Topic, words: dict[str, str]) -> str:
    phrase, plural = topic
    agreement = {
        "T": phrase[0].upper() + phrase[1:],
        "t": phrase,
        "be": "are" if plural else "is",
        "has": "have" if plural else "has",
        "it": "they" if plural else "it",
        "them": "them" if plural else "it",
        "s": "" if plural else "s",
    }
    return template.format(**agreement, **words)


def fill_pair(
    template: str, topic: Topic, first: Polarities, second: Polarities, rng: random.Random
) -> tuple[str, str]:
    """Two responses from one template; slots with equal polarity get the same word."""
    used: set[str] = set()
    words_a: dict[str, str] = {}
    words_b: dict[str, str] = {}
    for slot in _SLOT.findall(template):
        polarity_a, polarity_b = first.get(slot, "0"), second.get(slot, "0")
        words_a[slot] = _word(slot, polarity_a, used, rng)
        same = polarity_a == polarity_b
        words_b[slot] = words_a[slot] if same else _word(slot, polarity_b, used, rng)
    return _render(template, topic, words_a), _render(template, topic, words_b)


def _sft_polarities(slots: list[str], rng: random.Random) -> Polarities:
    draw = rng.random()
    first, second = rng.sample(slots, 2)
    if draw < 0.55:
        return {}
    if draw < 0.80:
        return {first: "+", second: "-"}
    return {first: "+" if draw < 0.90 else "-"}


def _pair_polarities(
    difficulty: str, slots: list[str], rng: random.Random
) -> tuple[Polarities, Polarities]:
    first, second = rng.sample(slots, 2)
    strength = "++" if rng.random() < 0.4 else "+"
    if difficulty == "clear":
        chosen = {s: rng.choice(("+", "++")) for s in slots}
        rejected = {s: rng.choice(("-", "--")) for s in slots}
        return chosen, rejected
    if difficulty == "moderate":
        variant = rng.randrange(3)
        if variant == 0:
            return {first: strength}, {}
        if variant == 1:
            return {}, {first: strength.replace("+", "-")}
        return {first: "+"}, {first: "+", second: "-"}
    negatable = [s for s in slots if s[0] == "P"]
    variant = rng.randrange(4 if negatable else 2)
    if variant == 0:
        return {first: "++"}, {first: "+"}
    if variant == 1:
        return {first: "+", second: "+"}, {first: "+"}
    slot = rng.choice(negatable)
    if variant == 2:
        return {slot: "!-"}, {slot: "-"}
    return {slot: "+"}, {slot: "!+"}


def sft_records(prompts: list[dict[str, Any]], count: int, rng: random.Random) -> list[dict]:
    """``count`` neutral-to-mixed demonstrations for random prompts."""
    topics = dict(banks.topics())
    records = []
    for _ in range(count):
        prompt = rng.choice(prompts)
        template = rng.choice(banks.RESPONSE_TEMPLATES)
        topic = (prompt["topic"], topics[prompt["topic"]])
        polarities = _sft_polarities(_SLOT.findall(template), rng)
        response, _ = fill_pair(template, topic, polarities, polarities, rng)
        records.append(
            {"prompt": prompt["prompt"], "response": response, "oracle": round(oracle(response), 4)}
        )
    return records


def preference_records(prompts: list[dict[str, Any]], count: int, rng: random.Random) -> list[dict]:
    """``count`` pairs whose chosen response the oracle scores higher by MIN_MARGIN or more."""
    topics = dict(banks.topics())
    records = []
    while len(records) < count:
        prompt = rng.choice(prompts)
        template = rng.choice(banks.RESPONSE_TEMPLATES)
        difficulty = rng.choices(("clear", "moderate", "hard"), weights=(4, 4, 2))[0]
        chosen_p, rejected_p = _pair_polarities(difficulty, _SLOT.findall(template), rng)
        topic = (prompt["topic"], topics[prompt["topic"]])
        chosen, rejected = fill_pair(template, topic, chosen_p, rejected_p, rng)
        chosen_score, rejected_score = oracle(chosen), oracle(rejected)
        if chosen_score - rejected_score < MIN_MARGIN:
            continue  # e.g. an intensifier on the rejected side: draw again
        records.append(
            {
                "prompt": prompt["prompt"],
                "chosen": chosen,
                "rejected": rejected,
                "chosen_oracle": round(chosen_score, 4),
                "rejected_oracle": round(rejected_score, 4),
                "difficulty": difficulty,
            }
        )
    return records


def _write(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(record) + "\n" for record in records)
    path.write_text(text, encoding="utf-8", newline="\n")


def build(out_dir: str | Path, seed: int = SEED) -> dict[str, Path]:
    """Writes every file of the task into ``out_dir``; returns their paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_topics, held_topics = split_topics(seed)
    train_prompts, held_prompts = prompt_records(train_topics), prompt_records(held_topics)

    def rng(name: str) -> random.Random:
        return random.Random(f"{seed}/{name}")

    makers: dict[str, Callable[[], list[dict]]] = {
        "train_prompts": lambda: train_prompts,
        "held_out_prompts": lambda: held_prompts,
        "sft": lambda: sft_records(train_prompts, SFT_EXAMPLES, rng("sft")),
        "preferences_train": lambda: preference_records(train_prompts, TRAIN_PAIRS, rng("train")),
        "preferences_eval": lambda: preference_records(held_prompts, EVAL_PAIRS, rng("eval")),
    }
    paths = {}
    for name, make in makers.items():
        paths[name] = out / FILES[name]
        _write(paths[name], make())
    return paths
