"""Settings of the generation service (env prefix ``ALIGND_``)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field

from alignd_server.common.config import StorageServerSettings


class GenerationSettings(StorageServerSettings):
    """Generation service settings."""

    port: int = Field(50051, ge=0, le=65535)
    """gRPC port; 0 picks a free port."""
    metrics_port: int = Field(9091, ge=-1, le=65535)
    """Prometheus port; 0 picks a free port, -1 disables it."""
    engine: Literal["hf", "vllm"] = "hf"
    """Generation engine: ``hf`` (transformers generate, embedded default) or ``vllm``."""
    max_new_tokens: int = Field(1024, ge=1)
    """Most tokens generated per completion."""
    max_queue_size: int = Field(1024, ge=1)
    """Most rows (prompts x n) waiting for or in generation before new requests get
    RESOURCE_EXHAUSTED (refused before their prompts are tokenized)."""
    max_request_tokens: int = Field(65536, ge=1)
    """Most tokens one Generate request may hold in the KV cache: the sum over its rows
    (prompts x n) of prompt tokens + max_new_tokens."""
    update_idle_timeout_s: float = Field(60.0, gt=0)
    """An UpdateWeights stream that sends nothing for this long is dropped (the update lock is
    released; the serving weights are unchanged)."""
    update_timeout_s: float = Field(3600.0, gt=0)
    """Most seconds one UpdateWeights stream may take from its first message to its commit."""


def vllm_environment() -> None:
    """Environment vLLM reads, set before it is imported, keeping what the user already set.

    The engine core runs in this process (weight reloads pass tensors, not files), and the CPU
    build gets a 2 GiB KV cache unless told otherwise.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
