"""GAE and discounted returns over right-padded rows, numbers from the recursions."""

from __future__ import annotations

import numpy as np
import pytest

from alignd.algorithms import discounted_returns, gae, pad_right, whiten_advantages

NAN = np.nan


def test_gae_follows_the_recursion_and_stops_at_each_rows_end():
    rewards = [[0.0, 0.0, 1.0], [2.0, NAN, NAN]]
    values = [[0.5, 0.6, 0.7], [1.0, NAN, NAN]]
    mask = [[1, 1, 1], [1, 0, 0]]
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: delta_2 = 1 - 0.7 = 0.3; delta_1 = 0.9 * 0.7 - 0.6 = 0.03; delta_0 = 0.9 * 0.6 - 0.5
    a2 = 0.3
    a1 = 0.03 + 0.9 * 0.8 * a2
    a0 = 0.04 + 0.9 * 0.8 * a1
    # row 1: one token, delta_0 = 2 + 0.9 * 0 - 1 = 1
    np.testing.assert_allclose(advantages, [[a0, a1, a2], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(returns, [[a0 + 0.5, a1 + 0.6, a2 + 0.7], [2.0, 0.0, 0.0]])


def test_gae_with_lambda_one_is_monte_carlo_and_with_lambda_zero_is_td():
    rewards, values, mask = [[0.0, 0.0, 1.0]], [[0.5, 0.6, 0.7]], [[1, 1, 1]]
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(advantages, [[1 - 0.5, 1 - 0.6, 1 - 0.7]])
    np.testing.assert_allclose(returns, [[1.0, 1.0, 1.0]])
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=0.0)
    np.testing.assert_allclose(advantages, [[0.6 - 0.5, 0.7 - 0.6, 1.0 - 0.7]])


def test_gae_of_a_padded_batch_equals_gae_of_each_row_alone():
    rng = np.random.default_rng(0)
    lengths = [5, 2, 7, 1]
    rows_r = [rng.normal(size=n) for n in lengths]
    rows_v = [rng.normal(size=n) for n in lengths]
    rewards, mask = pad_right(rows_r, value=NAN)
    values, _ = pad_right(rows_v, value=NAN)
    advantages, returns = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    for i, n in enumerate(lengths):
        alone, alone_returns = gae([rows_r[i]], [rows_v[i]], np.ones((1, n)), 0.99, 0.95)
        np.testing.assert_allclose(advantages[i, :n], alone[0])
        np.testing.assert_allclose(returns[i, :n], alone_returns[0])
        assert (advantages[i, n:] == 0).all() and (returns[i, n:] == 0).all()


def test_discounted_returns_sum_future_rewards():
    returns = discounted_returns([[1.0, 2.0, 3.0], [4.0, NAN, NAN]], [[1, 1, 1], [1, 0, 0]], 0.5)
    np.testing.assert_allclose(returns, [[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0], [4.0, 0, 0]])


def test_whiten_advantages_centers_and_scales_over_the_batch():
    # counted 1, 2, 3, 6: mean 3, unbiased variance (4 + 1 + 0 + 9) / 3
    whitened = whiten_advantages([[1.0, 2.0], [3.0, 6.0]], [[1, 1], [1, 1]])
    np.testing.assert_allclose(whitened, (np.array([[1, 2], [3, 6]]) - 3) / np.sqrt(14 / 3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gamma": 1.5}, r"gamma must be in \[0, 1\]"),
        ({"lam": -0.1}, r"lam must be in \[0, 1\]"),
        ({"values": [[0.0, 0.0]]}, r"values has shape \(1, 2\)"),
    ],
)
def test_invalid_arguments_are_named(kwargs, message):
    args = {"rewards": [[1.0]], "values": [[0.0]], "mask": [[1]]} | kwargs
    with pytest.raises(ValueError, match=message):
        gae(**args)
