"""What every job does around its own algorithm: the run directory, the trainer's lifecycle,
checkpoints and resume, retries against restarting services, phase timings and progress.

A job subclass implements :meth:`Job.setup` (load its data), :meth:`Job.prepare`
(tokenize it once the trainer holds the model) and
:meth:`Job.train_step` (one optimizer step, returning its metrics); :meth:`Job.run` drives
them, yielding each step's metrics. Steps are deterministic functions of ``(seed, step)``, so
a resumed run repeats exactly the steps an uninterrupted one would have taken.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from alignd.clients.base import with_timeout
from alignd.errors import (
    AbortedError,
    AligndError,
    DeadlineExceededError,
    ResourceExhaustedError,
    UnavailableError,
)
from alignd.jobs.config import ConfigError, JobConfig
from alignd.jobs.rundir import RunDirectory

log = logging.getLogger(__name__)
T = TypeVar("T")
TRANSIENT = (UnavailableError, DeadlineExceededError, ResourceExhaustedError, AbortedError)
"""Errors a restarting or overloaded service gives; calls are retried on them."""


class JobFailed(RuntimeError):
    """A job stopped because a call to a service failed; its run directory can resume.

    Attributes:
        step: the step that failed (0: before the first step, while setting up).
        resumes_at: the step a resumed run starts from (its last checkpoint's, plus one).
        cause: the error of the failed call.
    """

    def __init__(self, job: Job, step: int, cause: AligndError) -> None:
        name = job.config.name or job.kind
        where = f"at step {step} of {job.total_steps}" if step else "while setting up"
        detail = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        super().__init__(
            f"{name} failed {where}: {detail}; a resumed run starts at step {job.run_dir.step + 1}"
        )
        self.step, self.resumes_at, self.cause = step, job.run_dir.step + 1, cause


class Job:
    """Base of every job.

    Args:
        config: the job's config.
        platform: an :class:`alignd.Platform` with the services the job needs.
        resume: continue the run in ``config.run_dir``.
        progress: show a progress bar (rate and ETA) on stderr.
    """

    kind = "job"
    model_kind = "causal_lm"

    def __init__(self, config: JobConfig, platform, *, resume: bool = False,
                 progress: bool = True) -> None:  # fmt: skip
        self.config = config
        self.platform = platform
        # Clients over the platform's channels with the deadlines this job's work needs.
        self.trainer = with_timeout(platform.trainer, config.trainer_timeout_s)
        self.run_dir = RunDirectory(config.run_dir, config, resume=resume)
        self.progress = progress
        self.timings: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)  # this step's counters, logged as is
        self.total_steps = 0
        self._rediscovering = threading.Lock()  # calls may run on several threads
        self._accounting = threading.Lock()  # guards timings and counts
        self._stopping = threading.Event()  # the run is ending: calls stop retrying
        self.stop_requested = False
        """Set by an evaluation (early stopping): this step is the run's last."""
        self.gold: dict | None = self.run_dir.state.get("gold")
        """The best gold evaluation so far (``gold_scorer``): score, proxy, step, evaluations
        since, checkpoint."""
        self._step = 0  # the step running now (0 while setting up)

    # ---- what subclasses provide -------------------------------------------------------

    def setup(self) -> None:
        """Loads the data; sets ``self.total_steps``."""
        raise NotImplementedError

    def prepare(self) -> None:
        """After the trainer holds the model: tokenize, precompute (nothing by default)."""

    def train_step(self, step: int) -> dict[str, float]:
        """Runs optimizer step ``step`` (1-based); returns its metrics."""
        raise NotImplementedError

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out metrics (``eval/...``); none by default."""
        return {}

    def after_checkpoint(self, step: int, path) -> None:
        """Called after each checkpoint (PPO pushes weights here, for instance)."""

    def finish(self) -> None:
        """Called once the run ends, finished or failed (stops background work)."""

    # ---- the driver ----------------------------------------------------------------------

    def run(self) -> Iterator[dict[str, Any]]:
        """Runs the job to its last step, yielding each logged row of metrics.

        Raises:
            JobFailed: a call to a service failed (after its retries); the run directory
                resumes from the last checkpoint.
        """
        try:
            yield from self._run_steps()
        except AligndError as err:
            raise JobFailed(self, self._step, err) from err

    def _run_steps(self) -> Iterator[dict[str, Any]]:
        self._step = 0
        self._stopping.clear()
        self.stop_requested = False
        with self.phase("setup"):
            self.setup()
            self.initialize_trainer()
            self.prepare()
        start = self.run_dir.step
        if start:
            self.call(self.trainer.load_checkpoint, self.run_dir.state["checkpoint"])
            log.info("%s: resumed at step %d of %d", self.kind, start, self.total_steps)
        bar = self._progress(start)
        try:
            for step in range(start + 1, self.total_steps + 1):
                self._step = step
                metrics = self.train_step(step)
                last = step == self.total_steps
                if last or (self.config.eval_every and step % self.config.eval_every == 0):
                    with self.phase("eval"):
                        metrics.update(self.evaluate(step))
                if self.stop_requested and not last:  # the evaluation says stop (early_stop)
                    metrics["early_stop"] = 1.0
                    last = True
                if last or (self.config.save_every and step % self.config.save_every == 0):
                    self.save(step, final=last)
                with self._accounting:  # the first step's row also carries the setup phases
                    metrics.update({f"time/{k}": v for k, v in self.timings.items()})
                    metrics.update(self.counts)
                    self.timings.clear()
                    self.counts.clear()
                row = self.run_dir.log(step, metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(_summary(metrics), refresh=False)
                yield row
                if last:
                    break
        finally:
            self._stopping.set()
            self.finish()
            if bar is not None:
                bar.close()
            self.run_dir.plot()
            self.run_dir.close()

    def run_to_end(self) -> list[dict[str, Any]]:
        """Runs the job and returns every row it logged."""
        return list(self.run())

    def initialize_trainer(self) -> None:
        """Loads the job's model into the trainer with the configured optimizer."""
        o = self.config.optim
        lora = None
        if o.lora is not None:
            from alignd.clients.trainer import LoraConfig

            lora = LoraConfig(o.lora.r, o.lora.alpha, o.lora.dropout, tuple(o.lora.target_modules))
        self.call(
            self.trainer.initialize, self.config.model, self.model_kind, lr=o.lr,
            betas=o.betas, weight_decay=o.weight_decay, schedule=o.schedule,
            warmup_steps=o.warmup_steps,
            total_steps=max(self.optimizer_steps(), o.warmup_steps + 1),
            max_grad_norm=o.max_grad_norm or None, seed=self.config.seed,
            gradient_checkpointing=o.gradient_checkpointing, lora=lora, packing=o.packing,
            packing_max_tokens=o.packing_max_tokens,
        )  # fmt: skip

    def save(self, step: int, final: bool = False) -> None:
        """Checkpoints the trainer, then records the step in state.json (in that order, so a
        crash mid-save leaves the previous checkpoint and state in force)."""
        path = self.run_dir.checkpoint("final" if final else step)
        with self.phase("checkpoint"):
            self.call(self.trainer.save_checkpoint, str(path.resolve()))
        gold = {"gold": self.gold} if self.gold is not None else {}
        self.run_dir.save_state(step=step, checkpoint=str(path.resolve()), done=final,
                                **gold, **self.extra_state())  # fmt: skip
        self.after_checkpoint(step, path)

    def optimizer_steps(self) -> int:
        """Optimizer steps the whole run takes (the schedule's length); one per step here."""
        return self.total_steps

    def extra_state(self) -> dict[str, Any]:
        """What else a resumed run needs (e.g. the adaptive KL coefficient)."""
        return {}

    def eval_seed(self, step: int) -> int:
        """The sampling seed of the evaluation after ``step`` (the same on a resumed run)."""
        return self.rng(-(step + 1_000_000)).randrange(2**31)

    def replica_versions(self) -> dict[str, int]:
        """The weights version each generation replica serves, by target (the replicas are
        looked up again on a retry, so one that went away is replaced by those there are)."""
        return self.call(
            lambda: {c.target: c.info().weights_version for c in self.generation_clients()}
        )

    def check_gold_scorer(self) -> None:
        """With ``gold_scorer``: the reward service must have that scorer (checked before the
        first step, not at the first evaluation).

        Raises:
            ConfigError: naming ``gold_scorer`` and the scorers there are.
        """
        wanted = self.config.gold_scorer
        if not wanted:
            return
        names = [s.name for s in self.call(self.service("reward").info).scorers]
        if wanted not in names:
            raise ConfigError(f"gold_scorer: the reward service has no scorer {wanted!r} "
                              f"(it has {', '.join(names)})")  # fmt: skip

    def track_gold(self, step: int, gold: float, proxy: float) -> None:
        """After an evaluation with a gold scorer: a new best gold (by ``early_stop.min_delta``)
        checkpoints the weights to ``checkpoints/best``; otherwise the evaluations since the
        best are counted, and with ``early_stop`` the run stops once ``patience`` of them
        passed while the ``proxy`` rose above its value at the best."""
        stop, best = self.config.early_stop, self.gold
        delta = stop.min_delta if stop is not None else 0.0
        if best is None or gold > best["gold"] + delta:
            path = self.run_dir.checkpoint("best")
            with self.phase("checkpoint"):
                self.call(self.trainer.save_checkpoint, str(path.resolve()))
            self.gold = {"gold": gold, "proxy": proxy, "step": step, "since": 0,
                         "checkpoint": str(path.resolve())}  # fmt: skip
            return
        best["since"] += 1
        if stop is not None and best["since"] >= stop.patience and proxy > best["proxy"]:
            log.info("%s: early stop at step %d: gold %.4f has not beaten %.4f (step %d) in %d "
                     "evaluations while the proxy rose from %.4f to %.4f", self.kind, step, gold,
                     best["gold"], best["step"], best["since"], best["proxy"], proxy)  # fmt: skip
            self.stop_requested = True

    # ---- helpers -------------------------------------------------------------------------

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Adds the block's wall time to this step's ``time/<name>``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add_time(name, time.perf_counter() - start)

    def add_time(self, name: str, seconds: float) -> None:
        """Adds ``seconds`` to this step's ``time/<name>`` (from any thread)."""
        with self._accounting:
            self.timings[name] += seconds

    def add_count(self, name: str, value: float) -> None:
        """Adds ``value`` to this step's counter ``name`` (from any thread)."""
        with self._accounting:
            self.counts[name] += value

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Calls ``fn``, retrying transient failures with exponential backoff for up to
        ``config.retry_seconds`` (a service being restarted comes back within that). Before
        each retry the platform looks its generation replicas up again (a replaced pod has a
        new address); ``fn`` that picks its client when called follows them."""
        deadline = time.monotonic() + self.config.retry_seconds
        delay = 0.5
        while True:
            try:
                return fn(*args, **kwargs)
            except TRANSIENT as err:
                if time.monotonic() + delay > deadline or self._stopping.is_set():
                    raise
                log.warning("%s failed (%s); retrying in %.1fs", _name(fn), err, delay)
                if self._stopping.wait(delay):
                    raise
                delay = min(delay * 2, 10.0)
                self.rediscover()

    def rediscover(self) -> bool:
        """Looks the platform's generation replicas up again; whether they changed."""
        rediscover = getattr(self.platform, "rediscover", None)
        if rediscover is None:
            return False
        with self._rediscovering:
            return bool(rediscover())

    def service(self, role: str):
        """The platform's client of ``role`` (generation, reward, reference) with the job's
        ``service_timeout_s``."""
        return with_timeout(getattr(self.platform, role), self.config.service_timeout_s)

    def generation_clients(self) -> list:
        """Every generation replica's client, with the job's ``service_timeout_s``."""
        timeout = self.config.service_timeout_s
        return [with_timeout(c, timeout) for c in self.platform.generation_clients()]

    def rng(self, step: int) -> random.Random:
        """The random generator of ``step`` (the same on a resumed run)."""
        return random.Random(self.config.seed * 1_000_003 + step)

    def _progress(self, start: int):
        if not self.progress:
            return None
        from tqdm import tqdm

        name = self.config.name or self.kind
        return tqdm(total=self.total_steps, initial=start, desc=name, unit="step",
                    dynamic_ncols=True, leave=True)  # fmt: skip


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))


def _summary(metrics: dict[str, float]) -> dict[str, str]:
    keys = [k for k in ("loss", "reward", "accuracy", "kl") if k in metrics]
    return {k: f"{metrics[k]:.3g}" for k in keys}
