"""The demo's report: ``report.md`` (tables, checks, plots, samples) and a console summary."""

from __future__ import annotations

import shutil
from pathlib import Path

COLUMNS = (("oracle", "oracle score"), ("reward", "RM score"), ("kl", "KL to SFT"),
           ("length", "length (tokens)"))  # fmt: skip


def _cell(estimate: dict) -> str:
    return f"{estimate['mean']:.3f} ± {estimate['se']:.3f}"


def policy_table(summary: dict) -> list[list[str]]:
    """Header and one row per policy: mean ± standard error of each measure."""
    rows = [["policy", *(title for _, title in COLUMNS)]]
    for name, report in summary["policies"].items():
        rows.append([name.upper(), *(_cell(report[key]) for key, _ in COLUMNS)])
    return rows


def check_lines(summary: dict) -> list[str]:
    lines = []
    for check in summary["checks"]:
        mark = "PASS" if check["passed"] else "FAIL"
        extra = f" ({check['standard_errors']:.1f} SE)" if "standard_errors" in check else ""
        lines.append(f"{mark}  {check['name']}: {check['value']:.3f}{extra}, "
                     f"required {check['required']}")  # fmt: skip
    return lines


def write_report(out: Path, summary: dict) -> Path:
    """Writes ``report.md`` with the tables, the checks, the plots and sample completions."""
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    lines = ["# alignd demo report", "", f"Total time: {summary['seconds']:.0f} s.", "",
             "## Held-out evaluation", ""]  # fmt: skip
    table = policy_table(summary)
    lines += ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    lines += ["", "## Checks", ""] + [f"- {line}" for line in check_lines(summary)]
    lines += ["", "## Training curves", ""]
    for job in summary["jobs"]:
        for png in sorted((out / "runs" / job / "plots").glob("*.png")):
            target = plots / f"{job}-{png.name}"
            shutil.copyfile(png, target)
            lines.append(f"![{job} {png.stem}](plots/{target.name})")
    lines += ["", "## Samples", ""]
    for name, report in summary["policies"].items():
        lines.append(f"### {name.upper()}")
        for prompt, text, score in report["examples"]:
            lines.append(f"- *{prompt}* → {text!r} (oracle {score:.2f})")
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def print_summary(summary: dict) -> None:
    """The evaluation table and the checks, on stdout."""
    table = policy_table(summary)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    print()
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print()
    for line in check_lines(summary):
        print(line)
    print(f"\n{summary['seconds']:.0f} s in all")
