"""KL estimators k1/k2/k3 and the fixed/adaptive KL controllers, numbers from the formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignd.algorithms import (
    AdaptiveKLController,
    FixedKLController,
    kl_penalty,
    make_kl_controller,
    sequence_kl,
)

LOGPROBS = [[-1.0, -2.0]]
REF_LOGPROBS = [[-1.5, -1.0]]  # log r = ref - logp = [-0.5, 1.0]


def test_k1_is_the_log_ratio_of_policy_to_reference():
    np.testing.assert_allclose(kl_penalty(LOGPROBS, REF_LOGPROBS, estimator="k1"), [[0.5, -1.0]])


def test_k2_is_half_the_squared_log_ratio():
    np.testing.assert_allclose(
        kl_penalty(LOGPROBS, REF_LOGPROBS, estimator="k2"), [[0.5 * 0.5**2, 0.5 * 1.0**2]]
    )


def test_k3_is_r_minus_one_minus_log_r():
    expected = [[(math.exp(-0.5) - 1) - (-0.5), (math.exp(1.0) - 1) - 1.0]]
    np.testing.assert_allclose(kl_penalty(LOGPROBS, REF_LOGPROBS, estimator="k3"), expected)


def test_padding_is_zero_whatever_it_holds():
    kl = kl_penalty([[-1.0, np.nan]], [[-2.0, 5.0]], mask=[[1, 0]], estimator="k3")
    np.testing.assert_allclose(kl, [[(math.exp(-1.0) - 1) + 1.0, 0.0]])


def test_clamp_bounds_the_log_ratio_before_exp():
    kl = kl_penalty([[-30.0]], [[-10.0]], estimator="k3", clamp=10.0)  # log r = 20 -> 10
    np.testing.assert_allclose(kl, [[math.exp(10.0) - 1 - 10.0]])


def test_k1_and_k3_estimate_the_kl_of_sampled_tokens():
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.5, 0.3])
    true_kl = float(np.sum(p * np.log(p / q)))
    tokens = np.random.default_rng(0).choice(3, size=(1, 200_000), p=p)  # sampled from p
    logp, logq = np.log(p)[tokens], np.log(q)[tokens]
    for estimator in ("k1", "k3"):
        assert kl_penalty(logp, logq, estimator=estimator).mean() == pytest.approx(
            true_kl, abs=0.01
        )
    assert (kl_penalty(logp, logq, estimator="k3") >= 0).all()


def test_sequence_kl_sums_or_averages_each_row():
    kl = [[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]]
    mask = [[1, 1, 1], [1, 0, 0]]
    np.testing.assert_allclose(sequence_kl(kl, mask), [6.0, 4.0])
    np.testing.assert_allclose(sequence_kl(kl, mask, reduction="mean"), [2.0, 4.0])


def test_fixed_controller_never_moves():
    controller = FixedKLController(0.05)
    assert controller.update(current=100.0, n_steps=512) == 0.05
    assert controller.value == 0.05


def test_adaptive_controller_follows_ziegler_et_al():
    controller = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    # KL 9 is 50% over target: the error is clipped to +0.2.
    assert controller.update(current=9.0, n_steps=256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 1e4))
    # KL 5.7 is 5% under target: error -0.05.
    expected = 0.1 * (1 + 0.2 * 256 / 1e4) * (1 - 0.05 * 256 / 1e4)
    assert controller.update(current=5.7, n_steps=256) == pytest.approx(expected)
    # far under target: the error is clipped to -0.2
    assert controller.update(current=0.0, n_steps=10000) == pytest.approx(expected * 0.8)


def test_make_kl_controller_is_adaptive_only_with_a_target():
    assert make_kl_controller(0.05) == FixedKLController(0.05)
    assert make_kl_controller(0.05, target=6.0, horizon=100) == AdaptiveKLController(0.05, 6.0, 100)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: kl_penalty(LOGPROBS, REF_LOGPROBS, estimator="k4"), "estimator must be one of"),
        (lambda: kl_penalty(LOGPROBS, [[-1.0]]), r"ref_logprobs has shape \(1, 1\)"),
        (lambda: kl_penalty([-1.0], [-1.0]), r"logprobs must be \(B, T\)"),
        (lambda: sequence_kl([[1.0]], [[1]], reduction="max"), "reduction must be"),
        (lambda: AdaptiveKLController(0.1, target=0.0), "target must be > 0"),
        (lambda: AdaptiveKLController(0.1, target=1.0, horizon=0), "horizon must be > 0"),
        (lambda: FixedKLController(-0.1), "kl_coef must be >= 0"),
    ],
)
def test_invalid_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
