"""Prometheus metrics of the generation service."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from alignd_server.common.batching import SIZE_BUCKETS, TIME_BUCKETS


class GenerationMetrics:
    """Tokens, batch sizes, time to first token, weights version and weight-update costs."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.generated_tokens = Counter(
            "alignd_generated_tokens", "Tokens generated.", registry=registry
        )
        self.prompt_tokens = Counter(
            "alignd_prompt_tokens", "Prompt tokens read.", registry=registry
        )
        self.batch_size = Histogram(
            "alignd_generation_batch_size", "Rows (prompts x n) per generation batch.",
            buckets=SIZE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.first_token = Histogram(
            "alignd_time_to_first_token_seconds", "Time from request to its first token.",
            buckets=TIME_BUCKETS, registry=registry,
        )  # fmt: skip
        self.tokens_per_second = Gauge(
            "alignd_generation_tokens_per_second", "Tokens/s of the last generation batch.",
            registry=registry,
        )  # fmt: skip
        self.weights_version = Gauge(
            "alignd_weights_version", "Version of the serving weights.", registry=registry
        )
        self.update_seconds = Histogram(
            "alignd_weight_update_seconds", "Time from the first update message to the swap.",
            buckets=TIME_BUCKETS, registry=registry,
        )  # fmt: skip
        self.update_bytes = Counter(
            "alignd_weight_update_bytes", "Bytes of applied weight updates.", registry=registry
        )
