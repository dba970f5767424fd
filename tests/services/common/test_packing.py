"""Packed rows (padding-free) give the padded batch's statistics, values and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from alignd_server.common.forward import (
    pack_bins,
    pack_rows,
    packable,
    packed_sequence_scores,
    packed_token_stats,
    pad_right,
    sequence_scores,
    token_stats,
)

ROWS = [np.arange(3, 12), np.arange(20, 25), np.arange(40, 52), np.arange(60, 63),
        np.arange(70, 77)]  # fmt: skip
PROMPTS = torch.tensor([3, 2, 5, 1, 4])
PAD = 0


def llama(**extra) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, **extra,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def test_first_fit_decreasing_fills_each_packed_sequence_up_to_the_capacity() -> None:
    # lengths 9, 5, 12, 3, 7 with room for 12: 12 alone, then 9 + 3, then 7 + 5
    assert pack_bins([9, 5, 12, 3, 7], 12) == [[2], [0, 3], [1, 4]]
    assert pack_bins([9, 5, 12, 3, 7], 36) == [[0, 1, 2, 3, 4]]
    assert pack_bins([9, 5], 4) == [[0], [1]]  # longer than the capacity: one each


def test_packed_rows_restart_their_positions_and_keep_their_tokens() -> None:
    packed = pack_rows(ROWS, PAD, 12)
    assert packed.input_ids.shape == (3, 12)
    assert packed.bins.tolist() == [1, 2, 0, 1, 2]
    assert packed.offsets.tolist() == [0, 0, 0, 9, 5]  # rows keep their order in a sequence
    for row, k, start in zip(ROWS, packed.bins, packed.offsets, strict=True):
        span = slice(int(start), int(start) + len(row))
        assert packed.input_ids[k, span].tolist() == row.tolist()
        assert packed.position_ids[k, span].tolist() == list(range(len(row)))
    # 5 + 7 and 9 + 3 fill their sequences: this packing has no padding at all
    assert packed.position_ids[0].tolist() == list(range(12))


@pytest.mark.parametrize("capacity", [12, 16, 36])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_token_stats_equal_the_padded_ones_values_and_gradients(capacity, temperature):
    model = llama()
    ids, mask, lengths = pad_right(ROWS, PAD)
    padded = token_stats(model, ids, mask, lengths, PROMPTS, temperature=temperature,
                         entropy=True, mean_logprobs=True, hidden=True)  # fmt: skip
    packed = packed_token_stats(model, pack_rows(ROWS, PAD, capacity), PROMPTS,
                                temperature=temperature, entropy=True, mean_logprobs=True,
                                hidden=True)  # fmt: skip
    torch.testing.assert_close(packed.mask, padded.mask, rtol=0, atol=0)
    for name in ("logprobs", "entropy", "mean_logprobs"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name),
                                   rtol=0, atol=1e-5)  # fmt: skip
    real = padded.mask.bool()  # the hidden states are compared where they are read
    torch.testing.assert_close(packed.hidden[real], padded.hidden[real], rtol=0, atol=1e-5)

    weights = torch.randn(padded.logprobs.shape, generator=torch.Generator().manual_seed(1))

    def gradients(stats) -> list[torch.Tensor]:
        total = (weights * (stats.logprobs + 0.1 * stats.entropy)).sum()
        return torch.autograd.grad(total, list(model.parameters()))

    for got, want in zip(gradients(packed), gradients(padded), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_decoder_classifier_scores_packed_rows_as_padded_ones() -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, num_labels=1,
    )  # fmt: skip
    model = transformers.LlamaForSequenceClassification(config).eval()
    assert packable(model, classifier=True) is None
    padded = sequence_scores(model, *pad_right(ROWS, PAD))
    packed = packed_sequence_scores(model, pack_rows(ROWS, PAD, 16))
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)


def test_models_packing_cannot_reproduce_are_named() -> None:
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=1))  # fmt: skip
    assert "encoder classifier" in packable(bert, classifier=True)
    gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8))  # fmt: skip
    assert "final_logit_softcapping" in packable(gemma, classifier=False)
    assert packable(llama(), classifier=False) is None


def test_the_trainer_packs_by_the_estimated_work_or_as_told(tiny_models) -> None:
    """The capacity per batch minimises n · W · (1 + W / span) over the candidates; with a
    variable-length kernel every row goes together; ``packing_tokens`` (at least the longest
    row) when set."""
    from alignd_server.trainer.engine import InitSpec, TrainerEngine

    # Candidates 10, 14, 20, 25: [10] [6 3] [6] (3 × 10), [10 3] [6 6] (2 × 13),
    # [10 6 3] [6] (2 × 19), all (1 × 25).
    lengths = [10, 6, 6, 3]
    engine = TrainerEngine(InitSpec(path=str(tiny_models.causal_lm), kind="causal_lm",
                                    packing=True))  # fmt: skip
    assert engine.attention_span > 1
    for span, capacity in ((1e9, 25), (1e-9, 10), (50.0, 14)):
        # span 50: 30 · 1.2 = 36, 26 · 1.26 = 32.8, 38 · 1.38 = 52.4, 25 · 1.5 = 37.5
        engine.attention_span = span
        assert engine.capacity(lengths) == capacity, span
    engine.varlen = True
    assert engine.capacity(lengths) == 25
    for tokens, capacity in ((4, 10), (20, 20)):
        engine.spec.packing_tokens = tokens
        assert engine.capacity(lengths) == capacity
