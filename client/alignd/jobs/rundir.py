"""A job's run directory: everything a run leaves behind, and what ``--resume`` reads back.

Layout::

    config.yaml          the resolved configuration (every default spelled out)
    metrics.jsonl        one JSON object per step: {"step": N, "time": ..., metric: value, ...}
    events/              TensorBoard event files (the same metrics)
    plots/*.png          one curve per metric family (loss, reward, kl, accuracy, ...)
    checkpoints/step-N   trainer checkpoints (HF directories any service loads)
    cache/               computed once per run (e.g. DPO reference log-probs)
    state.json           the last completed checkpoint's step and what resuming needs
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from alignd.jobs.config import JobConfig

STATE, METRICS, CONFIG = "state.json", "metrics.jsonl", "config.yaml"


class RunDirectoryError(RuntimeError):
    """The run directory cannot be used as asked (an existing run without ``--resume``)."""


class RunDirectory:
    """Creates (or reopens, to resume) a run directory.

    Args:
        path: the directory.
        config: the job's resolved config (written to ``config.yaml``).
        resume: continue the run recorded in ``state.json``; without it an existing run is an
            error rather than something to overwrite.
    """

    def __init__(self, path: Path | str, config: JobConfig, resume: bool = False) -> None:
        self.path = Path(path)
        state = self.path / STATE
        if state.exists() and not resume:
            raise RunDirectoryError(
                f"{self.path} already holds a run; pass --resume to continue it or choose "
                "another run_dir"
            )
        for sub in ("checkpoints", "plots", "cache", "events"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        self.state: dict[str, Any] = json.loads(state.read_text()) if state.exists() else {}
        _atomic_write(self.path / CONFIG, yaml.safe_dump(config.model_dump(mode="json")))
        self.history: list[dict[str, Any]] = self._read_history(self.step)
        self._writer = None

    @property
    def step(self) -> int:
        """The step of the last completed checkpoint (0 for a new run)."""
        return int(self.state.get("step", 0))

    def checkpoint(self, name: str | int) -> Path:
        """Where the checkpoint ``name`` (a step or ``final``) goes."""
        return self.path / "checkpoints" / (f"step-{name}" if isinstance(name, int) else name)

    def _read_history(self, upto: int) -> list[dict[str, Any]]:
        """Metrics of steps up to ``upto`` (later lines came from an interrupted run: dropped)."""
        path = self.path / METRICS
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if r.get("step", 0) <= upto]
        _atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def log(self, step: int, metrics: Mapping[str, float]) -> dict[str, Any]:
        """Appends one step's metrics to metrics.jsonl and TensorBoard; returns the row."""
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: float(v) for k, v in metrics.items() if _finite(v)})
        with open(self.path / METRICS, "a") as out:
            out.write(json.dumps(row) + "\n")
        self.history.append(row)
        writer = self._tensorboard()
        for key, value in row.items():
            if key not in ("step", "time"):
                writer.add_scalar(key, value, step)
        writer.flush()
        return row

    def _tensorboard(self):
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(self.path / "events"), flush_secs=10)
        return self._writer

    def save_state(self, **state: Any) -> None:
        """Records a completed checkpoint (atomically: a crash keeps the previous state)."""
        self.state = {**self.state, **state}
        _atomic_write(self.path / STATE, json.dumps(self.state, indent=2))

    def write_json(self, name: str, data: Any) -> Path:
        """Writes ``data`` as JSON under the run directory (atomically)."""
        path = self.path / name
        _atomic_write(path, json.dumps(data, indent=2))
        return path

    def plot(self) -> list[Path]:
        """One PNG per metric family from the metrics so far; returns the files."""
        from alignd.jobs.plots import plot_history

        return plot_history(self.history, self.path / "plots")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)
