"""GRPO, RLOO and REINFORCE++ advantages on fixed scores, numbers from the formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignd.algorithms import (
    broadcast_to_tokens,
    group_mean_baseline,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)

SCORES = [1.0, 2.0, 3.0, 10.0, 10.0, 10.0]  # two prompts, three samples each


def test_grpo_divides_by_the_group_std():
    # group 1: mean 2, unbiased std 1; group 2: all equal, so 0 whatever the std
    np.testing.assert_allclose(
        grpo_advantages(SCORES, 3), [-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4), 0.0, 0.0, 0.0]
    )


def test_grpo_scale_rewards_none_only_centers():
    np.testing.assert_allclose(
        grpo_advantages(SCORES, 3, scale_rewards="none"), [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    )


def test_grpo_scale_rewards_batch_divides_by_the_batch_std():
    # batch mean 6; squared deviations 25 + 16 + 9 + 16 + 16 + 16 = 98; unbiased var 98 / 5
    std = math.sqrt(98 / 5)
    np.testing.assert_allclose(
        grpo_advantages(SCORES, 3, scale_rewards="batch"),
        np.array([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (std + 1e-4),
    )


def test_rloo_compares_each_sample_with_the_mean_of_the_others():
    advantages = rloo_advantages([1.0, 2.0, 6.0, 0.0, 0.0, 3.0], 3)
    expected = [1 - (2 + 6) / 2, 2 - (1 + 6) / 2, 6 - (1 + 2) / 2, 0 - 1.5, 0 - 1.5, 3 - 0]
    np.testing.assert_allclose(advantages, expected)


def test_rloo_normalize_whitens_over_the_batch():
    advantages = rloo_advantages([1.0, 2.0, 6.0], 3, normalize=True)
    # raw [-3, -1.5, 4.5]: mean 0, unbiased var (9 + 2.25 + 20.25) / 2
    np.testing.assert_allclose(advantages, np.array([-3, -1.5, 4.5]) / (math.sqrt(15.75) + 1e-4))


def test_group_mean_baseline_centers_each_group():
    np.testing.assert_allclose(
        group_mean_baseline([1.0, 2.0, 6.0, 4.0, 4.0, 1.0], 3), [-2.0, -1.0, 3.0, 1.0, 1.0, -2.0]
    )


def test_reinforce_pp_whitens_returns_over_every_token_of_the_batch():
    rewards = [[0.0, 1.0], [2.0, np.nan]]
    mask = [[1, 1], [1, 0]]
    # returns (gamma 1): [[1, 1], [2]]; mean 4/3, biased variance (1/9 + 1/9 + 4/9) / 3 = 2/9
    std = math.sqrt(2 / 9)
    expected = [[(1 - 4 / 3) / std, (1 - 4 / 3) / std], [(2 - 4 / 3) / std, 0.0]]
    np.testing.assert_allclose(reinforce_pp_advantages(rewards, mask, eps=0.0), expected)


def test_reinforce_pp_discounts_future_rewards():
    rewards = [[0.0, 1.0], [0.0, 0.0]]
    # returns (gamma 0.5): [[0.5, 1], [0, 0]]: mean 0.375, biased var
    returns = np.array([[0.5, 1.0], [0.0, 0.0]])
    expected = (returns - returns.mean()) / returns.std()
    np.testing.assert_allclose(
        reinforce_pp_advantages(rewards, np.ones((2, 2)), 0.5, 0.0), expected
    )


def test_broadcast_to_tokens_fills_each_rows_counted_tokens():
    tokens = broadcast_to_tokens([1.5, -2.0], [[1, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(tokens, [[1.5, 1.5, 0.0], [-2.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: grpo_advantages([1.0, 2.0], 1), "group_size must be an integer >= 2, got 1"),
        (lambda: grpo_advantages([1.0, 2.0, 3.0], 2), "got 3 scores, not a positive multiple"),
        (lambda: rloo_advantages([], 2), "got 0 scores"),
        (lambda: rloo_advantages([1.0, np.nan], 2), "scores must be finite"),
        (lambda: grpo_advantages([1.0, 2.0], 2, scale_rewards="std"), "scale_rewards must be"),
        (lambda: grpo_advantages([[1.0, 2.0]], 2), r"scores must be 1-D"),
        (lambda: group_mean_baseline([1.0, 2.0], 2.0), "group_size must be an integer"),
    ],
)
def test_invalid_groups_are_explained(call, message):
    with pytest.raises(ValueError, match=message):
        call()
