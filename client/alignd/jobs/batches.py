"""Data for jobs: loading a config's dataset, tokenizing it through a service, and the
deterministic order in which steps take examples."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from alignd.clients.tokenize import TokenizedSequence
from alignd.clients.trainer import TrainBatch
from alignd.data import load_examples, split_held_out
from alignd.jobs.config import DataConfig

TOKENIZE_CHUNK = 64


def load_split(data: DataConfig, kind: str, seed: int) -> tuple[list, list]:
    """(train, held-out) examples of ``kind`` from the config's dataset."""
    train = load_examples(data.path, kind, data.fields, data.split, data.limit)
    if data.eval_path is not None:
        return train, load_examples(data.eval_path, kind, data.fields, data.split)
    return split_held_out(train, data.held_out, seed=seed, by_prompt=kind == "prompt")


def tokenize(
    call: Callable, client, prompts: Sequence, completions: Sequence[str] | None, max_length: int
) -> list[TokenizedSequence]:
    """Tokenizes (prompt, completion) pairs in chunks through ``client.tokenize``; sequences
    longer than ``max_length`` lose the start of their prompt."""
    out: list[TokenizedSequence] = []
    for start in range(0, len(prompts), TOKENIZE_CHUNK):
        part = slice(start, start + TOKENIZE_CHUNK)
        out += call(
            client.tokenize, list(prompts[part]),
            None if completions is None else list(completions[part]),
            max_length=max_length, truncation="left",
        )  # fmt: skip
    return out


def steps_for(examples: int, batch_size: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps for ``epochs`` passes of ``examples`` in batches of ``batch_size``."""
    steps = max(1, math.ceil(epochs * examples / batch_size))
    return min(steps, max_steps) if max_steps else steps


def batch_indices(step: int, examples: int, batch_size: int, seed: int) -> np.ndarray:
    """The examples of optimizer step ``step`` (1-based): consecutive slices of one shuffled
    order per epoch (the same for the same seed, so resumed runs see the same batches)."""
    start = (step - 1) * batch_size
    orders: dict[int, np.ndarray] = {}
    picked = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, examples)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(examples)
        picked.append(orders[epoch][offset])
    return np.array(picked)


def chunks(indices: np.ndarray, size: int) -> list[np.ndarray]:
    """``indices`` in consecutive pieces of at most ``size``."""
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def sequence_batch(seqs: Sequence[TokenizedSequence]) -> TrainBatch:
    """Rows of (prompt + completion) ids with their prompt lengths."""
    return TrainBatch([s.input_ids for s in seqs], [s.prompt_length for s in seqs])


def pair_batch(
    chosen: Sequence[TokenizedSequence],
    rejected: Sequence[TokenizedSequence],
    ref_logps: np.ndarray | None = None,
) -> TrainBatch:
    """Chosen rows then their rejected rows (the pairwise losses' layout)."""
    seqs = [*chosen, *rejected]
    inputs = {} if ref_logps is None else {"ref_logps": np.asarray(ref_logps, np.float32)}
    return TrainBatch(
        [s.input_ids for s in seqs], [s.prompt_length for s in seqs], sequence_inputs=inputs
    )
