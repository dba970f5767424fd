"""Training-time forward passes: per-token statistics at completion positions, padded.

Everything is computed with gradients (when enabled) on right-padded batches, only at the
positions that predict completion tokens (``logits_to_keep``), and returned as (B, K) tensors
aligned with each row's completion, zero-padded, with the mask that marks real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenStats:
    """Per-completion-token statistics of a batch, each (B, K), K = longest completion."""

    mask: torch.Tensor  # (B, K) float, 1 on completion tokens
    logprobs: torch.Tensor  # (B, K) log softmax(logits / T)[token]
    entropy: torch.Tensor | None  # (B, K) entropy of softmax(logits / T)
    mean_logprobs: torch.Tensor | None  # (B, K) mean over the vocabulary of log softmax
    hidden: torch.Tensor | None  # (B, K, H) last hidden state at the predicting positions


def completion_index(lengths: torch.Tensor, prompts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, K) positions predicting each completion token (clamped in padding), and K."""
    width = int((lengths - prompts).max())
    offsets = torch.arange(width, device=lengths.device)[None, :]  # (1, K)
    positions = prompts[:, None] - 1 + offsets  # (B, K)
    return positions.clamp(max=int(lengths.max()) - 2), width


def token_stats(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    lengths: torch.Tensor,
    prompts: torch.Tensor,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    mean_logprobs: bool = False,
    hidden: bool = False,
) -> TokenStats:
    """Statistics of each completion token under the causal LM ``model``.

    Args:
        input_ids: (B, T) right-padded token ids.
        attention_mask: (B, T) 1 on real tokens.
        lengths: (B,) real lengths; prompts: (B,) prompt lengths, 1 <= p < length.
    """
    positions, width = completion_index(lengths, prompts)  # (B, K)
    first = int(prompts.min()) - 1  # the earliest position that predicts a completion token
    keep = torch.arange(first, int(lengths.max()) - 1, device=input_ids.device)  # (K',)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "output_hidden_states": hidden}  # fmt: skip
    try:
        out, shift = model(**inputs, logits_to_keep=keep), first  # logits (B, K', V)
    except TypeError:  # models without logits_to_keep: logits everywhere
        out, shift = model(**inputs), 0
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None]  # (B, 1)
    logits = out.logits[rows, positions - shift].float()  # (B, K, V)
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[rows, (positions + 1).clamp(max=input_ids.shape[1] - 1)]  # (B, K)
    log_probs = torch.log_softmax(logits, dim=-1)  # (B, K, V)
    mask = torch.arange(width, device=lengths.device)[None, :] < (lengths - prompts)[:, None]
    stats = TokenStats(
        mask=mask.float(),
        logprobs=log_probs.gather(-1, targets[..., None])[..., 0] * mask,
        entropy=None,
        mean_logprobs=None,
        hidden=out.hidden_states[-1][rows, positions] if hidden else None,
    )
    if entropy:
        stats.entropy = -(log_probs.exp() * log_probs).sum(-1) * mask
    if mean_logprobs:
        stats.mean_logprobs = log_probs.mean(-1) * mask
    return stats
