"""Trainer step time: the trainer service vs TRL's DPOTrainer and RewardTrainer, same data.

Measures, in one run on one machine, with the same pairs, pairs per step and max length:
  1. seconds per DPO optimizer step on SmolLM2-135M: the service (ForwardBackward with the
     ``dpo`` loss on P chosen rows then P rejected rows, then OptimStep) vs TRL ``DPOTrainer``.
     Both read reference log-probabilities computed once before training (the service's come
     from the reference service; TRL's from ``precompute_ref_log_probs=True``). The service
     runs twice, as two trainer services on the same batches: right-padded rows, and packed
     rows (Initialize ``packing``, padding-free); their losses must agree;
  2. seconds per reward-model step on MiniLM-L6 (one-label sequence classifier): the service's
     ``bradley_terry`` loss vs TRL ``RewardTrainer``;
  3. the FLOP/s the service's DPO step achieves, 6 · N · tokens / (s/step), with N the trainable
     parameters and tokens the real (unpadded) tokens of the step's rows, over the FLOP/s of a
     dense float32 matmul measured in the same run.

Token ids are identical on both sides: the DPO rows are built the way TRL tokenizes plain-text
pairs (prompt, prompt + completion + EOS, split at their common prefix, truncated to the max
length) and checked against TRL's prepared dataset; the reward-model pairs are pre-tokenized.
Both sides run float32 on the CPU, AdamW at one learning rate (constant), gradient clipping at
1.0, one batch per step, no gradient checkpointing, no logging, saving or evaluation. The two
take turns step by step: TRL's trainer calls the service's next step from a callback after each
of its own (timed between ``on_step_begin`` and ``on_step_end``), so a slow spell of the shared
machine falls on both; the service's step is timed from the client (both calls). The first
``--warmup`` steps of each side are left out; the median of the rest is reported.

Both sides, and the matmul, use the same number of torch threads: ``OMP_NUM_THREADS`` when set
(the service inherits it), else one per core. On a machine shared with other work, fewer
threads than cores give steadier numbers (``OMP_NUM_THREADS=1``).

``--parallel`` compares instead the trainer service's DPO step at 1 rank, 2 ranks ``ddp`` and
2 ranks ``fsdp`` (three services, taking turns step by step): seconds per step and, per rank,
the parameter and optimizer bytes the service reports and each rank process's peak resident
memory (VmHWM), after Initialize and at the end. On 2 cores the speed-up is bounded; the
memory is the point.

``--device cuda`` puts both sides (the trainer and reference services, TRL's trainer) and the
matmul on the GPU, still in float32. ``--peer none`` runs the service's steps alone (where TRL
is not installed): seconds per step and achieved ÷ matmul FLOP/s, no TRL ratios.

Runs in the benchmark environment (``make setup-bench``; it has TRL):

    .venv-bench/bin/python bench/trainer_step.py --quick
    .venv-bench/bin/python bench/trainer_step.py --pairs 64 --batch 8 --max-length 128 --steps 6
    python bench/trainer_step.py --device cuda --peer none --policy DIR --reward DIR
    .venv/bin/python bench/trainer_step.py --parallel --pairs 16 --batch 4 --steps 4
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_device_argument, report, sentences, synchronize

from alignd import ReferenceClient, TrainerClient, losses
from alignd.clients.trainer import TrainBatch
from alignd.local import LocalService
from alignd.models import resolve_model
from alignd_server.common.models import load_causal_lm, load_sequence_classifier

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
import transformers
from transformers import PrinterCallback, TrainerCallback

LR = 1e-6
BETA = 0.1


@dataclass
class Pairs:
    """Preference pairs as text: completions start with a space, as they follow the prompt."""

    prompts: list[str]
    chosen: list[str]
    rejected: list[str]


@dataclass
class Step:
    """One step's rows (chosen rows then rejected rows) and their prompt lengths."""

    rows: list[list[int]]
    prompts: list[int]


