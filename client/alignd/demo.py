"""``alignd demo``: the main job. RLHF end to end on local services, with a verdict.

On the bundled sentiment task (a programmatic oracle scores how positive a sentence is):

1. SFT of SmolLM2-135M-Instruct on neutral-to-mixed demonstrations;
2. a MiniLM-L6 reward model trained with Bradley–Terry on oracle-labelled pairs (held-out
   pairwise accuracy must reach 0.8), then served by the reward service;
3. PPO from the SFT policy against that reward model (the oracle as its gold scorer: every
   evaluation scores the held-out completions with both, and ``runs/ppo/plots/
   overoptimization.png`` draws proxy and gold against √KL), and DPO from the SFT policy on
   the same pairs;
4. each policy (SFT, PPO, DPO) sampled on held-out prompts: oracle score, reward-model score,
   KL to the SFT reference and length, each ± its standard error. PPO and DPO must beat SFT on
   the oracle by at least three standard errors of the difference.

Everything lands in the output directory: the job configs (runnable with ``alignd run``), the
run directories, service logs, ``report.md`` with the plots, and ``summary.json``.
``--quick`` runs the same pipeline on tiny models built from configs (a smoke test: tiny
models learn nothing worth a verdict).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import yaml

from alignd.evaluation import evaluate_policy, gain
from alignd.jobs import DPOConfig, JobFailed, PPOConfig, RewardModelConfig, SFTConfig, make_job
from alignd.local import LocalService
from alignd.platform import Platform
from alignd.tasks.sentiment import SCORER, load_task, oracle

REQUIRED_ACCURACY, REQUIRED_SE = 0.8, 3.0


def _server(name: str):
    try:
        return __import__(f"alignd_server.common.{name}", fromlist=[name])
    except ImportError as err:
        raise SystemExit(
            f"the demo runs the services: pip install 'alignd[serve]' ({err})"
        ) from err


def _models(out: Path, home: str | None, quick: bool) -> tuple[str, str]:
    """(policy, reward backbone) directories."""
    if quick:
        tiny = _server("tiny").build_tiny_models(out / "tiny-models")
        return str(tiny.causal_lm), str(tiny.classifier)
    paths = _server("prepare").prepare_models(None, home=home, progress=print)
    by_name = {p.name: str(p) for p in paths}
    return by_name["smollm2-135m"], by_name["minilm-l6"]


def configs(out: Path, policy: str, backbone: str, quick: bool, off_policy_steps: int = 0) -> dict:
    """The four job configs of the demo (sizes fit 20 minutes on 2 CPU cores), deterministic:
    two runs give bit-identical metrics. ``off_policy_steps``: PPO's (0: synchronous rounds)."""
    task, runs = load_task(), out / "runs"
    sft_model = str((runs / "sft" / "checkpoints" / "final").resolve())
    scale = 4 if quick else 1
    sft = SFTConfig(
        name="sft", run_dir=runs / "sft", model=policy, max_length=96, batch_size=8,
        data={"path": task.sft, "held_out": 16}, max_steps=20 // scale, eval_every=10,
        optim={"lr": 5e-5, "schedule": "cosine", "warmup_steps": 2}, deterministic=True,
    )  # fmt: skip
    rm = RewardModelConfig(
        name="reward_model", run_dir=runs / "reward_model", model=backbone, max_length=96,
        batch_size=16, data={"path": task.preferences_train, "eval_path": task.preferences_eval},
        max_steps=40 // scale, eval_every=20, optim={"lr": 5e-5, "warmup_steps": 2},
        deterministic=True,
    )  # fmt: skip
    ppo = PPOConfig(
        name="ppo", run_dir=runs / "ppo", model=sft_model, batch_size=8, max_length=96,
        data={"path": task.train_prompts, "held_out": 0.05}, rounds=10 // scale,
        rollout={"prompts_per_round": 16, "max_new_tokens": 24 // scale},
        ppo_epochs=2, kl_coef=0.02, missing_eos_penalty=1.0, vf_coef=0.1,
        off_policy_steps=off_policy_steps, optim={"lr": 2e-5}, deterministic=True,
        eval_every=5, gold_scorer="oracle",  # the oracle tracks what the reward model misses
    )  # fmt: skip
    dpo = DPOConfig(
        name="dpo", run_dir=runs / "dpo", model=sft_model, max_length=96, batch_size=8,
        data={"path": task.preferences_train, "eval_path": task.preferences_eval,
              "limit": 160 // scale}, beta=0.1,
        max_steps=20 // scale, eval_every=10, optim={"lr": 1e-5}, deterministic=True,
    )  # fmt: skip
    return {"sft": sft, "reward_model": rm, "ppo": ppo, "dpo": dpo}


def run_demo(
    home: str | None = None, quick: bool = False, output: str | None = None, resume: bool = False,
    off_policy_steps: int = 0,
) -> int:  # fmt: skip
    """Runs the demo; returns the exit code (1 if a check or a job fails).

    With ``resume``, continues the demo in ``output``: jobs it finished are not run again, a
    job it interrupted resumes from its last checkpoint, and the evaluations run again.
    ``off_policy_steps`` > 0 runs PPO's rounds off-policy (see the PPO job's setting).
    """
    started = time.perf_counter()
    out = Path(output or "alignd-demo").resolve()
    if (out / "runs").exists() and not resume:
        shutil.rmtree(out / "runs")
    (out / "configs").mkdir(parents=True, exist_ok=True)
    print(f"== alignd demo ({'quick, tiny models' if quick else 'SmolLM2-135M + MiniLM-L6'}) "
          f"-> {out}{', resumed' if resume else ''}")  # fmt: skip
    policy, backbone = _models(out, home, quick)
    jobs = configs(out, policy, backbone, quick, off_policy_steps)
    for name, config in jobs.items():
        text = yaml.safe_dump(config.model_dump(mode="json"))
        (out / "configs" / f"{name}.yaml").write_text(text)
    try:
        summary = _pipeline(out, jobs, home, quick)
    except JobFailed as err:
        again = ["alignd", "demo", "--resume", str(out)]
        again += (["--quick"] if quick else []) + (["--home", home] if home else [])
        again += ["--off-policy-steps", str(off_policy_steps)] if off_policy_steps else []
        print(f"alignd demo: {err}; continue with: {shlex.join(again)}", file=sys.stderr)
        return 1
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    from alignd.demo_report import print_summary, write_report

    write_report(out, summary)
    print_summary(summary)
    return 0 if quick or all(check["passed"] for check in summary["checks"]) else 1


def _pipeline(out: Path, jobs: dict, home: str | None, quick: bool) -> dict:
    """Starts the services stage by stage and runs the jobs and evaluations."""
    env = {"ALIGND_HOME": str(home)} if home else {}
    prompts = [p.prompt for p in load_task().prompts("held_out")][: 16 if quick else 48]
    evaluation = {"samples": 1 if quick else 2, "max_new_tokens": 12 if quick else 32}
    with contextlib.ExitStack() as stack:

        def start(role: str, *args: str) -> str:
            print(f"== starting {role}")
            flags = ["--metrics-port", "-1", "--max-batch-size", "512", *args]
            service = LocalService(role, flags, log_file=out / "logs" / f"{role}.log", env=env)
            (out / "logs").mkdir(exist_ok=True)
            return stack.enter_context(service).target

        root = ("--storage-root", str(out))  # the runs, checkpoints and models live there
        generation = start("generation", "--model", jobs["sft"].model, *root)
        targets = {"trainer": start("trainer", *root, "--push-targets", generation),
                   "generation": generation}  # fmt: skip
        rows = {}
        with Platform(**targets) as platform:
            rows["sft"] = _run("SFT", jobs["sft"], platform)
            rows["reward_model"] = _run("reward model", jobs["reward_model"], platform)
        sft_dir = jobs["ppo"].model
        rm_dir = str((jobs["reward_model"].run_dir / "checkpoints" / "final").resolve())
        targets["reward"] = start("reward", "--model", rm_dir, "--scorers", f"oracle={SCORER}")
        targets["reference"] = start("reference", "--model", sft_dir)
        reports = {}
        with Platform(**targets, timeout=600) as platform:
            platform.generation.load_weights(sft_dir, version=1)
            reports["sft"] = _evaluate("SFT", platform, prompts, evaluation)
            rows["ppo"] = _run("PPO", jobs["ppo"], platform)
            reports["ppo"] = _evaluate("PPO", platform, prompts, evaluation)
            rows["dpo"] = _run("DPO", jobs["dpo"], platform)
            dpo_dir = (jobs["dpo"].run_dir / "checkpoints" / "final").resolve()
            version = platform.generation.info().weights_version + 1
            platform.generation.load_weights(str(dpo_dir), version=version)
            reports["dpo"] = _evaluate("DPO", platform, prompts, evaluation)
    return _summary(rows, reports)


def _run(title: str, config, platform) -> list[dict]:
    """Runs one job of the demo (resuming it if its run directory holds one); every row of
    its metrics, those of earlier runs included."""
    state = Path(config.run_dir) / "state.json"
    job = make_job(config, platform, resume=state.exists())
    if job.run_dir.state.get("done"):
        print(f"== {title}: done in an earlier run")
        return job.run_dir.history
    print(f"== {title}" + (f" (resumed after step {job.run_dir.step})" if state.exists() else ""))
    start = time.perf_counter()
    rows = job.run_to_end()
    print(f"   {len(rows)} steps in {time.perf_counter() - start:.0f}s")
    return job.run_dir.history


def _evaluate(name: str, platform, prompts, options: dict):
    print(f"== evaluating {name} on {len(prompts)} held-out prompts")
    return evaluate_policy(
        name, platform.generation, platform.reward, platform.reference, prompts, oracle,
        isolated=True, **options,
    )  # fmt: skip


def _summary(rows: dict, reports: dict) -> dict:
    accuracy = rows["reward_model"][-1]["eval/accuracy"]
    checks = [
        {
            "name": "reward model held-out accuracy",
            "value": accuracy,
            "required": f">= {REQUIRED_ACCURACY}",
            "passed": accuracy >= REQUIRED_ACCURACY,
        }
    ]
    for name in ("ppo", "dpo"):
        diff, ses = gain(reports[name].oracle, reports["sft"].oracle)
        checks.append({"name": f"oracle gain of {name.upper()} over SFT", "value": diff,
                       "standard_errors": ses, "required": f">= {REQUIRED_SE} SE",
                       "passed": ses >= REQUIRED_SE})  # fmt: skip
    return {
        "checks": checks,
        "policies": {k: r.to_dict() for k, r in reports.items()},
        "jobs": {k: {"steps": len(v), "last": v[-1]} for k, v in rows.items()},
    }
