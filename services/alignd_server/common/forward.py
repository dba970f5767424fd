"""Forward passes shared by serving and training: padding, sequence scores, token log-probs.

Per-token log-probabilities have one implementation, :func:`token_logprobs`; the reference
service's :func:`completion_logprobs` and the trainer's :func:`token_stats` both use it.

Every function takes right-padded batches: with causal attention, pad tokens after a sequence
cannot change its positions or its values, which makes results independent of what else is in
the batch (up to float rounding).

The trainer can instead pack a batch (:func:`pack_rows`): several rows laid end to end in one
sequence, their position ids restarting at each row and no attention mask, which transformers
reads as packed sequences (``find_packed_sequence_indices``: a block-diagonal causal mask for
its ``sdpa`` and ``eager`` attention, the variable-length kernel for flash attention). Then no
linear layer, and no LM head, computes anything for padding: :func:`packed_token_stats` and
:func:`packed_sequence_scores` give the same values as their padded counterparts.
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


def pools_last_token(model: torch.nn.Module) -> bool:
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
    if pools_last_token(model):
        hidden = model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        )[0]  # (B, T, H)
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
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,  # no KV cache to fill:
              "output_hidden_states": hidden, "use_cache": False}  # fmt: skip
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


@dataclass
class PackedBatch:
    """Rows laid end to end in ``n`` packed sequences of width ``W`` (:func:`pack_rows`).

    Row b occupies ``input_ids[bins[b], offsets[b] : offsets[b] + lengths[b]]``, with position
    ids 0 .. length - 1. The unused tail of a packed sequence holds pad tokens whose positions
    restart at 0 too, so it is a sequence of its own that no row attends to.
    """

    input_ids: torch.Tensor  # (n, W) int64
    position_ids: torch.Tensor  # (n, W) int64
    bins: torch.Tensor  # (B,) int64 packed sequence of each row
    offsets: torch.Tensor  # (B,) int64 where each row starts in it
    lengths: torch.Tensor  # (B,) int64 row lengths


def pack_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows (by index) grouped so that each group's lengths sum to at most ``capacity``, by
    first-fit decreasing; a row longer than ``capacity`` is a group of its own. Rows keep
    their order within a group. (transformers' ``DataCollatorWithFlattening`` only lays a
    whole batch in one sequence, which under dense attention costs the square of the batch's
    tokens; bounded groups keep that cost to the square of each group's.)"""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for k, free in enumerate(room):
            if lengths[i] <= free:
                bins[k].append(i)
                room[k] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


def pack_rows(
    rows: Sequence[np.ndarray], pad_id: int, capacity: int, device: str | torch.device = "cpu"
) -> PackedBatch:
    """Packs token rows into sequences of at most ``capacity`` tokens (:func:`pack_bins`;
    the width is the fullest packed sequence's)."""
    lengths = [len(r) for r in rows]
    groups = pack_bins(lengths, capacity)
    width = max(sum(lengths[i] for i in g) for g in groups)
    input_ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    position_ids = torch.empty((len(groups), width), dtype=torch.long)
    bins = torch.empty(len(rows), dtype=torch.long)
    offsets = torch.empty(len(rows), dtype=torch.long)
    for k, group in enumerate(groups):
        start = 0
        for i in group:
            n = lengths[i]
            input_ids[k, start : start + n] = torch.tensor(np.asarray(rows[i]), dtype=torch.long)
            position_ids[k, start : start + n] = torch.arange(n)
            bins[i], offsets[i] = k, start
            start += n
        position_ids[k, start:] = torch.arange(width - start)  # the tail: a sequence alone
    return PackedBatch(
        input_ids.to(device), position_ids.to(device), bins.to(device), offsets.to(device),
        torch.tensor(lengths, dtype=torch.long, device=device),
    )  # fmt: skip


def _packed_hidden(model: torch.nn.Module, packed: PackedBatch) -> torch.Tensor:
    """(n, W, H) last hidden state of the packed sequences (no attention mask: transformers
    finds the rows from the position ids, which it does only without a KV cache)."""
    return model.base_model(
        input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False
    )[0]


def packed_token_stats(
    model: torch.nn.Module,
    packed: PackedBatch,
    prompts: torch.Tensor,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    mean_logprobs: bool = False,
    hidden: bool = False,
) -> TokenStats:
    """:func:`token_stats` of a packed batch, in the same (B, K) layout.

    The decoder runs once over the packed sequences; the LM head (the model's output
    embeddings) then projects only the hidden states that predict a completion token — T of
    them, the batch's completion tokens, with no padding — and the (T,) statistics are laid
    out as (B, K) rows, zero past each row's completion.
    """
    device = packed.lengths.device
    counts = packed.lengths - prompts  # (B,) completion tokens per row
    width, total = int(counts.max()), int(counts.sum())
    row = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)  # (T,)
    column = torch.arange(total, device=device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts
    )  # (T,) index of each token within its row's completion
    where = packed.offsets[row] + prompts[row] - 1 + column  # (T,) predicting positions
    states = _packed_hidden(model, packed)[packed.bins[row], where]  # (T, H)
    logits = model.get_output_embeddings()(states)  # (T, V)
    targets = packed.input_ids[packed.bins[row], where + 1]
    flat = token_logprobs(
        logits[None], torch.arange(total, device=device)[None], targets[None],
        temperature=temperature, entropy=entropy, mean_logprobs=mean_logprobs,
    )  # fmt: skip

    def rows(values: torch.Tensor | None) -> torch.Tensor | None:
        """(T, ...) values as (B, K, ...) rows, zero in the padding (differentiable)."""
        if values is None:
            return None
        out = values.new_zeros((len(counts), width, *values.shape[1:]))
        return out.index_put((row, column), values)

    mask = torch.arange(width, device=device)[None, :] < counts[:, None]
    logprobs, entropies, means = (rows(v[0]) if v is not None else None for v in flat)
    return TokenStats(
        mask=mask.float(), logprobs=logprobs, entropy=entropies, mean_logprobs=means,
        hidden=rows(states) if hidden else None,
    )  # fmt: skip


def packed_sequence_scores(model: torch.nn.Module, packed: PackedBatch) -> torch.Tensor:
    """:func:`sequence_scores` of a packed batch: a decoder classifier's head on each row's
    last token. Encoder classifiers attend both ways and pool their own way; they are not
    packed (:func:`packable`)."""
    last = packed.offsets + packed.lengths - 1
    states = _packed_hidden(model, packed)[packed.bins, last]  # (B, H)
    return model.score(states)[:, 0].float()


LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                    "lm_head_multiplier", "dim_model_base")  # fmt: skip
"""Config fields of architectures whose causal-LM head does more to the logits than the
output embeddings (Gemma 2/3 soft-capping, Cohere and Granite scales, MiniCPM, Falcon-H1):
:func:`packed_token_stats` applies the output embeddings alone, so these are not packed."""


def packable(model: torch.nn.Module, classifier: bool) -> str | None:
    """Why ``model`` cannot be packed, or None: packing needs a causal decoder whose logits
    are its output embeddings of the last hidden state."""
    name = type(model).__name__
    if classifier:
        if not pools_last_token(model):
            return f"{name} is an encoder classifier (it attends both ways)"
        return None
    if model.get_output_embeddings() is None:
        return f"{name} has no output embeddings"
    for field in LOGIT_TRANSFORMS:
        if getattr(model.config, field, None) not in (None, 1, 1.0):
            return f"{name} transforms its logits ({field})"
    return None