def make_pairs(count: int) -> Pairs:
    """Prompts of ~16-32 tokens and completions of ~32-64 tokens (fixed seeds)."""
    return Pairs(
        prompts=sentences(count, 14, 30, seed=11),
        chosen=[" " + s for s in sentences(count, 30, 60, seed=12)],
        rejected=[" " + s for s in sentences(count, 30, 60, seed=13)],
    )


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def dpo_rows(tokenizer, pairs: Pairs, max_length: int) -> list[tuple[list[int], list[int], int]]:
    """(chosen row, rejected row, prompt length) per pair, tokenized as TRL's DPOTrainer does
    plain-text pairs: EOS appended to each completion, the prompt ends where the tokenized
    prompt and prompt + completion diverge, rows truncated to ``max_length`` (keep start)."""
    out = []
    eos = tokenizer.eos_token
    for prompt, chosen, rejected in zip(pairs.prompts, pairs.chosen, pairs.rejected, strict=True):
        p = tokenizer(prompt)["input_ids"]
        c = tokenizer(prompt + chosen + eos)["input_ids"]
        r = tokenizer(prompt + rejected + eos)["input_ids"]
        n = min(common_prefix(p, c), common_prefix(p, r))
        if n >= max_length:
            raise ValueError(f"a prompt of {n} tokens fills --max-length {max_length}")
        out.append((c[:max_length], r[:max_length], n))
    return out


def steps_of(pairs: list[tuple[list[int], list[int], int]], batch: int) -> list[Step]:
    """Consecutive batches of ``batch`` pairs, in TRL's collation order; a partial one dropped."""
    steps = []
    for i in range(0, len(pairs) - batch + 1, batch):
        chunk = pairs[i : i + batch]
        rows = [c for c, _, _ in chunk] + [r for _, r, _ in chunk]
        steps.append(Step(rows, [p for *_, p in chunk] * 2))
    return steps


def cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds (user + system) process ``pid`` has used, all its threads; None = this
    process."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Interleave(TrainerCallback):
    """Times each TRL step (wall and CPU seconds of this process, where TRL runs), then runs
    ``between(step)`` (the service's step) before the next."""

    def __init__(self, between: Callable[[int], None]) -> None:
        self.between = between
        self.times: list[float] = []
        self.cpu: list[float] = []
        self._start = self._cpu = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start, self._cpu = time.perf_counter(), cpu_seconds()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)
        self.cpu.append(cpu_seconds() - self._cpu)
        self.between(len(self.times) - 1)


def trl_peer():
    """``(datasets, trl)``, the peer's packages (the benchmark environment has them)."""
    try:
        import datasets
        import trl
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit(
            f"{err}: run `make setup-bench` and use .venv-bench/bin/python, or --peer none"
        ) from None
    return datasets, trl


class Turns:
    """Several sides' steps one after another, the order reversed every other step."""

    def __init__(self, *sides) -> None:
        self.sides = sides

    def __call__(self, step: int) -> None:
        for side in self.sides if step % 2 == 0 else reversed(self.sides):
            side(step)

    def run(self, count: int) -> None:
        for step in range(count):
            self(step)


class ServiceSteps:
    """The service side: ForwardBackward(loss) + OptimStep per step, timed from the client,
    and the CPU seconds the service process ``pid`` spent on it (when given)."""

    def __init__(self, client: TrainerClient, batches: list[TrainBatch], loss,
                 pid: int | None = None) -> None:  # fmt: skip
        self.client, self.batches, self.loss, self.pid = client, batches, loss, pid
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.losses: list[float] = []

    def __call__(self, step: int) -> None:
        batch = self.batches[step % len(self.batches)]
        cpu = cpu_seconds(self.pid) if self.pid else 0.0
        start = time.perf_counter()
        result = self.client.forward_backward(batch, self.loss)
        self.client.optim_step()
        self.times.append(time.perf_counter() - start)
        if self.pid:
            self.cpu.append(cpu_seconds(self.pid) - cpu)
        self.losses.append(result.loss)

    def run(self, count: int) -> None:
        """``count`` steps one after another (no peer to take turns with)."""
        for step in range(count):
            self(step)


def trl_args(cls, args: argparse.Namespace, out: str, **extra):
    """TRL config matching the service: fp32 on its device, one batch a step, constant lr, no
    overhead."""
    return cls(
        output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_length=args.max_length, learning_rate=LR, lr_scheduler_type="constant",
        max_grad_norm=1.0, max_steps=args.warmup + args.steps, report_to="none",
        logging_steps=10**6, save_strategy="no", eval_strategy="no",
        use_cpu=torch.device(args.device).type == "cpu",
        dataloader_num_workers=0, bf16=False, fp16=False, gradient_checkpointing=False,
        train_sampling_strategy="sequential", dataloader_drop_last=True, disable_tqdm=True,
        seed=0, **extra,
    )  # fmt: skip


