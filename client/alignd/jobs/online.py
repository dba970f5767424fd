"""The online jobs: PPO (with a value head) and GRPO / RLOO (group baselines, no critic).

One step of these jobs is one round: sample completions of a batch of prompts from the
generation service, score them with the reward service, compute reference log-probs, then
train on them and push the new weights to every generation replica (version = round).
The numpy math (KL shaping, GAE, whitening, group baselines) is :mod:`alignd.algorithms`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from alignd import algorithms as alg
from alignd import losses
from alignd.clients.generation import SamplingParams
from alignd.clients.trainer import TrainBatch
from alignd.evaluation import evaluate_policy
from alignd.jobs.base import Job
from alignd.jobs.batches import chunks, load_split

log = logging.getLogger(__name__)


def sequences(samples: list) -> tuple[list[np.ndarray], list[int]]:
    """Each sample's prompt + completion token ids, and its prompt length."""
    rows = [np.concatenate([s.prompt_token_ids, s.token_ids]) for s in samples]
    return rows, [len(s.prompt_token_ids) for s in samples]


def split_shares(prompts: list, replicas: int, params: SamplingParams) -> list[list[int]]:
    """Prompt indices in one share per replica (at most one per prompt), balanced by the
    tokens each prompt requests, estimated as n x (characters / 4 + max_new_tokens): the
    costliest prompt first onto the share with the least so far. Each share keeps the prompts'
    order; the split depends only on the prompts and the replica count."""
    count = max(1, min(replicas, len(prompts)))
    cost = [params.n * (len(str(p)) / 4 + params.max_new_tokens) for p in prompts]
    loads, shares = [0.0] * count, [[] for _ in range(count)]
    for i in sorted(range(len(prompts)), key=lambda i: (-cost[i], i)):
        least = min(range(count), key=lambda s: (loads[s], s))
        shares[least].append(i)
        loads[least] += cost[i]
    return [sorted(share) for share in shares]


@dataclass
class Rollout:
    """One round's samples. Per-token arrays are (B, T) right-padded with ``mask``."""

    prompts: list
    rows: list[np.ndarray]  # B × (P_i + T_i) token ids
    prompt_lengths: list[int]
    texts: list[str]
    scores: np.ndarray  # (B,) raw reward-service scores
    eos: np.ndarray  # (B,) whether the completion ended with EOS
    ref_logprobs: np.ndarray  # (B, T)
    mask: np.ndarray  # (B, T)
    gen_logprobs: np.ndarray  # (B, T) the generation service's (behaviour policy's)
    old: dict[str, np.ndarray] | None = None  # (B, T) trainer Forward outputs, when chunked

    def batch(self, index, **token_inputs: np.ndarray) -> TrainBatch:
        """The rows ``index`` with the named (B, T) per-token inputs, unpadded."""
        return TrainBatch(
            [self.rows[i] for i in index], [self.prompt_lengths[i] for i in index],
            token_inputs={k: alg.unpad(v[index], self.mask[index])
                          for k, v in token_inputs.items()},
        )  # fmt: skip


