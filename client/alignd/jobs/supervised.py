"""The offline jobs: SFT, reward model (Bradley–Terry) and DPO.

Each step takes ``batch_size`` examples (in ``micro_batch_size`` pieces whose gradients
accumulate on the trainer, each weighted by its share of the examples), then steps the
optimizer. Held-out metrics come from no-grad ``Forward`` calls.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np

from alignd import losses
from alignd.errors import from_status_text
from alignd.evaluation import evaluate_policy
from alignd.jobs.base import Job
from alignd.jobs.batches import (
    batch_indices,
    chunks,
    load_split,
    pair_batch,
    sequence_batch,
    steps_for,
    tokenize,
)
from alignd.jobs.config import ConfigError

log = logging.getLogger(__name__)
EVAL_CHUNK = 16


class _Offline(Job):
    """Steps over a fixed tokenized dataset."""

    def _steps(self, examples: int) -> int:
        c = self.config
        return steps_for(examples, c.batch_size, c.epochs, c.max_steps)

    def _accumulate(self, step: int, examples: int, make_batch, loss) -> dict[str, float]:
        """ForwardBackward over the step's micro-batches, then OptimStep."""
        c, trainer = self.config, self.trainer
        picked = batch_indices(step, examples, c.batch_size, c.seed)
        totals: dict[str, float] = {}
        with self.phase("training"):
            micros = list(chunks(picked, c.micro))
            for i, micro in enumerate(micros):
                share = len(micro) / len(picked)
                result = trainer.forward_backward(  # the last one reduces every rank's gradients
                    make_batch(micro), loss, loss_scale=share, defer_sync=i < len(micros) - 1
                )
                for key, value in {"loss": result.loss, **result.metrics}.items():
                    totals[key] = totals.get(key, 0.0) + share * value
                totals["tokens"] = totals.get("tokens", 0.0) + result.num_tokens
            update = trainer.optim_step()
        return {**totals, "grad_norm": update.grad_norm, "lr": update.learning_rate}


class SFTJob(_Offline):
    """Supervised fine-tuning on (prompt, response) with the prompt masked out of the loss."""

    kind = "sft"

    def setup(self) -> None:
        self.examples = load_split(self.config.data, "sft", self.config.seed)
        self.total_steps = self._steps(len(self.examples[0]))

    def prepare(self) -> None:
        self.train, self.held = (
            tokenize(self.call, self.trainer, [e.prompt for e in part],
                     [e.response for e in part], self.config.max_length)
            for part in self.examples
        )  # fmt: skip

    def train_step(self, step: int) -> dict[str, float]:
        loss = losses.CrossEntropy(label_smoothing=self.config.label_smoothing)
        return self._accumulate(
            step, len(self.train), lambda idx: sequence_batch([self.train[i] for i in idx]), loss
        )

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out token-mean NLL of the responses."""
        total, count = 0.0, 0
        for part in chunks(np.arange(len(self.held)), EVAL_CHUNK):
            seqs = [self.held[i] for i in part]
            rows = self.trainer.forward(sequence_batch(seqs), ["logprobs"])["logprobs"]
            total -= float(sum(r.sum() for r in rows))
            count += sum(len(r) for r in rows)
        nll = total / max(count, 1)
        return {"eval/loss": nll, "eval/perplexity": float(np.exp(min(nll, 50.0)))}


class _Pairs(_Offline):
    """Preference pairs, tokenized as (prompt, chosen) and (prompt, rejected)."""

    def setup(self) -> None:
        self.examples = load_split(self.config.data, "preference", self.config.seed)
        self.total_steps = self._steps(len(self.examples[0]))

    def prepare(self) -> None:
        client = self.trainer
        self.train, self.held = (self._tokenize_pairs(client, part) for part in self.examples)

    def _tokenize_pairs(self, client, pairs) -> tuple[list, list]:
        prompts = [p.prompt for p in pairs]
        chosen = tokenize(self.call, client, prompts, [p.chosen for p in pairs],
                          self.config.max_length)  # fmt: skip
        rejected = tokenize(self.call, client, prompts, [p.rejected for p in pairs],
                            self.config.max_length)  # fmt: skip
        return chosen, rejected


class RewardModelJob(_Pairs):
    """A reward model: a sequence classifier trained with Bradley–Terry on preference pairs;
    its final checkpoint is what the reward service serves."""

    kind = "reward_model"
    model_kind = "sequence_classifier"

    def train_step(self, step: int) -> dict[str, float]:
        chosen, rejected = self.train
        loss = losses.BradleyTerry(self.config.center_rewards_coefficient)
        return self._accumulate(
            step, len(chosen),
            lambda idx: pair_batch([chosen[i] for i in idx], [rejected[i] for i in idx]), loss,
        )  # fmt: skip

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out pairwise accuracy (r_chosen > r_rejected) and mean margin."""
        chosen, rejected = self.held
        margins = []
        for part in chunks(np.arange(len(chosen)), EVAL_CHUNK):
            batch = pair_batch([chosen[i] for i in part], [rejected[i] for i in part])
            rewards = self.trainer.forward(batch, ["rewards"])["rewards"]
            margins.append(rewards[: len(part)] - rewards[len(part) :])
        margin = np.concatenate(margins)
        return {"eval/accuracy": float((margin > 0).mean()), "eval/margin": float(margin.mean())}


