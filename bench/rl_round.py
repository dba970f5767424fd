"""Online RL round time and learning: alignd's GRPO and PPO rounds vs TRL, and alignd's modes.

Measures, in one run on one machine, SmolLM2-135M on the bundled sentiment task with the same
prompts, group size, max_new_tokens, optimizer steps per round, learning rate and reward (the
task's oracle, ``alignd.tasks.sentiment.oracle_scorer``: a function scorer of the reward service
on alignd's side, the same function on TRL's):
  1. seconds per GRPO round: alignd's GRPO job (generate P prompts x G on the generation
     service, score, reference log-probs, one ForwardBackward + OptimStep of the P·G rows,
     push the weights) vs one step of TRL 1.16 ``GRPOTrainer`` (the same round in one process:
     transformers ``generate``, the reward function, the reference model's log-probs, one
     optimizer step; no weights to move). Both: temperature 1, β = ``--beta`` k3 KL to the
     start model, ε = 0.2 clipping, token-mean loss (TRL's ``dapo``), group-std scaling,
     gradient clipping at 1.0, one pass (the generator's log-probs are π_old);
  2. seconds per PPO round: alignd's PPO job vs one update of TRL 1.12
     ``trl.experimental.ppo.PPOTrainer``: P prompts, one completion each, ``--ppo-epochs``
     passes of one minibatch of P rows (as many optimizer steps), k1 KL penalty β = 0.05 in the
     rewards, missing-EOS penalty 1.0, GAE γ = 1, λ = 0.95, ε = ε_v = 0.2, vf_coef 0.1, no
     entropy bonus and no gradient clipping (TRL's PPO loop clips none). The value model:
     alignd's trainer holds one backbone with a linear value head (``causal_lm_value``); TRL's
     is a separate ``AutoModelForSequenceClassification`` (one label) from the same start
     checkpoint, trained beside the policy, as TRL's PPO requires. The reward model: TRL's PPO
     takes a module with a backbone and a ``score`` head, so it gets one that decodes each
     response (the tokens after the prompt's last assistant header, up to the last non-pad
     token, special tokens skipped — the text alignd's generation service returns) and puts
     the oracle's score at the position TRL reads. TRL's PPO masks every pad-token position
     out of attention, and SmolLM2 pads with its EOS, which also ends the chat turns of every
     prompt, so the TRL PPO peer pads with ``<|endoftext|>`` instead;
  3. alignd's wall time per GRPO round, serial (``rollout: {chunk_prompts: C, overlap:
     false}``) vs overlapped (``chunk_prompts: C``) vs ``off_policy_steps: 1`` (overlapped,
     and the next round generated while this one trains), with each service's busy seconds
     over the rounds' wall time (from the rows' ``time/…``: generation = ``generation_wall``,
     reward = ``scoring``, reference, trainer = ``training``, weight sync; the reward and
     reference columns sum concurrent calls), and each mode's round over TRL's GRPO step, TRL
     running as one more job in each turn (a fresh peer of the same rounds) — the fair match
     for an off-policy job, which keeps working between its rounds;
  4. with ``--rounds N``: learning per unit of work. Both sides train N rounds from the same
     start checkpoint (an alignd SFT job of ``--sft-steps`` steps on the task's
     demonstrations; 0 = the base model) on the task's training prompts, and after each round
     sample ``--eval-samples`` completions of ``--eval-prompts`` held-out prompts at
     temperature 1 (alignd: the job's own evaluation through the services; TRL: transformers
     ``generate`` in the peer, its RNG state kept) scored by the oracle; reported: each side's
     held-out oracle score ± standard error at the start, after N rounds, and after the same
     wall-clock budget (the faster side's time for N rounds: the slower side's score after the
     rounds it finished within it). Evaluation time is not counted.

Prompts: without ``--rounds`` both sides train on the same P training prompts every round (the
prompt token ids are checked equal on both sides); with ``--rounds`` both draw P prompts a round
from all the training prompts, each with its own seeded sampler. Both sides run float32, AdamW
at one constant learning rate, no gradient checkpointing, no logging or saving.

Taking turns: each TRL trainer runs in a child process, GRPO's in this environment and PPO's in
the PPO environment (``make setup-bench-ppo``: trl 1.12 cannot share one with trl 1.16), driven
over a pipe: a callback blocks at the end of each of its steps until the driver sends the next
command, so one alignd round and one TRL step alternate and a slow spell of the shared machine
falls on both. A TRL step is timed inside the peer from the command to the end of the step
(data, generation, scoring, forward passes, optimizer steps), an alignd round from the driver
(the job's next round, less its setup, evaluation and checkpoint phases). The first
``--warmup`` rounds of each side are left out; medians of the rest. The alignd modes take turns
job by job (a job of the same rounds per mode, ``--repeats`` times), since an off-policy job
keeps working ahead between its rounds; all three run on the same four services, one after
another.

Every process (the four services, each peer) gets ``OMP_NUM_THREADS`` torch threads when set,
else one per core: ``OMP_NUM_THREADS=1`` gives TRL's process one core and each alignd service
one, so alignd's overlapped phases may use several cores at once where the machine has them.
The services run as local child processes on 127.0.0.1 and are always stopped.
``--sections ppo-modes`` runs section 3 for PPO (TRL 1.12's PPO as the peer job).
``--weight-sync collective`` makes alignd's jobs push each round's weights over the collective
transport (``weight_sync: {transport: collective}``, rendezvous on loopback) instead of the
gRPC stream.

``--peer none`` runs alignd's side alone (no TRL ratios). Runs in the benchmark environment:

    .venv-bench/bin/python bench/rl_round.py --quick
    .venv-bench/bin/python bench/rl_round.py --prompts 8 --group 4 --max-new-tokens 32 --steps 4
    .venv-bench/bin/python bench/rl_round.py --rounds 20 --sections grpo ppo
    make bench-rl BENCH_RL_ARGS="--rounds 10"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_device_argument, report, threads

from alignd.evaluation import Estimate, evaluate_policy
from alignd.jobs import GRPOConfig, PPOConfig, SFTConfig, make_job
from alignd.local import LocalService
from alignd.models import resolve_model
from alignd.platform import Platform
from alignd.tasks.sentiment import SCORER, load_task, oracle, oracle_scorer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

PEER_FLAG = "--serve-peer"
CLIP = 0.2
PPO_KL, VF_COEF, GAMMA, LAM, MISSING_EOS = 0.05, 0.1, 1.0, 0.95, 1.0
MODE_PHASES = {"generation": "generation_wall", "reward": "scoring", "reference": "reference",
               "trainer": "training", "weight sync": "weight_sync"}  # fmt: skip
UNTIMED = ("setup", "eval", "checkpoint")
"""Phases of a job's row that are not part of its round."""


