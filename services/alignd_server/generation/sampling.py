"""Sampling parameters (validated) and token selection.

Log-probs are those of the *sampled* token under ``log_softmax(logits / T)``, computed before
top-k / top-p filtering (temperature 0, greedy, counts as T = 1): the behaviour policy's
log-probs that importance correction and PPO ratios need, and what the trainer and reference
service compute for the same temperature. A temperature is 0 (greedy) or in
[``MIN_TEMPERATURE``, ``MAX_TEMPERATURE``]: below 0.01, logits / T overflows.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from alignd.v1 import generation_pb2
from alignd_server.common.errors import InvalidArgument
from alignd_server.common.validation import MAX_TEMPERATURE, MIN_TEMPERATURE, in_range

MAX_N = 64
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_STOP_TOKENS = 64


@dataclass(frozen=True)
class Sampling:
    """Validated sampling parameters of one request."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sampling_from_proto(
    params: generation_pb2.SamplingParams, *, max_new_tokens: int, vocab_size: int
) -> Sampling:
    """Validates SamplingParams, naming the field and the limit of anything out of range."""

    def bad(field: str, message: str) -> InvalidArgument:
        return InvalidArgument(f"params.{field}", message)

    if not 1 <= params.max_new_tokens <= max_new_tokens:
        raise bad("max_new_tokens", f"{params.max_new_tokens} is outside [1, {max_new_tokens}]")
    temperature = params.temperature if params.HasField("temperature") else 1.0
    if temperature != 0:
        in_range(temperature, "params.temperature", MIN_TEMPERATURE, MAX_TEMPERATURE)
    top_p = params.top_p if params.HasField("top_p") else 1.0
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise bad("top_p", f"{top_p} is outside (0, 1]")
    if params.top_k < 0:
        raise bad("top_k", f"must be >= 0, got {params.top_k}")
    n = params.n or 1
    if not 1 <= n <= MAX_N:
        raise bad("n", f"{params.n} is outside [1, {MAX_N}]")
    if len(params.stop) > MAX_STOP_STRINGS:
        raise bad("stop", f"{len(params.stop)} stop strings, at most {MAX_STOP_STRINGS}")
    for i, stop in enumerate(params.stop):
        if not 1 <= len(stop) <= MAX_STOP_LENGTH:
            raise bad(f"stop[{i}]", f"must be 1 .. {MAX_STOP_LENGTH} characters")
    if len(params.stop_token_ids) > MAX_STOP_TOKENS:
        raise bad("stop_token_ids", f"{len(params.stop_token_ids)} ids, at most {MAX_STOP_TOKENS}")
    for i, token in enumerate(params.stop_token_ids):
        if not 0 <= token < vocab_size:
            raise bad(f"stop_token_ids[{i}]", f"{token} is outside [0, {vocab_size})")
    return Sampling(
        max_new_tokens=params.max_new_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=params.top_k,
        n=n,
        seed=params.seed if params.HasField("seed") else None,
        stop=tuple(params.stop),
        stop_token_ids=tuple(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        skip_special_tokens=(
            params.skip_special_tokens if params.HasField("skip_special_tokens") else True
        ),
    )


def row_generator(seed: int | None, prompt: int, sample: int, device: str) -> torch.Generator:
    """The RNG of one (prompt, sample) row: derived from the request seed and the row's
    position, so a seeded request samples the same whatever else shares its batch, and the n
    samples of a prompt differ."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        key = f"{seed}:{prompt}:{sample}".encode()
        generator.manual_seed(
            int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        )
    return generator


def choose(
    logits: torch.Tensor, sampling: Sampling, generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Picks the next token of each row.

    Args:
        logits: (B, V) float32 next-token logits.
        sampling: the request's parameters.
        generators: one RNG per row.

    Returns:
        tokens: (B,) int64 chosen ids.
        logprobs: (B,) float32 log softmax(logits / T)[token] (T = 1 when greedy).
    """
    scaled = logits if sampling.greedy else logits / sampling.temperature  # (B, V)
    if sampling.greedy:
        tokens = logits.argmax(dim=-1)
    else:
        filtered = _filter(scaled, sampling.top_k, sampling.top_p)  # (B, V), -inf outside
        probs = torch.softmax(filtered, dim=-1)
        tokens = torch.stack(
            [torch.multinomial(probs[b], 1, generator=g)[0] for b, g in enumerate(generators)]
        )
    picked = scaled.gather(-1, tokens[:, None])[:, 0]  # (B,)
    return tokens, picked - torch.logsumexp(scaled, dim=-1)


def _filter(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Masks (to -inf) tokens outside the top k and outside the top-p nucleus."""
    if top_k and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]  # (B, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        ordered, index = torch.sort(scaled, descending=True, dim=-1)  # (B, V)
        probs = torch.softmax(ordered, dim=-1)
        outside = probs.cumsum(-1) - probs > top_p  # the top token always stays
        scaled = scaled.scatter(-1, index, ordered.masked_fill(outside, float("-inf")))
    return scaled