def reference_logps(path: Path, steps: list[Step], device: str) -> list[np.ndarray]:
    """Summed reference log-probabilities of each step's rows, from the reference service."""
    flags = ["--model", str(path), "--metrics-port", "-1", "--log-level", "WARNING",
             "--device", device]  # fmt: skip
    with LocalService("reference", flags) as service, ReferenceClient(service.target) as ref:
        return [
            np.array([float(r.sum()) for r in ref.logprobs(s.rows, s.prompts)], dtype=np.float32)
            for s in steps
        ]


def check_trl_rows(dataset, rows: list[tuple[list[int], list[int], int]], max_length: int):
    """Fails unless TRL tokenized the pairs into exactly the service's rows."""
    for i, (c, r, p) in enumerate(rows):
        prompt = dataset[i]["prompt_ids"]
        if (len(prompt) != p or (prompt + dataset[i]["chosen_ids"])[:max_length] != c
                or (prompt + dataset[i]["rejected_ids"])[:max_length] != r):  # fmt: skip
            raise RuntimeError(f"pair {i}: TRL's token ids differ from the service's")


def dpo(args: argparse.Namespace, trainer: TrainerClient, packing: TrainerClient, out: str,
        pids: tuple[int, int]) -> dict:  # fmt: skip
    """The DPO side by side: the service with padded rows (``trainer``) and with packed rows
    (``packing``), and TRL; returns the step times, the losses, the tokens per step and N."""
    path = resolve_model(args.policy)
    loaded = load_causal_lm(path)
    pairs = make_pairs(args.pairs)
    rows = dpo_rows(loaded.tokenizer, pairs, args.max_length)
    steps = steps_of(rows, args.batch)
    ref = reference_logps(path, steps, args.device)
    batches = [
        TrainBatch(s.rows, s.prompts, sequence_inputs={"ref_logps": r})
        for s, r in zip(steps, ref, strict=True)
    ]
    init = trainer.initialize(str(path), "causal_lm", lr=LR, max_grad_norm=1.0, seed=0)
    packing.initialize(str(path), "causal_lm", lr=LR, max_grad_norm=1.0, seed=0, packing=True)
    service = ServiceSteps(trainer, batches, losses.DPO(beta=BETA), pids[0])
    packed = ServiceSteps(packing, batches, losses.DPO(beta=BETA), pids[1])
    peer = {"trl": [], "trl_cpu": [], "ref_diff": None}
    if args.peer == "trl":
        peer = dpo_peer(args, loaded, pairs, rows, ref, Turns(service, packed), out)
    else:
        Turns(service, packed).run(args.warmup + args.steps)
    return {
        **peer, "service": service.times, "losses": service.losses, "packed": packed.times,
        "packed_losses": packed.losses, "service_cpu": service.cpu, "packed_cpu": packed.cpu,
        "tokens": [sum(len(r) for r in steps[i % len(steps)].rows)
                   for i in range(len(service.times))],
        "params": init.trainable_parameters,
    }  # fmt: skip


def dpo_peer(args, loaded, pairs: Pairs, rows, ref, service: Turns, out: str) -> dict:
    """TRL's DPOTrainer on the same pairs, the service's steps run after each of its own."""
    datasets, trl = trl_peer()
    timer = Interleave(service)
    peer = trl.DPOTrainer(
        model=loaded.model, processing_class=loaded.tokenizer,
        train_dataset=datasets.Dataset.from_dict(
            {"prompt": pairs.prompts, "chosen": pairs.chosen, "rejected": pairs.rejected}
        ),
        args=trl_args(trl.DPOConfig, args, out, beta=BETA, precompute_ref_log_probs=True),
        callbacks=[timer],
    )  # fmt: skip
    peer.remove_callback(PrinterCallback)  # the end-of-training summary
    check_trl_rows(peer.train_dataset, rows, args.max_length)
    used = len(ref) * args.batch
    trl_ref = np.concatenate([peer.train_dataset["ref_chosen_logps"][:used],
                              peer.train_dataset["ref_rejected_logps"][:used]])  # fmt: skip
    ours = np.concatenate([np.concatenate([r[: args.batch] for r in ref]),
                           np.concatenate([r[args.batch :] for r in ref])])  # fmt: skip
    ref_diff = float(np.abs(ours - trl_ref).max())
    peer.train()
    return {"trl": timer.times, "trl_cpu": timer.cpu, "ref_diff": ref_diff}


