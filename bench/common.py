"""Shared helpers of the side-by-side benchmarks: timing, synthetic data, result lines."""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

WORDS = [
    "the",
    "a",
    "model",
    "reward",
    "policy",
    "answer",
    "question",
    "helpful",
    "clear",
    "short",
    "long",
    "story",
    "weather",
    "river",
    "mountain",
    "city",
    "music",
    "data",
    "light",
    "kind",
    "quick",
    "slow",
    "bright",
    "quiet",
    "garden",
    "ocean",
    "book",
    "learn",
    "build",
    "test",
    "measure",
    "careful",
    "honest",
    "simple",
    "friendly",
    "useful",
    "thanks",
    "please",
    "because",
]


def sentences(count: int, min_words: int, max_words: int, seed: int = 0) -> list[str]:
    """Reproducible pseudo-sentences of varied length."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))).capitalize()
        + "."
        for _ in range(count)
    ]


def interleaved(repeats: int, runs: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Best time of each run over ``repeats`` rounds, the runs taking turns within a round.

    Taking turns spreads the machine's slow spells (shared CPUs drift by ~10%) over every
    contender instead of one, and the best time of each is its least disturbed run. Each run
    is called once first as a warm-up.
    """
    for fn in runs.values():
        fn()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``: where the served models (and any in-process peer) run."""
    parser.add_argument(
        "--device", default="cpu", help="torch device of the services and peers, e.g. cuda"
    )


def synchronize(device: str) -> None:
    """Waits for the kernels queued on ``device``: CUDA runs them asynchronously, so a timed
    in-process run ends only when its work has."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def threads() -> int:
    """torch threads for the in-process peer: the same as a served model gets."""
    return int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))


def report(
    name: str, rows: list[tuple[str, float, str]], ratios: dict[str, float], out: Path | None
):
    """Prints a table of measurements and the ratios, and appends them as JSON to ``out``."""
    print(f"\n== {name}")
    for label, value, unit in rows:
        print(f"  {label:<58} {value:>12.2f} {unit}")
    for label, value in ratios.items():
        print(f"  ratio {label:<52} {value:>12.3f}")
    if out is not None:
        record = {"bench": name, "rows": rows, "ratios": ratios, "time": time.time()}
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
