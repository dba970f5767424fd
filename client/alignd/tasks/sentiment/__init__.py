"""The bundled synthetic RLHF task: make one-sentence answers more positive.

Prompts ask for one sentence about a topic ("Write one sentence about the ocean."); the
ground truth is :func:`oracle`, a lexicon sentiment score in (−1, 1) computed in pure Python,
so whether RLHF worked is measured, not judged. The shipped files (regenerated
byte-identically by ``scripts/make_task.py``):

* ``prompts_train.jsonl`` / ``prompts_held_out.jsonl``: chat prompts; held-out topics never
  appear in training data.
* ``sft.jsonl``: neutral-to-mixed demonstrations (mean oracle ≈ 0): the starting point.
* ``preferences_train.jsonl`` / ``preferences_eval.jsonl``: pairs whose chosen response has
  the higher oracle score, for the reward model and DPO (eval pairs use held-out prompts).

The oracle is also a reward-service scorer::

    alignd serve reward --scorers sentiment=function:alignd.tasks.sentiment:oracle_scorer
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alignd.data import PreferencePair, PromptOnly, SFTExample, load_examples
from alignd.tasks.sentiment.build import FILES
from alignd.tasks.sentiment.oracle import oracle, oracle_scorer

TASK_DIR = Path(__file__).parent
SCORER = "function:alignd.tasks.sentiment:oracle_scorer"
"""The ``--scorers NAME=...`` value that serves the oracle."""


@dataclass(frozen=True)
class SentimentTask:
    """The task's files, and loaders for them.

    Attributes:
        train_prompts: chat prompts for PPO/GRPO rollouts.
        held_out_prompts: prompts on held-out topics, for evaluation.
        sft: demonstrations (prompt, response).
        preferences_train: preference pairs for the reward model and DPO.
        preferences_eval: held-out preference pairs (pairwise accuracy).
    """

    train_prompts: Path
    held_out_prompts: Path
    sft: Path
    preferences_train: Path
    preferences_eval: Path

    def prompts(self, split: str = "train") -> list[PromptOnly]:
        """The ``train`` or ``held_out`` prompts."""
        return load_examples(self._path("prompts", split), "prompt")  # type: ignore[return-value]

    def sft_examples(self) -> list[SFTExample]:
        """The SFT demonstrations."""
        return load_examples(self.sft, "sft")  # type: ignore[return-value]

    def preferences(self, split: str = "train") -> list[PreferencePair]:
        """The ``train`` or ``eval`` preference pairs."""
        return load_examples(self._path("preferences", split), "preference")  # type: ignore[return-value]

    def _path(self, kind: str, split: str) -> Path:
        name = f"{split}_prompts" if kind == "prompts" else f"preferences_{split}"
        if name not in FILES:
            raise ValueError(f"unknown {kind} split {split!r}")
        return getattr(self, name)


def load_task(directory: str | Path | None = None) -> SentimentTask:
    """The task shipped with alignd (or the files ``scripts/make_task.py`` wrote elsewhere).

    Raises:
        FileNotFoundError: a file is missing.
    """
    root = Path(directory) if directory is not None else TASK_DIR
    paths = {name: root / file for name, file in FILES.items()}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(f"sentiment task file missing: {path}")
    return SentimentTask(**paths)


__all__ = ["SCORER", "TASK_DIR", "SentimentTask", "load_task", "oracle", "oracle_scorer"]
