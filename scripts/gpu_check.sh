#!/usr/bin/env bash
# The GPU check: alignd's GPU paths tested and benchmarked on one CUDA machine, in at most
# ~8 minutes, with no network. Run from the checkout on the GPU machine, after
# scripts/gpu_wheels.sh filled scripts/gpu-wheels/ on a machine with PyPI:
#
#   scripts/gpu_check.sh
#
# Uses the machine's own python3 and torch (the project's pins do not apply there): a virtual
# environment with --system-site-packages gets the carried wheels and this checkout (editable,
# built offline), then each step runs under its own timeout and the rest go on if one fails:
#   1. the generation service tests, hf engine, on cuda (float32);
#   2. the trainer tests on cuda in bfloat16, and the one-rank group test (NCCL) on its own;
#   3. the generation tests on the vllm engine, only where `import vllm` works;
#   4. the benchmarks with --device cuda, on random-weight models with the bundled models'
#      shapes and tokenizers (scripts/gpu_models.py): generation (hf, and vllm where
#      importable), reference, reward, weight sync, trainer step (TRL's side only if installed);
#   5. the trainer tests on cuda in float32, if time is left.
# Results: results.md (versions, GPU, each step's verdict, pytest counts, seconds, benchmark
# tables) and logs/ under $OUT when set, else gpu-results/. Exits 1 if any step failed, 2 if it
# could not start (no GPU, no wheels).
#
# Settings (environment): PYTHON (default python3), GPU_WHEELS (default scripts/gpu-wheels),
# GPU_CHECK_BUDGET_S (default 450: steps that would start later are skipped, each step's timeout
# is cut to what is left), GPU_CHECK_DEVICE (default cuda; cpu rehearses every step on a machine
# without a GPU, with wheels from GPU_PYTHON_VERSION=3.x scripts/gpu_wheels.sh; slow).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-scripts/gpu-wheels}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
RESULTS=${OUT:-gpu-results}

die() { echo "gpu_check: $*" >&2; exit 2; }

if [ "$DEVICE" = cuda ]; then
  why=$("$PYTHON" -c '
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device")' 2>&1 | tail -n 1) ||
    die "no CUDA GPU here ($PYTHON: ${why:-no torch}; nvidia-smi $(command -v nvidia-smi >/dev/null && echo found || echo missing)). Run it on a GPU machine; GPU_CHECK_DEVICE=cpu rehearses the steps on CPU."
elif [ "$DEVICE" != cpu ]; then
  die "GPU_CHECK_DEVICE must be cuda or cpu, not $DEVICE"
fi
[ -f "$WHEELS/requirements.txt" ] && [ -d "$WHEELS/models" ] ||
  die "$WHEELS has no requirements.txt or models/: run scripts/gpu_wheels.sh where pip reaches PyPI and bring $WHEELS along"

target=$(sed -n 's/^target CPython \([0-9.]*\) .*/\1/p' "$WHEELS/MANIFEST" 2>/dev/null)
here=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$target" = "$here" ] ||
  die "$WHEELS holds wheels for Python ${target:-unknown}, $PYTHON is $here: run GPU_PYTHON_VERSION=$here scripts/gpu_wheels.sh"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$RESULTS/logs"
REPORT="$RESULTS/results.md"
FAILED=()
ROWS=()
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1  # logs survive a timeout
export ALIGND_HOME="$WORK/home" PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1

log() { echo "gpu_check: $*"; }
section() { printf '\n## %s\n\n' "$1" >>"$REPORT"; }
fenced() { { echo '```'; cat; echo '```'; } >>"$REPORT"; }
tail_of() { if [ -s "$1" ]; then tail -n "$2" "$1"; else echo "(no output)"; fi; }

{
  echo "# alignd GPU check"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), device $DEVICE, budget ${BUDGET}s"
  echo
  echo "Wheels: $(head -n 1 "$WHEELS/MANIFEST")."
} >"$REPORT"

# --- environment -------------------------------------------------------------------------------
VENV="$WORK/venv"
VPY="$VENV/bin/python"
setup() {
  "$PYTHON" -m venv --system-site-packages "$VENV" ||
    "$PYTHON" -m venv --system-site-packages --without-pip --clear "$VENV" || return 1
  "$VPY" -m pip --version || return 1  # without its own pip, the machine's pip installs here
  "$VPY" -m pip install -q --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt" ||
    return 1
  # alignd from this checkout (setuptools and wheel for the build come from the wheel folder);
  # its other dependencies (matplotlib, tensorboardX: plots and event files of jobs) are not
  # needed by the tests and benchmarks run here.
  "$VPY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps -e . || return 1
  "$VPY" -c "import alignd, alignd_server.launch, grpc_health.v1, grpc_reflection, pytest_asyncio"
}
log "environment in $VENV"
if ! setup >"$RESULTS/logs/setup.log" 2>&1; then
  section "Setup failed"
  tail_of "$RESULTS/logs/setup.log" 30 | fenced
  die "setting up the environment failed: see $RESULTS/logs/setup.log"
fi

