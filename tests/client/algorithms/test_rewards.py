"""PPO reward shaping: missing-EOS penalty, clipping, running normalisation, KL-shaped rewards."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignd.algorithms import (
    RunningMoments,
    clip_scores,
    penalize_missing_eos,
    token_rewards,
    whiten_rewards,
)


def test_missing_eos_penalty_subtracts_like_trl():
    scores = penalize_missing_eos([1.0, 2.0, -0.5], [True, False, False], penalty=1.0)
    np.testing.assert_allclose(scores, [1.0, 1.0, -1.5])


def test_missing_eos_penalty_can_replace_the_score():
    scores = penalize_missing_eos([1.0, 2.0, -0.5], [1, 0, 0], penalty=-1.0, mode="replace")
    np.testing.assert_allclose(scores, [1.0, -1.0, -1.0])


def test_clip_scores_symmetric_or_range():
    np.testing.assert_allclose(clip_scores([-3.0, 0.5, 7.0], 2.0), [-2.0, 0.5, 2.0])
    np.testing.assert_allclose(clip_scores([-3.0, 0.5, 7.0], (-1.0, 5.0)), [-1.0, 0.5, 5.0])


def test_running_moments_equal_those_of_all_scores_seen():
    moments = RunningMoments()
    assert moments.update([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))  # batch mean, std
    batch_mean, batch_std = moments.update([4.0, 5.0])
    assert (batch_mean, batch_std) == pytest.approx((4.5, math.sqrt(0.5)))
    # 1..5: mean 3, population variance 2, unbiased std sqrt(10 / 4)
    assert (moments.mean, moments.var, moments.count) == pytest.approx((3.0, 2.0, 5))
    assert moments.std == pytest.approx(math.sqrt(2.5))


def test_running_moments_normalize_with_and_without_the_mean():
    np.testing.assert_allclose(
        RunningMoments().normalize([1.0, 3.0]),  # mean 2, std sqrt 2
        [-1 / math.sqrt(2), 1 / math.sqrt(2)],
    )
    np.testing.assert_allclose(
        RunningMoments().normalize([1.0, 3.0], shift_mean=False),
        [1 / math.sqrt(2), 3 / math.sqrt(2)],
    )


def test_token_rewards_penalise_kl_and_put_the_score_on_the_last_token():
    kl = [[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]]
    mask = [[1, 1, 1], [1, 1, 0]]
    rewards = token_rewards([1.0, -2.0], kl, mask, kl_coef=0.5)
    np.testing.assert_allclose(rewards, [[-0.05, -0.1, -0.15 + 1.0], [-0.2, -0.25 - 2.0, 0.0]])


def test_whiten_rewards_keeps_the_mean_like_trl():
    # counted 1, 3, 5: mean 3, unbiased std 2 -> (x - 3) / 2 + 3
    rewards = whiten_rewards([[1.0, 3.0], [5.0, 7.0]], [[1, 1], [1, 0]])
    np.testing.assert_allclose(rewards, [[2.0, 3.0], [4.0, 0.0]], rtol=1e-7)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: token_rewards([1.0, 1.0], [[0.1], [0.2]], [[1], [0]], 0.1), r"rows \[1\]"),
        (lambda: token_rewards([1.0], [[0.1], [0.2]], [[1], [1]], 0.1), r"scores has shape \(1,\)"),
        (lambda: token_rewards([1.0], [[0.1]], [[1]], -0.1), "kl_coef must be >= 0"),
        (lambda: token_rewards([np.nan], [[0.1]], [[1]], 0.1), "scores must be finite"),
        (lambda: penalize_missing_eos([1.0], [True], 1.0, mode="zero"), "mode must be"),
        (lambda: penalize_missing_eos([1.0], [True, False], 1.0), "ended_with_eos has shape"),
        (lambda: clip_scores([1.0], (2.0, 1.0)), "low <= high"),
    ],
)
def test_invalid_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
