"""PNG curves of a run's metrics (matplotlib, no display needed)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FAMILIES = ("loss", "reward", "score", "kl", "accuracy", "margin", "entropy", "length", "lr")
"""Metrics whose name contains one of these share a figure; any other metric gets its own."""


def family(name: str) -> str:
    """The figure a metric belongs to (``time/*`` phases share ``time``)."""
    if "/" in name:
        return name.split("/", 1)[0]
    for word in FAMILIES:
        if word in name:
            return word
    return name


def plot_history(history: Sequence[dict[str, Any]], directory: Path) -> list[Path]:
    """Draws every metric of ``history`` against its step; one PNG per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, tuple[list[float], list[float]]]] = defaultdict(dict)
    for row in history:
        for key, value in row.items():
            if key in ("step", "time"):
                continue
            xs, ys = series[family(key)].setdefault(key, ([], []))
            xs.append(row["step"])
            ys.append(value)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, curves in sorted(series.items()):
        figure, axes = plt.subplots(figsize=(6, 3.5))
        for key, (xs, ys) in sorted(curves.items()):
            axes.plot(xs, ys, marker="." if len(xs) < 30 else None, label=key)
        axes.set_xlabel("step")
        axes.set_title(name)
        axes.grid(alpha=0.3)
        if len(curves) > 1:
            axes.legend(fontsize=7)
        figure.tight_layout()
        path = directory / f"{name.replace('/', '_')}.png"
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    return written
