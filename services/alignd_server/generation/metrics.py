"""Prometheus metrics of the generation service."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from alignd_server.common.batching import SIZE_BUCKETS, TIME_BUCKETS

ABORT_REASONS = ("cancelled", "deadline", "shutdown", "restart")
"""Why a request left the engine before its end: its caller cancelled, its deadline passed,
the server stopped, or a weight swap under ``swap_policy: restart`` took it out (it runs
again)."""


class GenerationMetrics:
    """Tokens, request and step sizes, latencies, engine load, weights version and weight-update
    costs. Engines record per-step figures; the servicer the rest."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.generated_tokens = Counter(
            "alignd_generated_tokens", "Tokens generated.", registry=registry
        )
        self.prompt_tokens = Counter(
            "alignd_prompt_tokens", "Prompt tokens read.", registry=registry
        )
        self.batch_size = Histogram(
            "alignd_generation_batch_size", "Rows (prompts x n) per generation request.",
            buckets=SIZE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.first_token = Histogram(
            "alignd_time_to_first_token_seconds",
            "Time from a request entering the engine to its first token.",
            buckets=TIME_BUCKETS, registry=registry,
        )  # fmt: skip
        self.inter_token = Histogram(
            "alignd_inter_token_latency_seconds",
            "Time between consecutive tokens of a request (per engine step it takes part in).",
            buckets=TIME_BUCKETS, registry=registry,
        )  # fmt: skip
        self.step_rows = Histogram(
            "alignd_generation_batch_occupancy",
            "Rows (prompts x n) decoded together per engine step.",
            buckets=SIZE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.running = Gauge(
            "alignd_generation_running_requests", "Requests inside the engine, being decoded.",
            registry=registry,
        )  # fmt: skip
        self.waiting = Gauge(
            "alignd_generation_waiting_requests",
            "Requests accepted and waiting: for the engine's capacity or behind a weight swap.",
            registry=registry,
        )  # fmt: skip
        self.aborted = Counter(
            "alignd_generation_aborted_requests", "Requests taken out of the engine, by reason.",
            ["reason"], registry=registry,
        )  # fmt: skip
        for reason in ABORT_REASONS:
            self.aborted.labels(reason)
        self.tokens_per_second = Gauge(
            "alignd_generation_tokens_per_second", "Tokens/s of the last finished request.",
            registry=registry,
        )  # fmt: skip
        self.swap_wait = Histogram(
            "alignd_weight_swap_wait_seconds",
            "Time a weight swap waited for running requests (or, restart, for their removal).",
            buckets=TIME_BUCKETS, registry=registry,
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
