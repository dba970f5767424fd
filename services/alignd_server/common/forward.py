"""Forward passes shared by serving and training: padding, sequence scores, token log-probs.

Per-token log-probabilities have one implementation, :func:`token_logprobs`; the reference
service's :func:`completion_logprobs` and the trainer's :func:`token_stats` both use it.

Every function takes right-padded batches: with causal attention, pad tokens after a sequence
cannot change its positions or its values, which makes results independent of what else is in
the batch (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

LOGPROB_CHUNK = 256  # target tokens per log-softmax block: bounds the (B, chunk, V) temporaries


def pad_right(
    rows: Sequence[np.ndarray], pad_id: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stacks token rows into a right-padded batch.

    Returns:
        input_ids: (B, T) int64, T = longest row, padded with ``pad_id``.
        attention_mask: (B, T) int64, 1 on real tokens.
        lengths: (B,) int64 row lengths.
    """
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    width = int(lengths.max()) if len(rows) else 0
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(np.asarray(row), dtype=torch.long)  # a copy
    attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return input_ids.to(device), attention_mask.to(device), lengths.to(device)


def _pools_last_token(model: torch.nn.Module) -> bool:
    """Decoder classifiers (``LlamaForSequenceClassification`` and kin) score the last token."""
    return hasattr(model, "score") and not getattr(model.config, "is_encoder_decoder", False)


def sequence_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """One scalar per sequence from a one-label sequence classifier.

    Decoder classifiers are pooled at each row's last real token (position ``length - 1``),
    found from the lengths rather than from the pad id: transformers' own pooling skips
    trailing tokens equal to the pad id, which drops the final EOS of models whose pad is
    their EOS (SmolLM2). Encoder classifiers (BERT) pool their first token as usual.

    Args:
        input_ids: (B, T) right-padded token ids.
        attention_mask: (B, T) 1 on real tokens.
        lengths: (B,) real lengths.

    Returns:
        (B,) float32 raw head outputs.
    """
    if _pools_last_token(model):
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]  # (B,T,H)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]  # (B, H)
        return model.score(last)[:, 0].float()
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()


@dataclass
class TokenStats:
    """Per-completion-token statistics of a batch, each (B, K), K = longest completion,
    aligned with each row's completion and zero in the padding."""

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


def token_logprobs(
    logits: torch.Tensor,
    positions: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    mean_logprobs: bool = False,
    chunk: int = LOGPROB_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log softmax(logits / temperature) of each target token, computed in blocks of targets.

    Why blocks: a log-softmax over the whole batch makes several (B, K, V) float32 tensors at
    once (the upcast logits, their log-softmax, the entropy's products), gigabytes for a long
    completion and a 150k vocabulary. Here only one block of ``chunk`` targets, (B, chunk, V),
    is upcast and reduced at a time, to (B, chunk) results, so without gradients the memory
    beyond the logits grows with the completion tokens, not the vocabulary times the sequence.
    Each block is ordinary differentiable torch and the blocks' results are concatenated, so
    with gradients enabled autograd differentiates exactly the whole-batch formula (it keeps
    each block's float32 logits for the backward pass, as it kept the whole batch's).

    Args:
        logits: (B, L, V) logits, any float dtype.
        positions: (B, K) index along L of the logits that predict each target.
        targets: (B, K) the token ids.
        temperature: divides the logits.
        entropy: also the entropy of softmax(logits / temperature).
        mean_logprobs: also the vocabulary mean of log softmax(logits / temperature).
        chunk: targets per block.

    Returns:
        (B, K) float32 log-probabilities of the targets, and (B, K) entropy and mean
        log-probabilities, or ``None`` where not asked for.
    """
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]  # (B, 1)
    picked, entropies, means = [], [], []
    for s in range(0, targets.shape[1], chunk):
        block = logits[rows, positions[:, s : s + chunk]].float()  # (B, k, V)
        if temperature != 1.0:
            block = block / temperature
        norm = torch.logsumexp(block, dim=-1, keepdim=True)  # (B, k, 1)
        picked.append(block.gather(-1, targets[:, s : s + chunk, None])[..., 0] - norm[..., 0])
        if entropy or mean_logprobs:
            log_probs = block - norm  # (B, k, V)
            if entropy:
                entropies.append(-(log_probs.exp() * log_probs).sum(-1))  # (B, k)
            if mean_logprobs:
                means.append(log_probs.mean(-1))  # (B, k)
    return (
        torch.cat(picked, dim=1),
        torch.cat(entropies, dim=1) if entropy else None,
        torch.cat(means, dim=1) if mean_logprobs else None,
    )


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

    Only positions that predict completion tokens get logits (``logits_to_keep``), and
    :func:`token_logprobs` reduces them in blocks; gradients flow when they are enabled.

    Args:
        input_ids: (B, T) right-padded token ids.
        attention_mask: (B, T) 1 on real tokens.
        lengths: (B,) real lengths; prompts: (B,) prompt lengths, 1 <= p < length.
        temperature: log-probabilities are of softmax(logits / temperature).
        entropy, mean_logprobs, hidden: also compute these (see :class:`TokenStats`).
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
    targets = input_ids[rows, positions + 1]  # (B, K) the token each position predicts
    logprobs, entropies, means = token_logprobs(
        out.logits, positions - shift, targets, temperature=temperature, entropy=entropy,
        mean_logprobs=mean_logprobs,
    )  # fmt: skip
    mask = torch.arange(width, device=lengths.device)[None, :] < (lengths - prompts)[:, None]
    mask = mask.float()  # (B, K)
    return TokenStats(
        mask=mask,
        logprobs=logprobs * mask,
        entropy=None if entropies is None else entropies * mask,
        mean_logprobs=None if means is None else means * mask,
        hidden=out.hidden_states[-1][rows, positions] if hidden else None,
    )


def completion_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    lengths: torch.Tensor,
    prompt_lengths: torch.Tensor,
    temperature: float = 1.0,
) -> list[torch.Tensor]:
    """log softmax(logits / temperature) of each completion token given everything before it
    (:func:`token_stats`, one row per sequence).

    Args:
        input_ids: (B, T) right-padded token ids.
        attention_mask: (B, T) 1 on real tokens.
        lengths: (B,) real lengths.
        prompt_lengths: (B,) prompt lengths p, 1 <= p < length.

    Returns:
        B float32 tensors, row b of shape (length_b - p_b,): element j is
        log pi(x[p_b + j] | x[:p_b + j]).
    """
    stats = token_stats(
        model, input_ids, attention_mask, lengths, prompt_lengths, temperature=temperature
    )
    counts = (lengths - prompt_lengths).tolist()
    return [stats.logprobs[b, :n] for b, n in enumerate(counts)]