class DPOJob(_Pairs):
    """DPO from the policy's own checkpoint; reference log-probabilities come from the
    reference service once per example and are cached in the run directory."""

    kind = "dpo"

    def prepare(self) -> None:
        super().prepare()
        self.ref_train = self._reference("train", *self.train)
        self.ref_held = self._reference("held_out", *self.held)
        self.check_gold_scorer()
        if self.config.gold_scorer and not self.platform.generation_targets:
            raise ConfigError("gold_scorer: DPO samples the held-out prompts to score them, "
                              "and the platform has no generation service")  # fmt: skip

    def _reference(self, name: str, chosen, rejected) -> np.ndarray:
        """(2N,) summed reference log-probs of the chosen then rejected completions."""
        seqs = [*chosen, *rejected]
        key = hashlib.sha256(
            json.dumps([[s.input_ids.tolist(), s.prompt_length] for s in seqs]).encode()
        ).hexdigest()[:16]
        path = self.run_dir.path / "cache" / f"ref_logps-{name}-{key}.npy"
        if path.exists():
            return np.load(path)
        reference, sums = self.service("reference"), []
        with self.phase("reference"):
            for part in chunks(np.arange(len(seqs)), 32):
                rows = self.call(reference.logprobs, [seqs[i].input_ids for i in part],
                                 [seqs[i].prompt_length for i in part],
                                 isolated=self.config.deterministic)  # fmt: skip
                sums += [float(r.sum()) for r in rows]
        values = np.array(sums, dtype=np.float64)
        np.save(path, values)
        return values

    def _loss(self) -> losses.DPO:
        c = self.config
        return losses.DPO(variant=c.variant, beta=c.beta, label_smoothing=c.label_smoothing)

    def train_step(self, step: int) -> dict[str, float]:
        chosen, rejected = self.train
        n = len(chosen)

        def batch(idx):
            ref = np.concatenate([self.ref_train[idx], self.ref_train[n + idx]])
            return pair_batch([chosen[i] for i in idx], [rejected[i] for i in idx], ref)

        return self._accumulate(step, n, batch, self._loss())

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out implicit-reward accuracy and margin; with ``gold_scorer``, also the
        policy's sampled held-out completions scored by it (and early stopping on it)."""
        metrics = self._implicit()
        if self.config.gold_scorer:
            metrics.update(self._sampled(step))
            self.track_gold(step, metrics["eval/gold"], metrics["eval/margin"])
        return metrics

    def _implicit(self) -> dict[str, float]:
        """Held-out implicit-reward accuracy and margin, β·((π_c − ref_c) − (π_r − ref_r))."""
        chosen, rejected = self.held
        n, margins = len(chosen), []
        for part in chunks(np.arange(n), EVAL_CHUNK):
            batch = pair_batch([chosen[i] for i in part], [rejected[i] for i in part])
            rows = self.trainer.forward(batch, ["logprobs"])["logprobs"]
            policy = np.array([r.sum() for r in rows], dtype=np.float64)
            k = len(part)
            ratio = policy - np.concatenate([self.ref_held[part], self.ref_held[n + part]])
            margins.append(self.config.beta * (ratio[:k] - ratio[k:]))
        margin = np.concatenate(margins)
        return {"eval/accuracy": float((margin > 0).mean()), "eval/margin": float(margin.mean())}

    def _sampled(self, step: int) -> dict[str, float]:
        """The policy now trained, pushed to every generation replica (one version above the
        highest they serve) and sampled on the held-out prompts: ``eval/gold`` and the default
        scorer's ``eval/reward``, KL to the reference and length (:func:`evaluate_policy`)."""
        c = self.config
        replicas = self.replica_versions()
        version = max(replicas.values()) + 1
        with self.phase("weight_sync"):
            results = self.call(self.trainer.push_weights, list(replicas), version)
        for result in results:  # the job fails (and resumes) as for any failed call
            if not result.ok:
                raise from_status_text(result.error, f"PushWeights to {result.address}")
        prompts: dict = {}  # each held-out prompt once, in order
        for example in self.examples[1]:
            prompts.setdefault(_key(example.prompt), example.prompt)
        report = evaluate_policy(
            c.name or self.kind, self.service("generation"), self.service("reward"),
            self.service("reference"), list(prompts.values()), samples=c.eval_samples,
            max_new_tokens=c.eval_max_new_tokens, isolated=c.deterministic,
            seed=self.eval_seed(step), gold_scorer=c.gold_scorer,
        )  # fmt: skip
        return report.metrics()


def _key(prompt) -> str:
    """A prompt (text or chat turns) as a hashable key, to take each held-out prompt once."""
    return json.dumps(prompt if isinstance(prompt, str) else list(prompt), sort_keys=True)