# ---- the TRL peer: a child process, one step per command -----------------------------------


class PeerStop(Exception):
    """The driver has no more steps for the peer."""


class Channel:
    """The peer's end of the pipe: JSON commands on stdin, one JSON reply a line on the stdout
    it was started with; anything else printed (TRL, transformers) goes to stderr."""

    def __init__(self) -> None:
        self.out = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def send(self, **message) -> None:
        self.out.write(json.dumps(message) + "\n")
        self.out.flush()

    def receive(self) -> dict:
        line = sys.stdin.readline()
        return json.loads(line) if line else {"cmd": "stop"}


def turns_callback(channel: Channel, evaluate):
    """A TrainerCallback that holds TRL's loop at the start and after every step until the
    driver says ``step`` (answering ``eval`` meanwhile), and reports each step's seconds."""
    from transformers import TrainerCallback

    class Turns(TrainerCallback):
        start = 0.0

        def wait(self) -> None:
            while True:
                command = channel.receive()
                if command["cmd"] == "eval":
                    channel.send(**evaluate(command["seed"]))
                elif command["cmd"] == "step":
                    self.start = time.perf_counter()
                    return
                else:
                    raise PeerStop

        def on_train_begin(self, args, state, control, **kwargs):
            self.wait()

        def on_step_end(self, args, state, control, **kwargs):
            channel.send(seconds=time.perf_counter() - self.start)
            self.wait()

    return Turns()