def reward_model(args: argparse.Namespace, trainer: TrainerClient, out: str) -> dict:
    """The reward-model side by side: (prompt, completion) text pairs, pre-tokenized once."""
    path = resolve_model(args.reward)
    loaded = load_sequence_classifier(path)
    pairs = make_pairs(args.pairs)

    def encode(texts: list[str]) -> list[list[int]]:
        return [
            loaded.tokenizer(p, t, truncation=True, max_length=args.max_length)["input_ids"]
            for p, t in zip(pairs.prompts, texts, strict=True)
        ]

    chosen, rejected = encode(pairs.chosen), encode(pairs.rejected)
    steps = steps_of([(c, r, 0) for c, r in zip(chosen, rejected, strict=True)], args.batch)
    trainer.initialize(str(path), "sequence_classifier", lr=LR, max_grad_norm=1.0, seed=0)
    service = ServiceSteps(trainer, [TrainBatch(s.rows, []) for s in steps], losses.BradleyTerry())
    if args.peer == "none":
        service.run(args.warmup + args.steps)
        return {"service": service.times, "trl": []}
    datasets, trl = trl_peer()
    timer = Interleave(service)
    peer = trl.RewardTrainer(
        model=loaded.model, processing_class=loaded.tokenizer,
        train_dataset=datasets.Dataset.from_dict({"chosen_ids": chosen, "rejected_ids": rejected}),
        args=trl_args(trl.RewardConfig, args, out), callbacks=[timer],
    )  # fmt: skip
    peer.remove_callback(PrinterCallback)
    if len(peer.train_dataset) != len(chosen):
        raise RuntimeError("TRL dropped pairs: rows longer than --max-length")
    peer.train()
    return {"service": service.times, "trl": timer.times}