class _Online(Job):
    """Rounds of generate → score → reference → train → push; held-out prompts evaluated every
    ``eval_every`` rounds and after the last."""

    def setup(self) -> None:
        c = self.config
        self.prompts, self.held = load_split(c.data, "prompt", c.seed)
        self.total_steps = self.rounds
        self.version = 0

    group = 1
    """Completions sampled per prompt."""

    @property
    def rounds(self) -> int:
        """The rounds this run takes: ``rounds``, capped by ``max_steps``."""
        c = self.config
        return min(c.rounds, c.max_steps) if c.max_steps else c.rounds

    def optimizer_steps(self) -> int:
        """Rounds × epochs × minibatches of ``batch_size`` rows per round."""
        c = self.config
        rows = c.rollout.prompts_per_round * self.group
        return self.rounds * self.epochs * -(-rows // c.batch_size)

    def evaluate(self, step: int) -> dict[str, float]:
        """The policy now serving, on the held-out prompts: reward-service score, KL to the
        reference model and length, each with its standard error (``eval/…``, ``eval/…_se``),
        from ``eval_samples`` completions per prompt at temperature 1, seeded by the step."""
        if not self.held:
            return {}
        c = self.config
        report = evaluate_policy(
            c.name or self.kind, self.service("generation"), self.service("reward"),
            self.service("reference"), [p.prompt for p in self.held], samples=c.eval_samples,
            max_new_tokens=c.rollout.max_new_tokens, seed=self.eval_seed(step),
            scorer=c.rollout.scorer or None, isolated=c.deterministic,
        )  # fmt: skip
        return report.metrics()

    def eval_seed(self, step: int) -> int:
        """The sampling seed of the evaluation after ``step`` (the same on a resumed run)."""
        return self.rng(-(step + 1_000_000)).randrange(2**31)

    def prepare(self) -> None:
        """Weights versions of this run start above whatever the replicas serve now (kept in
        the state, so a resumed run continues the same numbering)."""
        self.version = -1  # generation holds other weights until the first push
        base = self.run_dir.state.get("version_base")
        if base is None:
            base = max(self._replica_versions().values())
        self.version_base = int(base)

    def extra_state(self) -> dict:
        return {"version_base": self.version_base}

    def _sync_weights(self, version: int, targets: list[str] | None = None) -> None:
        """Makes every generation replica (or ``targets``) serve the trainer's weights as
        ``version``; replicas that fail (restarting) are retried with backoff for
        ``retry_seconds``, and the replicas are looked up again (a replaced pod is pushed to)."""
        targets, done = list(targets or self.platform.generation_targets), set()
        deadline, delay = time.monotonic() + self.config.retry_seconds, 0.5
        with self.phase("weight_sync"):
            while True:
                results = self.call(self.trainer.push_weights, targets, version)
                done |= {r.address for r in results if r.ok}
                failed = [r for r in results if not r.ok]
                if not failed:
                    break
                errors = "; ".join(f"{r.address}: {r.error}" for r in failed)
                if time.monotonic() + delay > deadline:
                    raise RuntimeError(f"weight push of version {version} failed: {errors}")
                log.warning("weight push failed (%s); retrying in %.1fs", errors, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                if self.rediscover():  # replicas came or went: push to the ones not yet done
                    targets = [t for t in self.platform.generation_targets if t not in done]
                    if not targets:
                        break
                else:
                    targets = [r.address for r in failed]
        self.version = version

    def _ensure_weights(self, version: int) -> None:
        """Pushes again if a replica restarted (it came back with its initial weights)."""
        if self.version != version:
            self._sync_weights(version)
            return
        stale = [t for t, v in self._replica_versions().items() if v != version]
        if stale:
            self._sync_weights(version, stale)

    def _replica_versions(self) -> dict[str, int]:
        """The weights version each generation replica serves, by target (the replicas are
        looked up again on a retry, so one that went away is replaced by those there are)."""
        return self.call(
            lambda: {c.target: c.info().weights_version for c in self.generation_clients()}
        )

    def round_rows(self, group: int = 1) -> int:
        """Rows (prompts x group) each round samples."""
        return min(self.config.rollout.prompts_per_round, len(self.prompts)) * group

    def rollout(self, step: int, group: int = 1, forward: Sequence[str] = ()) -> Rollout:
        """Samples ``group`` completions of each of the round's prompts and scores them; in
        chunked rounds, also the trainer ``Forward`` outputs ``forward`` of each chunk as soon
        as it is generated (:meth:`_forward` then has them)."""
        c, rng = self.config, self.rng(step)
        picked = rng.sample(range(len(self.prompts)), min(c.rollout.prompts_per_round,
                                                          len(self.prompts)))  # fmt: skip
        prompts = [self.prompts[i].prompt for i in picked]
        self._ensure_weights(self.version_base + step)
        params = SamplingParams(
            max_new_tokens=c.rollout.max_new_tokens, temperature=c.rollout.temperature,
            top_p=c.rollout.top_p, n=group, seed=rng.randrange(2**31),
        )  # fmt: skip
        start = time.perf_counter()
        old = None
        if c.rollout.chunk_prompts:
            samples, scores, ref, old = self._overlapped(prompts, params, list(forward))
        else:
            with self.phase("generation"):
                samples = self._generate(prompts, params)
            entries = [p for p, g in zip(prompts, samples, strict=True) for _ in g]
            scores, ref, scoring, reference = self._score(entries, [s for g in samples for s in g])
            self.timings["scoring"] += scoring
            self.timings["reference"] += reference
        self.timings["rollout"] += time.perf_counter() - start
        flat = [(p, s) for p, group_ in zip(prompts, samples, strict=True) for s in group_]
        texts = [s.text for _, s in flat]
        rows, lengths = sequences([s for _, s in flat])
        ref_padded, mask = alg.pad_right(ref)
        generated, _ = alg.pad_right([s.logprobs for _, s in flat])
        return Rollout(
            [p for p, _ in flat], rows, lengths, texts, np.asarray(scores, np.float64),
            np.array([s.finish_reason == "eos" for _, s in flat]), ref_padded, mask, generated,
            old,
        )  # fmt: skip

    def _score(self, prompts: list, samples: list) -> tuple[list, list, float, float]:
        """Reward scores and reference log-probs of ``samples`` (one per entry of
        ``prompts``), and the seconds each call took."""
        c = self.config
        rows, lengths = sequences(samples)
        start = time.perf_counter()
        scores = self.call(self.service("reward").score, prompts, [s.text for s in samples],
                           scorer=c.rollout.scorer or None,
                           isolated=c.deterministic)  # fmt: skip
        middle = time.perf_counter()
        ref = self.call(self.service("reference").logprobs, rows, lengths,
                        isolated=c.deterministic)  # fmt: skip
        return list(scores), list(ref), middle - start, time.perf_counter() - middle

    def _overlapped(
        self, prompts: list, params: SamplingParams, forward: list[str]
    ) -> tuple[list, list, list, dict | None]:
        """Generation in chunks of ``rollout.chunk_prompts`` prompts, each chunk scored and
        given its reference log-probs as soon as it is generated. ``time/generation``,
        ``time/scoring`` and ``time/reference`` are then the phases' busy seconds (summed
        over their concurrent calls), ``time/generation_wall`` the wall time of the generation
        and ``time/rollout`` of the whole: ``generation_wall + scoring + reference`` exceeding
        ``rollout`` is the overlap (with ``overlap: false`` it cannot)."""
        size = self.config.rollout.chunk_prompts
        chunks_ = [
            list(range(i, min(i + size, len(prompts)))) for i in range(0, len(prompts), size)
        ]
        done: dict[int, tuple] = {}
        lock = threading.Lock()

        def busy(name: str, seconds: float) -> None:
            with lock:
                self.timings[name] += seconds

        def score(share: list[int], groups: list) -> tuple:
            entries = [(prompts[i], s) for i, g in zip(share, groups, strict=True) for s in g]
            scores, ref, scoring, reference = self._score(*map(list, zip(*entries, strict=True)))
            busy("scoring", scoring)
            busy("reference", reference)
            outputs = {}
            if forward:  # the trainer is idle while a round samples
                start = time.perf_counter()
                batch = TrainBatch(*sequences([s for _, s in entries]))
                outputs = self.call(self.trainer.forward, batch, forward,
                                    temperature=self.config.rollout.temperature)  # fmt: skip
                busy("training", time.perf_counter() - start)
            return scores, ref, outputs

        overlap, generated = self.config.rollout.overlap, {}
        with concurrent.futures.ThreadPoolExecutor(max(1, len(chunks_))) as scoring:

            def on_share(index: int, share: list[int], groups: list, seconds: float) -> None:
                busy("generation", seconds)
                if overlap:
                    done[index] = scoring.submit(score, share, groups)
                else:
                    generated[index] = (share, groups)

            start = time.perf_counter()
            samples = self._generate(prompts, params, shares=chunks_, on_share=on_share)
            self.timings["generation_wall"] += time.perf_counter() - start
            if overlap:
                scored = {i: future.result() for i, future in done.items()}
            else:  # the same requests, one phase after another
                scored = {i: score(*generated[i]) for i in sorted(generated)}
        order = range(len(chunks_))
        scores = [x for i in order for x in scored[i][0]]
        ref = [x for i in order for x in scored[i][1]]
        old = {k: alg.pad_right([x for i in order for x in scored[i][2][k]])[0] for k in forward}
        return samples, scores, ref, old or None

    def _generate(
        self, prompts: list, params: SamplingParams, *, shares: list[list[int]] | None = None,
        on_share=None,
    ) -> list[list]:  # fmt: skip
        """The round's samples from every generation replica at once: the prompts are split
        into one share per replica, balanced by the tokens they request (n x (prompt +
        max_new_tokens), prompts estimated at 4 characters a token), each share with its own
        seed (the first share keeps the round's). A share whose replica fails is sent again,
        after the backoff and a fresh lookup of the replicas, to the next replica in turn.
        Each replica's generated tokens and seconds are logged as
        ``generation/replica<i>/tokens`` and ``time/generation/replica<i>`` (i: its place among
        the replicas when it served)."""
        if shares is None:
            shares = split_shares(prompts, len(self.generation_clients()), params)
        results: list = [None] * len(prompts)
        counting = threading.Lock()

        def serve(index: int, share: list[int]) -> None:
            turns = itertools.count(index)
            share_params = dataclasses.replace(
                params, seed=None if params.seed is None else (params.seed + index) % 2**63
            )

            def once():
                clients = self.generation_clients()  # looked up on each attempt
                client = clients[next(turns) % len(clients)]
                start = time.perf_counter()
                out = client.generate([prompts[i] for i in share], share_params,
                                      isolated=self.config.deterministic)  # fmt: skip
                return clients.index(client), out, time.perf_counter() - start

            replica, out, seconds = self.call(once)
            for i, group in zip(share, out, strict=True):
                results[i] = group
            tokens = sum(len(s.token_ids) for group in out for s in group)
            with counting:
                self.counts[f"generation/replica{replica}/tokens"] += tokens
                self.timings[f"generation/replica{replica}"] += seconds
            if on_share is not None:
                on_share(index, share, out, seconds)

        with concurrent.futures.ThreadPoolExecutor(max(1, len(shares))) as pool:
            for future in [pool.submit(serve, i, share) for i, share in enumerate(shares)]:
                future.result()
        return results

    def _forward(self, rollout: Rollout, outputs: list[str]) -> dict[str, np.ndarray]:
        """Old log-probs (and values) of the rollout under the current policy, padded (those
        a chunked round computed already are not asked again)."""
        if rollout.old is not None and set(outputs) <= rollout.old.keys():
            return {k: rollout.old[k] for k in outputs}
        with self.phase("training"):
            result = self.call(
                self.trainer.forward, rollout.batch(range(len(rollout.rows))),
                outputs, temperature=self.config.rollout.temperature,
            )  # fmt: skip
        return {k: alg.pad_right(v)[0] for k, v in result.items()}

    def _train(self, step: int, rollout: Rollout, loss, epochs: int, **inputs) -> dict[str, float]:
        """``epochs`` passes of minibatches (``batch_size`` rows each, one optimizer step
        per minibatch, ``micro_batch_size`` rows per ForwardBackward)."""
        c, trainer, rng = self.config, self.trainer, self.rng(-step)  # not the rollout's
        sums: dict[str, list[float]] = {}
        with self.phase("training"):
            for _ in range(epochs):
                order = np.array(rng.sample(range(len(rollout.rows)), len(rollout.rows)))
                for minibatch in chunks(order, c.batch_size):
                    for micro in chunks(minibatch, c.micro):
                        result = trainer.forward_backward(
                            rollout.batch(micro, **inputs), loss,
                            loss_scale=len(micro) / len(minibatch),
                        )  # fmt: skip
                        for key, value in {"loss": result.loss, **result.metrics}.items():
                            sums.setdefault(key, []).append(value)
                    update = trainer.optim_step()
                    sums.setdefault("grad_norm", []).append(update.grad_norm)
                    sums.setdefault("lr", []).append(update.learning_rate)
        return {k: float(np.mean(v)) for k, v in sums.items()}

    def _recompute(self, rows: int, epochs: int, default: bool = False) -> bool:
        """Whether the old log-probs come from a trainer ``Forward`` (see
        ``recompute_old_logprobs``)."""
        chosen = self.config.recompute_old_logprobs
        if chosen is not None:
            return chosen
        return default or epochs > 1 or rows > self.config.batch_size

    def _mismatch(self, rollout: Rollout, trainer: np.ndarray) -> dict[str, float]:
        """Generator vs trainer log-probs of the sampled tokens: mean and max |Δ|."""
        diff = np.abs(rollout.gen_logprobs - trainer)[rollout.mask.astype(bool)]
        if diff.size == 0:
            return {}
        return {"logprob_mismatch/mean_abs": float(diff.mean()),
                "logprob_mismatch/max": float(diff.max())}  # fmt: skip

    def _rollout_metrics(self, rollout: Rollout) -> dict[str, float]:
        return {
            "reward": float(rollout.scores.mean()),
            "reward_std": float(rollout.scores.std()),
            "response_length": float(rollout.mask.sum(-1).mean()),
            "eos_fraction": float(rollout.eos.mean()),
        }

    def after_checkpoint(self, step: int, path) -> None:
        """Every round ends with a push, so a checkpoint needs no more."""


class PPOJob(_Online):
    """PPO: per-token rewards −β·KL plus the score at the last token, GAE, clipped policy and
    value losses, ``ppo_epochs`` passes of minibatches per round."""

    kind = "ppo"
    model_kind = "causal_lm_value"

    @property
    def epochs(self) -> int:
        return self.config.ppo_epochs

    def setup(self) -> None:
        super().setup()
        c = self.config
        target = c.target_kl if c.adaptive_kl else None
        self.kl_control = alg.make_kl_controller(c.kl_coef, target, c.kl_horizon)
        self.kl_control.value = float(self.run_dir.state.get("kl_coef", c.kl_coef))

    def extra_state(self) -> dict:
        return {**super().extra_state(), "kl_coef": self.kl_control.value}

    def train_step(self, step: int) -> dict[str, float]:
        c = self.config
        recompute = self._recompute(self.round_rows(), c.ppo_epochs, default=True)
        outputs = ["logprobs", "values"] if recompute else ["values"]
        rollout = self.rollout(step, forward=outputs)
        old = self._forward(rollout, outputs)
        values, mask = old["values"], rollout.mask
        logprobs = old["logprobs"] if recompute else rollout.gen_logprobs
        mismatch = self._mismatch(rollout, logprobs) if recompute else {}
        scores = rollout.scores
        if c.missing_eos_penalty is not None:
            scores = alg.penalize_missing_eos(scores, rollout.eos, c.missing_eos_penalty)
        if c.reward_clip is not None:
            scores = alg.clip_scores(scores, c.reward_clip)
        kl = alg.kl_penalty(logprobs, rollout.ref_logprobs, mask, c.kl_estimator)  # (B, T)
        beta = self.kl_control.value
        rewards = alg.token_rewards(scores, kl, mask, beta)  # (B, T)
        if c.whiten_rewards:
            rewards = alg.whiten_rewards(rewards, mask)
        advantages, returns = alg.gae(rewards, values, mask, c.gamma, c.lam)
        advantages = alg.whiten_advantages(advantages, mask)
        loss = losses.PPO(clip_range=c.clip_range, value_clip_range=c.value_clip_range,
                          vf_coef=c.vf_coef, entropy_coef=c.entropy_coef,
                          temperature=c.rollout.temperature)  # fmt: skip
        metrics = self._train(
            step, rollout, loss, c.ppo_epochs, old_logprobs=logprobs, advantages=advantages,
            returns=returns, old_values=values,
        )  # fmt: skip
        sequence_kl = alg.sequence_kl(kl, mask)
        self.kl_control.update(float(sequence_kl.mean()), len(rollout.rows))
        self._sync_weights(self.version_base + step + 1)
        return {**metrics, **self._rollout_metrics(rollout), "kl": float(sequence_kl.mean()),
                "kl_coef": beta, "score": float(scores.mean()), **mismatch}  # fmt: skip


class GRPOJob(_Online):
    """GRPO (Shao et al. 2024) or RLOO (Ahmadian et al. 2024): ``group_size`` samples per
    prompt, advantages from the group's other rewards, ``policy_gradient`` loss."""

    kind = "grpo"

    @property
    def group(self) -> int:  # type: ignore[override]
        return self.config.group_size

    @property
    def epochs(self) -> int:
        return self.config.epochs_per_round

    def train_step(self, step: int) -> dict[str, float]:
        c = self.config
        recompute = c.clip_range is not None and self._recompute(
            self.round_rows(c.group_size), c.epochs_per_round
        )
        rollout = self.rollout(step, group=c.group_size, forward=["logprobs"] if recompute else ())
        if c.baseline == "grpo":
            advantages = alg.grpo_advantages(rollout.scores, c.group_size, c.scale_rewards)
        else:
            advantages = alg.rloo_advantages(rollout.scores, c.group_size)
        token_advantages = alg.broadcast_to_tokens(advantages, rollout.mask)  # (B, T)
        inputs = {"advantages": token_advantages}
        mismatch = {}
        if c.clip_range is not None:
            if recompute:
                inputs["old_logprobs"] = self._forward(rollout, ["logprobs"])["logprobs"]
                mismatch = self._mismatch(rollout, inputs["old_logprobs"])
            else:
                inputs["old_logprobs"] = rollout.gen_logprobs
        if c.kl_coef > 0:
            inputs["ref_logprobs"] = rollout.ref_logprobs
        loss = losses.PolicyGradient(clip_range=c.clip_range, kl_coef=c.kl_coef,
                                     aggregation=c.aggregation,
                                     temperature=c.rollout.temperature)  # fmt: skip
        metrics = self._train(step, rollout, loss, c.epochs_per_round, **inputs)
        self._sync_weights(self.version_base + step + 1)
        return {**metrics, **self._rollout_metrics(rollout), **mismatch}
