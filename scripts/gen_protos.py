"""Regenerate the alignd.v1 Python stubs from protos/ into client/alignd/v1.

Run as ``python scripts/gen_protos.py`` (``make protos``). ``--check`` regenerates into a
temporary directory and exits 1 if any committed stub differs (the CI drift check).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
OUT = ROOT / "client"
PACKAGE = Path("alignd") / "v1"
INIT = '"""Generated alignd.v1 stubs (scripts/gen_protos.py). Do not edit."""\n'


def generate(out_root: Path) -> list[Path]:
    """Runs protoc on every proto of alignd.v1, writing stubs under ``out_root``."""
    protos = sorted((PROTOS / PACKAGE).glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--pyi_out={out_root}",
        *[str(p.relative_to(PROTOS)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out_root / PACKAGE / "__init__.py").write_text(INIT)
    return sorted((out_root / PACKAGE).iterdir())


def check() -> int:
    """Returns 0 when the committed stubs equal a fresh generation, 1 otherwise."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name for p in generate(Path(tmp)) if p.is_file()}
        committed = {
            p.name for p in (OUT / PACKAGE).iterdir() if p.is_file() and p.suffix in (".py", ".pyi")
        }
        drift = sorted(fresh ^ committed)
        drift += [
            n
            for n in sorted(fresh & committed)
            if not filecmp.cmp(Path(tmp) / PACKAGE / n, OUT / PACKAGE / n, shallow=False)
        ]
    if drift:
        print("stubs out of date, run `make protos`:", ", ".join(drift), file=sys.stderr)
        return 1
    print("stubs up to date")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs drift")
    args = parser.parse_args()
    if args.check:
        return check()
    target = OUT / PACKAGE
    for stale in target.glob("*_pb2*.py*"):
        stale.unlink()
    shutil.rmtree(target / "__pycache__", ignore_errors=True)
    for path in generate(OUT):
        print("wrote", path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