section "Machine"
{
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  fi
  "$VPY" - <<'EOF'
import importlib.metadata as metadata
import platform

import torch

print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"device 0: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
          f"capability {props.major}.{props.minor}, bf16 {torch.cuda.is_bf16_supported()}, "
          f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
for name in ("transformers", "tokenizers", "peft", "grpcio", "protobuf", "pydantic",
             "pydantic-settings", "numpy", "safetensors", "pytest", "vllm", "trl"):
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        version = "not installed"
    print(f"{name} {version}")
EOF
} 2>&1 | tee "$RESULTS/logs/versions.log" | fenced

# --- steps -------------------------------------------------------------------------------------
# step NAME LIMIT_S COMMAND...: runs COMMAND under a timeout (cut to the budget left), logs it,
# and appends its verdict, seconds, pytest counts and failures (or a benchmark's table).
step() {
  local name=$1 limit=$2 left=$((BUDGET - SECONDS))
  shift 2
  local out="$RESULTS/logs/$name.log" begin=$SECONDS rc verdict counts command
  if [ "$left" -lt 20 ]; then
    ROWS+=("| $name | skipped: out of time | 0 | |")
    FAILED+=("$name")
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "$name (at most ${limit}s)"
  timeout -k 10 "$limit" "$@" >"$out" 2>&1
  rc=$?
  case $rc in
    0) verdict=pass ;;
    124 | 137) verdict="FAIL: timed out after ${limit}s" ;;
    *) verdict="FAIL: exit $rc" ;;
  esac
  [ "$rc" -eq 0 ] || FAILED+=("$name")
  counts=$(grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)' "$out" | grep -E ' in [0-9.]+s' |
    tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
  ROWS+=("| $name | $verdict | $((SECONDS - begin)) | ${counts} |")
  section "$name: $verdict ($((SECONDS - begin)) s)"
  command=$(printf '%q ' "$@")
  { echo "\`${command% }\`"; echo; [ -z "$counts" ] || printf '%s\n\n' "$counts"; } >>"$REPORT"
  if grep -qE '^(FAILED|ERROR) ' "$out"; then
    grep -E '^(FAILED|ERROR) ' "$out" | head -n 40 | fenced
  elif grep -q '^== ' "$out"; then  # a benchmark's table: from its title to the end
    sed -n '/^== /,$p' "$out" | tail -n 40 | fenced
  elif [ "$rc" -ne 0 ] || [ -z "$counts" ]; then
    tail_of "$out" 25 | fenced
  fi
}

PYTEST=("$VPY" -m pytest -q -p no:cacheprovider -m "not slow and not container and not fuzz"
        --device "$DEVICE")
MODELS="$WORK/models"
POLICY="$MODELS/smollm2-135m"
REWARD="$MODELS/minilm-l6"
BENCH_OUT="$RESULTS/bench.jsonl"
has() { "$VPY" -c "import $1" >/dev/null 2>&1; }

step tests-generation-hf 180 "${PYTEST[@]}" tests/services/generation --engine hf
step tests-trainer-bf16 150 "${PYTEST[@]}" tests/services/trainer --dtype bfloat16
step nccl-one-rank 60 "${PYTEST[@]}" tests/services/trainer/test_parallel.py -k group_of_one_rank
if has vllm; then
  step tests-generation-vllm 180 "${PYTEST[@]}" tests/services/generation --engine vllm
else
  ROWS+=("| tests-generation-vllm | skipped: vllm not importable | 0 | |")
fi

step bench-models 90 "$VPY" scripts/gpu_models.py build "$WHEELS/models" "$MODELS"
if [ -d "$POLICY" ] && [ -d "$REWARD" ]; then
  step bench-generation-hf 150 "$VPY" bench/generation_throughput.py --device "$DEVICE" \
    --engine hf --model "$POLICY" --out "$BENCH_OUT"
  if has vllm; then
    step bench-generation-vllm 180 "$VPY" bench/generation_throughput.py --device "$DEVICE" \
      --engine vllm --model "$POLICY" --out "$BENCH_OUT"
  fi
  step bench-reference 90 "$VPY" bench/reference_throughput.py --device "$DEVICE" \
    --model "$POLICY" --out "$BENCH_OUT"
  step bench-reward 90 "$VPY" bench/reward_throughput.py --device "$DEVICE" \
    --model "$REWARD" --out "$BENCH_OUT"
  step bench-weight-sync 90 "$VPY" bench/weight_sync.py --device "$DEVICE" \
    --model "$POLICY" --out "$BENCH_OUT"
  peer=none
  has "trl, datasets" && peer=trl
  step "bench-trainer-step-peer-$peer" 150 "$VPY" bench/trainer_step.py --device "$DEVICE" \
    --peer "$peer" --policy "$POLICY" --reward "$REWARD" --out "$BENCH_OUT"
fi
step tests-trainer-fp32 150 "${PYTEST[@]}" tests/services/trainer  # last: the first to go short

section "Summary"
{
  echo "| step | result | seconds | pytest |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "${#FAILED[@]} step(s) failed${FAILED[*]:+: ${FAILED[*]}}; ${SECONDS}s in all. Logs: logs/."
} >>"$REPORT"
log "$(tail -n 1 "$REPORT") Results: $REPORT"
[ "${#FAILED[@]}" -eq 0 ]
