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
    evaluated = [r for r in history if "eval/gold" in r and "eval/reward" in r and "eval/kl" in r]
    if evaluated:
        written.append(_overoptimization(evaluated, directory, plt))
    return written


def _overoptimization(rows: Sequence[dict[str, Any]], directory: Path, plt) -> Path:
    """The proxy (training scorer) and gold scores of each evaluation against its distance
    from the reference, √KL — the over-optimisation curve of Gao et al. 2022 ("Scaling Laws
    for Reward Model Overoptimization"): the proxy keeps rising while the gold turns down."""
    distance = [max(r["eval/kl"], 0.0) ** 0.5 for r in rows]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for key, label in (("eval/reward", "proxy (eval/reward)"), ("eval/gold", "gold (eval/gold)")):
        axes.plot(distance, [r[key] for r in rows], marker=".", label=label)
    for d, r in zip(distance, rows, strict=True):
        axes.annotate(str(r["step"]), (d, r["eval/gold"]), fontsize=6, alpha=0.6)
    axes.set_xlabel("√KL(π ‖ π_ref) on the held-out prompts")
    axes.set_ylabel("score")
    axes.set_title("proxy vs gold (round numbers on the gold curve)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    path = directory / "overoptimization.png"
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
