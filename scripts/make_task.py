"""Regenerates the bundled sentiment task's data files (pure Python, fixed seed).

python scripts/make_task.py            # rewrite client/alignd/tasks/sentiment/*.jsonl
python scripts/make_task.py --check    # fail if the shipped files differ from the output
python scripts/make_task.py --out DIR  # write elsewhere
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client"))

from alignd.tasks.sentiment import TASK_DIR
from alignd.tasks.sentiment.build import SEED, build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TASK_DIR, help="output directory")
    parser.add_argument("--seed", type=int, default=SEED, help="generation seed")
    parser.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    args = parser.parse_args(argv)
    if not args.check:
        for name, path in build(args.out, args.seed).items():
            lines = path.read_text().splitlines()
            print(
                f"{name:18} {len(lines):5} records  {path.stat().st_size / 1024:6.1f} KiB  {path}"
            )
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [
            path.name
            for path in build(tmp, args.seed).values()
            if not (args.out / path.name).is_file()
            or (args.out / path.name).read_bytes() != path.read_bytes()
        ]
    if stale:
        print(f"out of date in {args.out}: {', '.join(stale)} (run scripts/make_task.py)")
        return 1
    print(f"{args.out}: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
