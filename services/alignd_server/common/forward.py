"""Forward passes shared by serving and training: padding, sequence scores, token log-probs.

Every function takes right-padded batches: with causal attention, pad tokens after a sequence
cannot change its positions or its values, which makes results independent of what else is in
the batch (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

LOGPROB_CHUNK = 256  # positions per log-softmax block, bounds the (B, chunk, V) temporaries


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


def completion_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    lengths: torch.Tensor,
    prompt_lengths: torch.Tensor,
    temperature: float = 1.0,
) -> list[torch.Tensor]:
    """log softmax(logits / temperature) of each completion token given everything before it.

    Only positions that predict completion tokens get logits (``logits_to_keep``), and the
    log-softmax runs in blocks, so memory grows with completion tokens, not the vocabulary
    times the whole sequence.

    Args:
        input_ids: (B, T) right-padded token ids.
        attention_mask: (B, T) 1 on real tokens.
        lengths: (B,) real lengths.
        prompt_lengths: (B,) prompt lengths p, 1 <= p < length.

    Returns:
        B float32 tensors, row b of shape (length_b - p_b,): element j is
        log pi(x[p_b + j] | x[:p_b + j]).
    """
    first = int(prompt_lengths.min()) - 1  # position predicting the earliest completion token
    last = int(lengths.max()) - 1  # one past the last predicting position
    keep = torch.arange(first, last, device=input_ids.device)
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep)
        logits = logits.logits  # (B, K, V), K = last - first
    except TypeError:  # models without logits_to_keep
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, first:last]
    targets = input_ids[:, first + 1 : last + 1]  # (B, K) the token each position predicts
    logprobs = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)  # (B, K)
    for s in range(0, targets.shape[1], LOGPROB_CHUNK):
        block = logits[:, s : s + LOGPROB_CHUNK].float()  # (B, k, V)
        if temperature != 1.0:
            block = block / temperature
        picked = block.gather(-1, targets[:, s : s + LOGPROB_CHUNK, None])[..., 0]  # (B, k)
        logprobs[:, s : s + LOGPROB_CHUNK] = picked - torch.logsumexp(block, dim=-1)
    return [
        logprobs[b, int(prompt_lengths[b]) - 1 - first : int(lengths[b]) - 1 - first]
        for b in range(input_ids.shape[0])
    ]