def chat_ids(tokenizer, prompts: list) -> list[list[int]]:
    """Each chat prompt's token ids with the assistant generation prompt, as TRL builds them."""
    return [
        list(tokenizer.apply_chat_template(conversation=[p], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"][0])
        for p in prompts
    ]  # fmt: skip


def peer_evaluate(model, tokenizer, spec: dict, seed: int) -> dict:
    """The peer's policy on the held-out prompts: ``eval_samples`` completions each at
    temperature 1, oracle-scored; training's RNG state is put back afterwards."""
    rng, side = torch.random.get_rng_state(), tokenizer.padding_side
    training, tokenizer.padding_side = model.training, "left"
    torch.manual_seed(seed)
    model.eval()
    try:
        ids = chat_ids(tokenizer, spec["eval_prompts"])
        batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(model.device)
        with torch.no_grad():
            out = model.generate(
                **batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=spec["max_new_tokens"], num_return_sequences=spec["eval_samples"],
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
        width = batch["input_ids"].shape[1]
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    finally:
        torch.random.set_rng_state(rng)
        tokenizer.padding_side = side
        model.train(training)
    estimate = Estimate.of([oracle(t) for t in texts])
    return {"mean": estimate.mean, "se": estimate.se, "n": estimate.n}


def oracle_reward(prompts, completions, **kwargs) -> list[float]:
    """The task's oracle as a TRL reward function (conversational completions)."""
    return [
        oracle_scorer(p, c[-1]["content"] if isinstance(c, list) else c, None)
        for p, c in zip(prompts, completions, strict=True)
    ]


class OracleBackbone(torch.nn.Module):
    """Scores (B, T) query+response ids with the oracle: (B, T, 1), the response's score at
    its last non-pad position, 0 elsewhere. The response starts after the prompt's last
    assistant header (the chat template's generation prompt)."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        turn = [{"role": "user", "content": "x"}]
        header = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        plain = tokenizer.apply_chat_template(turn, tokenize=False)
        self.header = tokenizer.encode(header[len(plain) :], add_special_tokens=False)

    def response_start(self, ids: list[int], end: int) -> int:
        h = len(self.header)
        starts = [i + h for i in range(end - h + 1) if ids[i : i + h] == self.header]
        return starts[-1] if starts else 0

    def forward(self, input_ids, attention_mask, **kwargs):
        scores = torch.zeros(*input_ids.shape, 1)  # (B, T, 1)
        for row, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist(),
                                              strict=True)):  # fmt: skip
            last = max(i for i, m in enumerate(mask) if m)
            start = self.response_start(ids, last + 1)
            text = self.tokenizer.decode(ids[start : last + 1], skip_special_tokens=True)
            scores[row, last, 0] = oracle(text)
        return SimpleNamespace(hidden_states=(scores.to(input_ids.device),))


class OracleRewardModel(torch.nn.Module):
    """What TRL's PPO reads a reward model as: ``getattr(m, m.base_model_prefix)`` then
    ``m.score(hidden_states[-1])``."""

    base_model_prefix = "backbone"

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.backbone = OracleBackbone(tokenizer)
        self.score = torch.nn.Identity()


def trainer_args(spec: dict) -> dict:
    """TrainingArguments both TRL trainers share: fp32, constant lr, nothing saved or logged."""
    return dict(
        output_dir=spec["out"], learning_rate=spec["lr"], lr_scheduler_type="constant",
        gradient_accumulation_steps=1, report_to="none", logging_steps=10**6,
        save_strategy="no", use_cpu=torch.device(spec["device"]).type == "cpu", bf16=False,
        fp16=False, gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True,
        seed=spec["seed"],
    )  # fmt: skip


def grpo_peer(spec: dict, channel: Channel):
    """TRL 1.16 GRPOTrainer on the spec's prompts; one step = one round of P x G."""
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    holder = {}
    turns = turns_callback(channel, lambda seed: peer_evaluate(
        holder["trainer"].model, tokenizer, spec, seed))  # fmt: skip
    rows = spec["prompts_per_round"] * spec["group"]
    args = TRLGRPOConfig(
        per_device_train_batch_size=rows, num_generations=spec["group"],
        max_completion_length=spec["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
        beta=spec["beta"], epsilon=CLIP, loss_type="dapo", scale_rewards="group",
        num_iterations=1, max_grad_norm=1.0, max_steps=spec["rounds"] + 1,
        log_completions=False, disable_dropout=True, **trainer_args(spec),
    )  # fmt: skip
    holder["trainer"] = trainer = GRPOTrainer(
        model=spec["model"], reward_funcs=[oracle_reward], args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": spec["prompts"]}), callbacks=[turns],
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    return trainer, chat_ids(tokenizer, spec["prompts"][:64])


def ppo_peer(spec: dict, channel: Channel):
    """TRL 1.12 PPOTrainer: a separate value model and the oracle as its reward module."""
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from trl.experimental.ppo import PPOConfig as TRLPPOConfig
    from trl.experimental.ppo import PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"], padding_side="left")
    ids = chat_ids(tokenizer, spec["prompts"])
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)  # not the EOS (see the docstring)
    policy = AutoModelForCausalLM.from_pretrained(spec["model"])
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    value = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1)
    holder = {}
    turns = turns_callback(channel, lambda seed: peer_evaluate(
        holder["trainer"].accelerator.unwrap_model(holder["trainer"].model).policy, tokenizer,
        spec, seed))  # fmt: skip
    p = spec["prompts_per_round"]
    args = TRLPPOConfig(
        per_device_train_batch_size=p, num_mini_batches=1, num_ppo_epochs=spec["ppo_epochs"],
        total_episodes=p * (spec["rounds"] + 1), local_rollout_forward_batch_size=p,
        response_length=spec["max_new_tokens"], temperature=1.0, stop_token="eos",
        missing_eos_penalty=MISSING_EOS, kl_coef=PPO_KL, kl_estimator="k1", cliprange=CLIP,
        cliprange_value=CLIP, vf_coef=VF_COEF, gamma=GAMMA, lam=LAM, whiten_rewards=False,
        num_sample_generations=0, **trainer_args(spec),
    )  # fmt: skip
    dataset = Dataset.from_dict({"input_ids": ids})
    holder["trainer"] = trainer = PPOTrainer(
        args=args, processing_class=tokenizer, model=policy, ref_model=None,
        reward_model=OracleRewardModel(tokenizer), train_dataset=dataset, value_model=value,
        eval_dataset=dataset, callbacks=[turns],
    )  # fmt: skip
    return trainer, ids[:64]


def serve_peer() -> int:
    """The peer process: reads its spec, builds the trainer, then steps on command."""
    channel = Channel()
    logging.basicConfig(level=logging.WARNING)
    spec = channel.receive()
    torch.set_num_threads(spec["threads"])
    trainer, ids = {"grpo": grpo_peer, "ppo": ppo_peer}[spec["algo"]](spec, channel)
    channel.send(ready=True, prompt_ids=ids)
    with contextlib.suppress(PeerStop):
        trainer.train()
    return 0


# ---- the driver -------------------------------------------------------------------------------


class Peer:
    """A TRL trainer in a child process (``python``: its environment), one step per turn."""

    def __init__(self, python: str, spec: dict, log_file: Path) -> None:
        self.log_file = log_file
        with log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [python, str(Path(__file__).resolve()), PEER_FLAG], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log, text=True,
            )  # fmt: skip
        self._send(spec)
        self.prompt_ids: list[list[int]] | None = None

    def _send(self, message: dict) -> None:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            tail = self.log_file.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the TRL peer exited ({self.log_file}):\n{tail}")
        return json.loads(line)

    def ready(self) -> list[list[int]]:
        """Waits until the peer's trainer is built; its first prompts' token ids."""
        return self._reply()["prompt_ids"]

    def step(self) -> float:
        self._send({"cmd": "step"})
        return self._reply()["seconds"]

    def evaluate(self, seed: int) -> Estimate:
        self._send({"cmd": "eval", "seed": seed})
        reply = self._reply()
        return Estimate(reply["mean"], reply["se"], reply["n"])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send({"cmd": "stop"})
            self.process.stdin.close()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Rounds:
    """One alignd job, a round a turn: each call runs the next round and gives its wall seconds
    (less the phases in :data:`UNTIMED`) and its metrics row."""

    def __init__(self, config, platform) -> None:
        self.rows = make_job(config, platform, progress=False).run()

    def __call__(self) -> tuple[float, dict]:
        start = time.perf_counter()
        row = next(self.rows)
        untimed = sum(row.get(f"time/{phase}", 0.0) for phase in UNTIMED)
        return time.perf_counter() - start - untimed, row

    def close(self) -> None:
        self.rows.close()


@contextlib.contextmanager
def services(args, work: Path) -> Iterator[tuple[Platform, Path]]:
    """The four services on loopback, and the start model (SFT checkpoint or base model)."""
    base = resolve_model(args.policy)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:

        def start(role: str, *flags: str) -> str:
            common = ["--metrics-port", "-1", "--log-level", "WARNING", "--device", args.device,
                      "--max-batch-size", "512"]  # fmt: skip
            service = LocalService(role, common + list(flags),
                                   log_file=work / "logs" / f"{role}.log")  # fmt: skip
            return stack.enter_context(service).target

        roots = ["--storage-root", str(work), "--storage-root", str(base.parent)]
        generation = start("generation", "--model", str(base), *roots)
        trainer = start("trainer", *roots, "--push-targets", generation)
        model = base
        if args.sft_steps:
            with Platform(generation=generation, trainer=trainer) as platform:
                model = sft(args, platform, work, base)
        reference = start("reference", "--model", str(model))
        reward = start("reward", "--model", "none", "--scorers", f"oracle={SCORER}",
                       "--default-scorer", "oracle")  # fmt: skip
        with Platform(generation=generation, reward=reward, reference=reference,
                      trainer=trainer, timeout=600) as platform:  # fmt: skip
            yield platform, model


def sft(args, platform: Platform, work: Path, base: Path) -> Path:
    """The start checkpoint of both sides: an SFT job on the task's demonstrations."""
    print(f"== SFT: {args.sft_steps} steps of 8 demonstrations")
    config = SFTConfig(
        name="sft", run_dir=work / "runs" / "sft", model=str(base), max_length=96, batch_size=8,
        data={"path": load_task().sft, "held_out": 16}, max_steps=args.sft_steps,
        optim={"lr": 5e-5, "schedule": "cosine", "warmup_steps": 2}, seed=args.seed,
    )  # fmt: skip
    make_job(config, platform, progress=False).run_to_end()
    return (work / "runs" / "sft" / "checkpoints" / "final").resolve()


def prompt_files(args, work: Path) -> dict:
    """The training prompts (P fixed ones, or all of them with ``--rounds``) and the held-out
    evaluation prompts, as JSONL files and as lists."""
    task, rng = load_task(), random.Random(args.seed)
    train = [p.prompt for p in task.prompts("train")]
    pool = train if args.rounds else rng.sample(train, args.prompts)
    held = rng.sample([p.prompt for p in task.prompts("held_out")], args.eval_prompts)
    files = {}
    for name, prompts in (("pool", pool), ("held_out", held)):
        files[name] = work / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return {"files": files, "pool": pool, "held": held}


def job_config(algo: str, args, model: Path, prompts: dict, run_dir: Path, rounds: int,
               **extra):  # fmt: skip
    """alignd's job of the side by side: ``rounds`` rounds (the driver stops one earlier, so
    no final evaluation or checkpoint), evaluated each round with ``--rounds``."""
    data = {"path": prompts["files"]["pool"], "eval_path": prompts["files"]["held_out"]}
    rollout = {"prompts_per_round": args.prompts, "max_new_tokens": args.max_new_tokens,
               "temperature": 1.0, "scorer": "oracle", **extra.get("rollout", {})}  # fmt: skip
    extra = {k: v for k, v in extra.items() if k != "rollout"}
    if args.weight_sync == "collective":  # the trainer listens on loopback, a free port a push
        extra["weight_sync"] = {"transport": "collective", "rendezvous": "127.0.0.1:0"}
    common = dict(
        name=f"alignd-{algo}", run_dir=run_dir, model=str(model), seed=args.seed,
        max_length=160 + args.max_new_tokens, rounds=rounds + 1, rollout=rollout, data=data,
        eval_every=1 if args.rounds else 0, eval_samples=args.eval_samples,
    )  # fmt: skip
    if algo == "grpo":
        return GRPOConfig(
            **common, batch_size=args.prompts * args.group, group_size=args.group,
            baseline="grpo", scale_rewards="group", epochs_per_round=1, kl_coef=args.beta,
            clip_range=CLIP, aggregation="token_mean",
            optim={"lr": args.lr, "max_grad_norm": 1.0}, **extra,
        )  # fmt: skip
    return PPOConfig(
        **common, batch_size=args.prompts, ppo_epochs=args.ppo_epochs, kl_coef=PPO_KL,
        kl_estimator="k1", missing_eos_penalty=MISSING_EOS, gamma=GAMMA, lam=LAM,
        clip_range=CLIP, value_clip_range=CLIP, vf_coef=VF_COEF, entropy_coef=0.0,
        optim={"lr": args.lr, "max_grad_norm": 0}, **extra,
    )  # fmt: skip


def start_peer(algo: str, args, model: Path, prompts: dict, work: Path, rounds: int) -> Peer:
    spec = {
        "algo": algo, "model": str(model), "prompts": prompts["pool"],
        "eval_prompts": prompts["held"], "prompts_per_round": args.prompts, "group": args.group,
        "max_new_tokens": args.max_new_tokens, "lr": args.lr, "beta": args.beta,
        "ppo_epochs": args.ppo_epochs, "rounds": rounds, "seed": args.seed,
        "device": args.device, "eval_samples": args.eval_samples, "threads": threads(),
        "out": str(work / f"trl-{algo}"),
    }  # fmt: skip
    python = sys.executable if algo == "grpo" else args.ppo_python
    return Peer(python, spec, work / "logs" / f"trl-{algo}.log")


def start_score(platform: Platform, model: Path, prompts: dict, args) -> Estimate:
    """alignd's evaluation of the start model (loaded into the generation service)."""
    version = platform.generation.info().weights_version + 1
    platform.generation.load_weights(str(model), version=version)
    return evaluate_policy(
        "start", platform.generation, platform.reward, platform.reference, prompts["held"],
        oracle, samples=args.eval_samples, max_new_tokens=args.max_new_tokens,
        seed=args.seed + 999,
    ).oracle  # fmt: skip


def compare(algo: str, args, platform: Platform, model: Path, prompts: dict, work: Path) -> dict:
    """alignd's rounds and TRL's steps of ``algo`` taking turns (each side's round seconds and,
    with ``--rounds``, held-out oracle scores after each)."""
    rounds = args.rounds or args.warmup + args.steps
    how = "rounds per side, taking turns" if args.peer == "trl" else "rounds, alignd alone"
    print(f"== {algo.upper()}: {rounds} {how}")
    peer = start_peer(algo, args, model, prompts, work, rounds) if args.peer == "trl" else None
    out = {"alignd": [], "alignd_rows": [], "trl": [], "alignd_eval": [], "trl_eval": [],
           "start": {}}  # fmt: skip
    try:
        if peer is not None:
            theirs = peer.ready()
            ours = [list(map(int, s.input_ids)) for s in
                    platform.generation.tokenize(prompts["pool"][: len(theirs)])]  # fmt: skip
            if ours != theirs:
                raise RuntimeError(f"{algo}: TRL's prompt token ids differ from alignd's")
        if args.rounds:
            out["start"]["alignd"] = start_score(platform, model, prompts, args)
            if peer is not None:
                out["start"]["trl"] = peer.evaluate(args.seed + 999)
        config = job_config(algo, args, model, prompts, work / "runs" / algo, rounds)
        take_turns(Rounds(config, platform), peer, rounds, args, out)
    finally:
        if peer is not None:
            peer.close()
    return out


def take_turns(job: Rounds, peer: Peer | None, rounds: int, args, out: dict) -> None:
    """One alignd round, then one TRL step, ``rounds`` times (evaluations between, untimed)."""
    samples = args.eval_prompts * args.eval_samples
    try:
        for r in range(rounds):
            seconds, row = job()
            out["alignd"].append(seconds)
            out["alignd_rows"].append(row)
            if args.rounds:
                out["alignd_eval"].append(Estimate(row["eval/reward"], row["eval/reward_se"],
                                                   samples))  # fmt: skip
            if peer is not None:
                out["trl"].append(peer.step())
                if args.rounds:
                    out["trl_eval"].append(peer.evaluate(args.seed + 1000 + r))
    finally:
        job.close()


def modes(args, algo: str, platform: Platform, model: Path, prompts: dict, work: Path) -> dict:
    """alignd's ``algo`` rounds serial, overlapped and off-policy, job by job, ``--repeats``
    times, with TRL's trainer of ``algo`` as one more job in each turn."""
    chunk = args.chunk_prompts or max(1, args.prompts // 4)
    variants = {
        "serial": {"rollout": {"chunk_prompts": chunk, "overlap": False}},
        "overlapped": {"rollout": {"chunk_prompts": chunk}},
        "off-policy 1": {"rollout": {"chunk_prompts": chunk}, "off_policy_steps": 1},
    }
    if "off_policy_steps" not in GRPOConfig.model_fields:
        print("   (this alignd has no off_policy_steps: that mode is left out)")
        del variants["off-policy 1"]
    per_job = args.warmup + math.ceil(args.steps / args.repeats)
    print(f"== {algo.upper()} modes: chunks of {chunk} prompts; {args.repeats} x {per_job} "
          "rounds per mode")  # fmt: skip
    out = {name: [] for name in variants}
    peer_steps = []  # TRL's steps, a job of its own in each turn
    for repeat in range(args.repeats):
        if args.peer == "trl":
            peer = start_peer(algo, args, model, prompts, work, per_job)
            try:
                peer.ready()
                seconds = [peer.step() for _ in range(per_job)]
            finally:
                peer.close()
            peer_steps += seconds[args.warmup :]
        for name, extra in variants.items():
            run_dir = work / "runs" / f"{algo}-mode-{name.replace(' ', '-')}-{repeat}"
            job = Rounds(job_config(algo, args, model, prompts, run_dir, per_job, **extra),
                         platform)  # fmt: skip
            try:
                for r in range(per_job):
                    seconds, row = job()
                    if r >= args.warmup:
                        out[name].append((seconds, row))
            finally:
                job.close()
    return {"chunk": chunk, "rounds": out, "trl": peer_steps}


def budget_score(walls: list[float], evals: list[Estimate], start: Estimate | None,
                 budget: float) -> tuple[int, Estimate | None]:  # fmt: skip
    """The rounds finished within ``budget`` seconds and the score after the last of them."""
    done = int(np.searchsorted(np.cumsum(walls), budget * (1 + 1e-9), side="right"))
    return done, (evals[done - 1] if done else start)


PEER_NAMES = {"grpo": "TRL 1.16 GRPOTrainer step", "ppo": "TRL 1.12 PPOTrainer update"}


def show_compare(algo: str, args, d: dict) -> None:
    w = args.warmup
    peer_name = PEER_NAMES[algo]
    ours = statistics.median(d["alignd"][w:])
    print(f"{algo} alignd s/round: " + " ".join(f"{t:.2f}" for t in d["alignd"]))
    timed = d["alignd_rows"][w:]
    phases = {
        p: statistics.mean(r.get(f"time/{p}", 0.0) for r in timed)
        for p in ("generation", "scoring", "reference", "training", "weight_sync")
    }
    print(f"{algo} alignd phases, mean s: " + ", ".join(f"{p} {v:.2f}" for p, v in phases.items()))
    rows = [(f"{algo.upper()} alignd round (job, 4 services)", ours, "s/round")]
    ratios = {}
    if d["trl"]:
        theirs = statistics.median(d["trl"][w:])
        print(f"{algo} TRL    s/step:  " + " ".join(f"{t:.2f}" for t in d["trl"]))
        rows.append((f"{algo.upper()} {peer_name}", theirs, "s/step"))
        ratios[f"alignd {algo.upper()} round / {peer_name} (target <= 0.6)"] = ours / theirs
    extra = "" if algo == "ppo" else f" x {args.group}"
    name = f"{algo.upper()} round: {args.prompts} prompts{extra}, {args.max_new_tokens} new tokens"
    report(name, rows, ratios, args.out)
    if args.rounds:
        show_learning(algo, args, d)


def show_learning(algo: str, args, d: dict) -> None:
    """Held-out oracle scores at the start, after N rounds and after the same budget."""
    sides = [s for s in ("alignd", "trl") if d[s]]
    budget = min(sum(d[s]) for s in sides)
    print(f"\n== learning, {algo.upper()}: held-out oracle score ± SE ({args.eval_prompts} "
          f"prompts x {args.eval_samples}); budget = {budget:.1f} s of rounds")  # fmt: skip
    record = {"bench": f"learning {algo}", "budget_s": budget, "time": time.time()}
    for side in sides:
        start, evals = d["start"].get(side), d[f"{side}_eval"]
        done, at_budget = budget_score(d[side], evals, start, budget)
        print(f"  {side:<7} start {start}   after {len(evals)} rounds ({sum(d[side]):.1f} s) "
              f"{evals[-1]}   after {budget:.1f} s ({done} rounds) {at_budget}")  # fmt: skip
        record[side] = {"start": [start.mean, start.se] if start else None,
                        "final": [evals[-1].mean, evals[-1].se], "rounds_in_budget": done,
                        "at_budget": [at_budget.mean, at_budget.se] if at_budget else None,
                        "seconds": sum(d[side])}  # fmt: skip
    if args.out is not None:
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")


def show_modes(args, algo: str, d: dict) -> None:
    rows, walls, table = [], {}, []
    for name, kept in d["rounds"].items():
        seconds = [s for s, _ in kept]
        walls[name] = statistics.median(seconds)
        rows.append((f"{algo.upper()} alignd {name} (chunks of {d['chunk']})", walls[name],
                     "s/round"))  # fmt: skip
        phases = {}
        for service, key in MODE_PHASES.items():
            if service == "generation" and not any(f"time/{key}" in r for _, r in kept):
                key = "generation"
            phases[service] = sum(r.get(f"time/{key}", 0.0) for _, r in kept) / sum(seconds)
        table.append((name, phases))
    ratios = {f"{name} / serial, s/round": walls[name] / walls["serial"]
              for name in walls if name != "serial"}  # fmt: skip
    if d["trl"]:
        theirs = statistics.median(d["trl"])
        rows.append((f"{algo.upper()} {PEER_NAMES[algo]} (a job per turn)", theirs, "s/step"))
        ratios.update({f"alignd {name} round / TRL step (target <= 0.6)": walls[name] / theirs
                       for name in walls})  # fmt: skip
    report(f"alignd {algo.upper()} round modes", rows, ratios, args.out)
    print("  busy seconds / round wall time " + "".join(f"{s:>13}" for s in MODE_PHASES))
    for name, phases in table:
        print(f"  {name:<31}" + "".join(f"{v:>13.2f}" for v in phases.values()))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--prompts", type=int, default=8, help="prompts per round (P)")
    add("--group", type=int, default=4, help="GRPO completions per prompt (G)")
    add("--max-new-tokens", type=int, default=32, help="most tokens per completion")
    add("--steps", type=int, default=4, help="timed rounds per side (without --rounds)")
    add("--warmup", type=int, default=1, help="rounds per side left out of the timings")
    add("--ppo-epochs", type=int, default=2, help="PPO passes (optimizer steps) per round")
    add("--lr", type=float, default=1e-5, help="constant AdamW learning rate, both sides")
    add("--beta", type=float, default=0.04, help="GRPO k3 KL coefficient, both sides")
    add("--chunk-prompts", type=int, default=0, help="modes: prompts per chunk (0: P / 4)")
    add("--repeats", type=int, default=2, help="modes: times each mode's job runs, in turns")
    add("--rounds", type=int, default=0, help="learning runs of N rounds per side (0: none)")
    add("--sft-steps", type=int, default=None, help="SFT steps of the start checkpoint "
        "(default 20 with --rounds, else 0; 0 = the base model)")  # fmt: skip
    add("--eval-prompts", type=int, default=32, help="held-out prompts of the evaluations")
    add("--eval-samples", type=int, default=2, help="completions per held-out prompt")
    add("--sections", nargs="+", choices=["grpo", "ppo", "modes", "ppo-modes"],
        default=["grpo", "ppo", "modes"],
        help="modes: GRPO's serial / overlapped / off-policy jobs; ppo-modes: PPO's")  # fmt: skip
    add("--policy", default="smollm2-135m", help="bundled model name or directory")
    add("--peer", choices=["trl", "none"], default="trl", help="none: alignd alone")
    add("--ppo-python", default=str(Path(__file__).resolve().parent.parent / ".venv-bench-ppo"
                                    / "bin" / "python"),
        help="Python of the environment with trl 1.12 (make setup-bench-ppo)")  # fmt: skip
    add("--weight-sync", choices=["stream", "collective"], default="stream",
        help="how alignd's jobs push each round's weights (weight_sync.transport)")  # fmt: skip
    add("--seed", type=int, default=0)
    add("--quick", action="store_true", help="tiny settings (a smoke run)")
    add_device_argument(parser)
    add("--out", type=Path, default=None, help="append results as JSON lines")
    add("--work", type=Path, default=None,
        help="keep run directories and logs here (default: a temporary directory)")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.group, args.max_new_tokens, args.steps, args.warmup = 2, 2, 8, 1, 1
        args.ppo_epochs, args.repeats, args.eval_prompts, args.eval_samples = 1, 1, 2, 1
        args.rounds = min(args.rounds, 2)
    if args.sft_steps is None:
        args.sft_steps = (2 if args.quick else 20) if args.rounds else 0
    if min(args.prompts, args.group - 1, args.max_new_tokens, args.steps, args.repeats) < 1:
        parser.error("need --prompts, --max-new-tokens, --steps, --repeats >= 1, --group >= 2")
    if args.rounds and args.rounds <= args.warmup:
        parser.error("--rounds must exceed --warmup")
    needs_ppo = {"ppo", "ppo-modes"} & set(args.sections)
    if args.peer == "trl" and needs_ppo and not Path(args.ppo_python).exists():
        parser.error(f"{args.ppo_python} is missing: make setup-bench-ppo, or --peer none")
    return args


def main() -> int:
    if sys.argv[1:] == [PEER_FLAG]:
        return serve_peer()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = parse_args()
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rl-round-")))
        else:
            work = args.work.resolve()
            work.mkdir(parents=True, exist_ok=True)
        prompts = prompt_files(args, work)
        with services(args, work) as (platform, model):
            results = {}
            for section in args.sections:
                if section in ("modes", "ppo-modes"):
                    algo = "ppo" if section == "ppo-modes" else "grpo"
                    results[section] = modes(args, algo, platform, model, prompts, work)
                else:
                    results[section] = compare(section, args, platform, model, prompts, work)
    print(f"\n{args.device}, threads {threads()} per process; weights pushed by "
          f"{args.weight_sync}; start model: "
          f"{'SFT, ' + str(args.sft_steps) + ' steps' if args.sft_steps else args.policy}; "
          f"{time.perf_counter() - started:.0f} s in all")  # fmt: skip
    for section, d in results.items():
        if section in ("modes", "ppo-modes"):
            show_modes(args, "ppo" if section == "ppo-modes" else "grpo", d)
        else:
            show_compare(section, args, d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
