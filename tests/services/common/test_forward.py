"""Per-token log-probabilities in blocks equal the whole-batch formulas, values and gradients."""

from __future__ import annotations

import pytest
import torch

from alignd_server.common.forward import completion_index, token_logprobs

LENGTHS = torch.tensor([7, 5, 6])
PROMPTS = torch.tensor([2, 3, 1])  # completions of 5, 2 and 5 tokens


def whole_batch(logits, positions, targets, temperature):
    """The formulas on the full (B, K, V) tensor at once."""
    rows = torch.arange(logits.shape[0])[:, None]
    log_probs = torch.log_softmax(logits[rows, positions].float() / temperature, dim=-1)
    picked = log_probs.gather(-1, targets[..., None])[..., 0]  # (B, K)
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # (B, K)
    return picked, entropy, log_probs.mean(-1)


def test_completion_index_points_at_the_positions_before_each_completion_token() -> None:
    positions, width = completion_index(LENGTHS, PROMPTS)
    assert width == 5
    # row 1 has 2 completion tokens, at 3 and 4, predicted from 2 and 3; the rest is clamped
    assert positions.tolist() == [[1, 2, 3, 4, 5], [2, 3, 4, 5, 5], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("chunk", [1, 2, 3, 256])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_blocks_give_the_whole_batch_values_and_gradients(chunk, temperature) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11, requires_grad=True)  # (B, L, V)
    positions, _ = completion_index(LENGTHS, PROMPTS)  # (B, K), into L
    targets = torch.randint(0, 11, positions.shape)  # (B, K)
    weights = torch.randn(3, *positions.shape)  # a different weight on each statistic

    got = token_logprobs(
        logits, positions, targets, temperature=temperature, entropy=True, mean_logprobs=True,
        chunk=chunk,
    )  # fmt: skip
    want = whole_batch(logits, positions, targets, temperature)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)

    def gradient(stats) -> torch.Tensor:
        total = sum((w * s).sum() for w, s in zip(weights, stats, strict=True))
        return torch.autograd.grad(total, logits)[0]

    torch.testing.assert_close(gradient(got), gradient(want), rtol=0, atol=1e-6)


def test_only_the_asked_statistics_are_returned() -> None:
    logits = torch.randn(3, 6, 11)
    positions, _ = completion_index(LENGTHS, PROMPTS)
    logprobs, entropy, mean = token_logprobs(logits, positions, torch.zeros_like(positions))
    assert logprobs.shape == positions.shape and logprobs.dtype == torch.float32
    assert entropy is None and mean is None


def test_half_precision_logits_are_reduced_in_float32() -> None:
    logits = torch.randn(3, 6, 11)
    positions, _ = completion_index(LENGTHS, PROMPTS)
    targets = torch.randint(0, 11, positions.shape)
    got, _, _ = token_logprobs(logits.bfloat16(), positions, targets, chunk=2)
    want, _, _ = whole_batch(logits.bfloat16(), positions, targets, 1.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
