"""Prometheus metrics of the trainer service."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from alignd_server.common.batching import TIME_BUCKETS


class TrainerMetrics:
    """Step, loss, learning rate, gradient norm, tokens, per-rank memory, and checkpoint / push
    costs."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.step = Gauge("alignd_trainer_step", "Optimizer steps taken.", registry=registry)
        self.loss = Gauge(
            "alignd_trainer_loss", "Loss of the last ForwardBackward, by loss name.", ["loss"],
            registry=registry,
        )  # fmt: skip
        self.learning_rate = Gauge(
            "alignd_trainer_learning_rate", "Learning rate of the last step.", registry=registry
        )
        self.grad_norm = Gauge(
            "alignd_trainer_grad_norm", "Gradient L2 norm before clipping, last step.",
            registry=registry,
        )  # fmt: skip
        self.tokens = Counter(
            "alignd_trainer_tokens", "Tokens (or sequences) that counted in losses.",
            registry=registry,
        )  # fmt: skip
        self.world_size = Gauge(
            "alignd_trainer_world_size", "Data-parallel ranks.", registry=registry
        )
        self.parameter_bytes = Gauge(
            "alignd_trainer_parameter_bytes", "Bytes of parameters a rank holds (FSDP: its "
            "shards).", ["rank"], registry=registry,
        )  # fmt: skip
        self.optimizer_bytes = Gauge(
            "alignd_trainer_optimizer_bytes", "Bytes of optimizer state a rank holds.", ["rank"],
            registry=registry,
        )  # fmt: skip
        self.checkpoint_seconds = Histogram(
            "alignd_checkpoint_seconds", "Time to write a checkpoint.", buckets=TIME_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.push_seconds = Histogram(
            "alignd_weight_push_seconds", "Time to push weights to every target.",
            buckets=TIME_BUCKETS, registry=registry,
        )  # fmt: skip
        self.push_bytes = Counter(
            "alignd_weight_push_bytes", "Bytes of weights pushed (per target).", registry=registry
        )
