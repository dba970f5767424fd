"""Settings of the generation service (env prefix ``ALIGND_``)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, model_validator

from alignd_server.common.config import StorageServerSettings

#: Settings only the vllm engine reads; given to the hf engine, they are refused.
VLLM_ONLY = (
    "gpu_memory_utilization",
    "tensor_parallel_size",
    "max_num_batched_tokens",
    "enable_prefix_caching",
)
#: Settings only the hf engine reads.
HF_ONLY = ("max_running_tokens",)


class GenerationSettings(StorageServerSettings):
    """Generation service settings."""

    port: int = Field(50051, ge=0, le=65535)
    """gRPC port; 0 picks a free port."""
    metrics_port: int = Field(9091, ge=-1, le=65535)
    """Prometheus port; 0 picks a free port, -1 disables it."""
    engine: Literal["hf", "vllm"] = "hf"
    """Generation engine: ``hf`` (transformers with a continuous-batching scheduler, the
    embedded default) or ``vllm`` (vLLM's ``AsyncLLM``)."""
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
    swap_policy: Literal["wait", "restart"] = "wait"
    """How a weight swap meets running requests: ``wait`` (new requests wait while the running
    ones finish on the old weights, then the swap) or ``restart`` (running requests that have
    streamed nothing are taken out, the weights swapped, and they run again from their start
    on the new ones; streams already streaming are waited for). Either way every completion's
    tokens come from the one version it reports."""
    max_num_seqs: int = Field(256, ge=1, le=65536)
    """Most rows (prompts x n) decoded together in one engine step; more wait. A request with
    more rows than this runs when it is alone (hf), or in parts of this size (vllm)."""
    max_running_tokens: int = Field(262144, ge=1)
    """hf engine: most KV-cache tokens (prompt + max_new_tokens per row) of the running batch;
    a request that would exceed it waits (one alone always runs)."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """vllm engine, GPU: fraction of the GPU's memory vLLM may use (weights, activations, KV
    cache)."""
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    """vllm engine, GPU: GPUs one replica shards the model over (tensor parallel)."""
    max_num_batched_tokens: int | None = Field(None, ge=1)
    """vllm engine: most tokens (prefill + decode) scheduled in one engine step; unset = vLLM's
    default for the model."""
    enable_prefix_caching: bool = True
    """vllm engine: reuse the KV cache of shared prompt prefixes (reset on every weight swap)."""

    @model_validator(mode="after")
    def _engine_settings(self) -> GenerationSettings:
        other = VLLM_ONLY if self.engine == "hf" else HF_ONLY
        given = sorted(set(other) & self.model_fields_set)
        if given:
            raise ValueError(
                f"{given[0]} is a setting of the {'vllm' if self.engine == 'hf' else 'hf'} "
                f"engine; this server runs engine {self.engine!r}"
            )
        return self


def vllm_environment() -> None:
    """Environment vLLM reads, set before it is imported, keeping what the user already set.

    The engine core runs in this process (weight reloads pass tensors, not files), and the CPU
    build gets a 2 GiB KV cache unless told otherwise.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