def _ranks(pid: int) -> list[int]:
    """``pid`` and its descendants that run Python (torchrun's ranks), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    ranks = [p for p in found if p != pid] or [pid]  # torchrun's children, or the one process
    return sorted(ranks)


def _peak_rss(pid: int) -> int:
    """Peak resident bytes of process ``pid`` (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def parallel_modes(args: argparse.Namespace, flags: list[str]) -> int:
    """The DPO step at 1 rank, 2 ranks ddp and 2 ranks fsdp, taking turns."""
    from contextlib import ExitStack

    from alignd.local import free_port

    path = resolve_model(args.policy)
    loaded = load_causal_lm(path)
    steps = steps_of(dpo_rows(loaded.tokenizer, make_pairs(args.pairs), args.max_length),
                     args.batch)  # fmt: skip
    ref = reference_logps(path, steps, args.device)
    batches = [TrainBatch(s.rows, s.prompts, sequence_inputs={"ref_logps": r})
               for s, r in zip(steps, ref, strict=True)]  # fmt: skip
    modes = {"1 rank": ["--nproc", "1"],
             "2 ranks ddp": ["--nproc", "2", "--parallel", "ddp"],
             "2 ranks fsdp": ["--nproc", "2", "--parallel", "fsdp"]}  # fmt: skip
    sides, pids, loading = {}, {}, {}
    with ExitStack() as stack:
        for name, extra in modes.items():
            service = stack.enter_context(LocalService(
                "trainer", [*flags, *extra, "--master-port", str(free_port())]))  # fmt: skip
            client = stack.enter_context(TrainerClient(service.target, timeout=3600))
            client.initialize(str(path), "causal_lm", lr=LR, max_grad_norm=1.0, seed=0)
            # Before any step: what loading the model took (FSDP: rank 0 alone reads it).
            loading[name] = [_peak_rss(p) for p in _ranks(service.process.pid)]
            sides[name] = ServiceSteps(client, batches, losses.DPO(beta=BETA))
            pids[name] = service.process.pid
        for step in range(args.warmup + args.steps):
            for side in sides.values():
                side(step)
        info = {name: side.client.info() for name, side in sides.items()}
        rss = {name: [_peak_rss(p) for p in _ranks(pid)] for name, pid in pids.items()}
    w, mib = args.warmup, 1 << 20
    print(f"\n{args.device}, threads {torch.get_num_threads()}; {args.pairs} pairs, "
          f"{args.batch} pairs/step, max length {args.max_length}, "
          f"{args.steps} timed steps")  # fmt: skip
    rows = []
    for name, side in sides.items():
        first = np.abs(np.array(side.losses) - np.array(sides["1 rank"].losses)).max()
        print(f"{name}: s/step " + " ".join(f"{t:.2f}" for t in side.times)
              + f"; max |loss - 1 rank's| {first:.1e}")  # fmt: skip
        rows += [
            (f"DPO {name}, s/step", statistics.median(side.times[w:]), "s/step"),
            (f"{name}: parameters per rank", max(info[name].parameter_bytes) / mib, "MiB"),
            (f"{name}: optimizer state per rank", max(info[name].optimizer_bytes) / mib, "MiB"),
            (f"{name}: peak resident memory per rank (max)", max(rss[name]) / mib, "MiB"),
        ]
        rows += [(f"{name}: peak resident memory after Initialize, rank {rank}", held / mib, "MiB")
                 for rank, held in enumerate(loading[name])]  # fmt: skip
    one = statistics.median(sides["1 rank"].times[w:])
    ratios = {
        f"{name} / 1 rank, s/step": statistics.median(side.times[w:]) / one
        for name, side in sides.items() if name != "1 rank"
    }  # fmt: skip
    ratios["2 ranks fsdp / 1 rank, optimizer bytes per rank"] = max(
        info["2 ranks fsdp"].optimizer_bytes
    ) / max(info["1 rank"].optimizer_bytes)
    report("trainer step: 1 rank vs 2 ranks ddp vs 2 ranks fsdp", rows, ratios, args.out)
    return 0


def matmul_flops(device: str, n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an (n, n) @ (n, n) float32 product (2 n³ FLOPs each) on ``device``."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)  # (n, n), (n, n)
    torch.matmul(a, b)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64, help="preference pairs in the data")
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per row, at most")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke run)")
    parser.add_argument("--policy", default="smollm2-135m", help="DPO model: bundled name or dir")
    parser.add_argument(
        "--reward", default="minilm-l6", help="reward backbone: bundled name or dir"
    )
    parser.add_argument("--peer", choices=["trl", "none"], default="trl",
                        help="none: the service alone, where TRL is not installed")  # fmt: skip
    add_device_argument(parser)
    parser.add_argument("--parallel", action="store_true",
                        help="compare 1 rank, 2 ranks ddp and 2 ranks fsdp (no peer)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="append results as JSON lines")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.batch, args.max_length, args.steps, args.warmup = 4, 2, 64, 2, 1
    if args.pairs < args.batch or min(args.batch, args.steps, args.max_length) < 1:
        parser.error("need --pairs >= --batch >= 1, --steps >= 1 and --max-length >= 1")
    return args


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    transformers.logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    args = parse_args()
    rows_limit = str(max(64, 2 * args.batch))
    flags = ["--model", str(resolve_model(args.policy)), "--metrics-port", "-1",
             "--max-batch-size", rows_limit, "--log-level", "WARNING",
             "--device", args.device]  # fmt: skip
    for root in sorted({str(resolve_model(m).parent) for m in (args.policy, args.reward)}):
        flags += ["--storage-root", root]  # Initialize may load the models from there
    if args.parallel:
        return parallel_modes(args, flags)
    with (
        tempfile.TemporaryDirectory() as out,
        LocalService("trainer", flags) as service,
        LocalService("trainer", flags) as packing_service,
        TrainerClient(service.target, timeout=3600) as trainer,
        TrainerClient(packing_service.target, timeout=3600) as packing,
    ):
        d = dpo(args, trainer, packing, out,
                (service.process.pid, packing_service.process.pid))  # fmt: skip
        packing.close()
        packing_service.stop()  # its memory is not needed for the reward model
        r = reward_model(args, trainer, out)
    peak = matmul_flops(args.device)
    w = args.warmup
    dpo_s, rm_s = statistics.median(d["service"][w:]), statistics.median(r["service"][w:])
    packed_s = statistics.median(d["packed"][w:])
    cpu = {side: statistics.median(d[f"{side}_cpu"][w:])
           for side in ("service", "packed", "trl") if d[f"{side}_cpu"]}  # fmt: skip
    flops = 6 * d["params"] * sum(d["tokens"][w:])  # 6 · N · real tokens, over the timed steps
    achieved = flops / sum(d["service"][w:])
    achieved_packed = flops / sum(d["packed"][w:])
    print(
        f"\n{args.device}, threads {torch.get_num_threads()}; {args.pairs} pairs, {args.batch} "
        f"pairs/step, max length {args.max_length}, {args.steps} timed steps after {w} warm-up"
    )
    checks = f"DPO first-step loss (service) {d['losses'][0]:.4f} (ln 2 = 0.6931)"
    gap = float(np.abs(np.array(d["losses"]) - np.array(d["packed_losses"])).max())
    checks += f"; packed vs padded losses: max |diff| {gap:.2e}"
    if d["ref_diff"] is not None:
        checks += f"; reference log-probs, service vs TRL: max |diff| {d['ref_diff']:.2e}"
    print(checks)
    sides = ("service", "trl") if args.peer == "trl" else ("service",)
    for name, times in (("DPO", d), ("RM", r)):
        for side in (*sides, "packed") if name == "DPO" else sides:
            print(f"{name} {side} s/step: " + " ".join(f"{t:.2f}" for t in times[side]))
    print(f"achieved FLOP/s = 6 · N · tokens / seconds, N = {d['params']:,} trainable parameters, "
          "tokens = real (unpadded) tokens of the step's 2P rows")  # fmt: skip
    policy, reward = Path(args.policy).name, Path(args.reward).name
    rows = [
        (f"DPO {policy}, service ForwardBackward + OptimStep", dpo_s, "s/step"),
        (f"DPO {policy}, service, packed rows", packed_s, "s/step"),
        *((f"DPO {side}, CPU seconds per step", seconds, "CPU s") for side, seconds in cpu.items()),
        (f"RM {reward}, service ForwardBackward + OptimStep", rm_s, "s/step"),
        ("DPO real tokens per step (mean)", statistics.mean(d["tokens"][w:]), "tokens"),
        ("DPO service achieved, 6 · N · tokens / (s/step)", achieved / 1e9, "GFLOP/s"),
        ("DPO service packed, achieved", achieved_packed / 1e9, "GFLOP/s"),
        ("dense float32 matmul 2048 x 2048 (2 n^3 / s, best of 5)", peak / 1e9, "GFLOP/s"),
    ]
    ratios = {
        "DPO service packed / padded, s/step": packed_s / dpo_s,
        "DPO service packed / padded, CPU s/step": cpu["packed"] / cpu["service"],
        "DPO service achieved FLOP/s / matmul FLOP/s": achieved / peak,
        "DPO service packed achieved FLOP/s / matmul FLOP/s": achieved_packed / peak,
    }
    if args.peer == "trl":
        dpo_t, rm_t = statistics.median(d["trl"][w:]), statistics.median(r["trl"][w:])
        rows[1:1] = [(f"DPO {policy}, TRL DPOTrainer (precomputed ref log-probs)", dpo_t, "s/step")]
        at = next(i for i, row in enumerate(rows) if row[0].startswith("RM ")) + 1
        rows[at:at] = [(f"RM {reward}, TRL RewardTrainer", rm_t, "s/step")]
        ratios = {
            "DPO service / TRL, s/step (target <= 1.0)": dpo_s / dpo_t,
            "DPO service packed / TRL, s/step (target <= 0.5)": packed_s / dpo_t,
            "DPO service packed / TRL, CPU s/step": cpu["packed"] / cpu["trl"],
            "RM service / TRL, s/step (target <= 1.0)": rm_s / rm_t,
            **ratios,
        }
    title = "trainer step (service vs TRL)" if args.peer == "trl" else "trainer step (service)"
    report(title, rows, ratios, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
