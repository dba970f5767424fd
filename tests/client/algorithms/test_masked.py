"""Ragged ↔ padded conversion and masked statistics: padding never leaks into a result."""

from __future__ import annotations

import numpy as np
import pytest

from alignd.algorithms import lengths, masked_mean, masked_var, masked_whiten, pad_right, unpad


def test_pad_right_stacks_rows_and_unpad_inverts_it():
    values, mask = pad_right([[1.0, 2.0, 3.0], [4.0], []])
    np.testing.assert_array_equal(values, [[1, 2, 3], [4, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    rows = unpad(values, mask)
    assert [r.tolist() for r in rows] == [[1.0, 2.0, 3.0], [4.0], []]


def test_lengths_count_up_to_the_last_counted_token_keeping_holes():
    np.testing.assert_array_equal(lengths([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]), [3, 0, 4])
    assert unpad([[5.0, 6.0, 7.0, 8.0]], [[1, 0, 1, 0]])[0].tolist() == [5.0, 6.0, 7.0]


def test_masked_mean_ignores_padding_even_nan():
    values = [[1.0, 2.0, np.nan], [3.0, np.inf, -np.inf]]
    mask = [[1, 1, 0], [1, 0, 0]]
    assert masked_mean(values, mask) == pytest.approx((1 + 2 + 3) / 3)
    np.testing.assert_allclose(masked_mean(values, mask, axis=1), [1.5, 3.0])


def test_masked_var_is_bessel_corrected_unless_asked_not_to():
    values = [[1.0, 2.0], [3.0, 4.0]]  # mean 2.5, squared deviations sum to 5
    mask = np.ones((2, 2), bool)
    assert masked_var(values, mask) == pytest.approx(5 / 3)
    assert masked_var(values, mask, unbiased=False) == pytest.approx(5 / 4)
    with pytest.raises(ValueError, match="needs 2 or more elements, got 1"):
        masked_var(values, [[1, 0], [0, 0]])


def test_masked_whiten_uses_one_mean_and_variance_over_the_batch():
    values = [[1.0, 2.0], [3.0, np.nan]]  # counted 1, 2, 3: mean 2, unbiased variance 1
    mask = [[1, 1], [1, 0]]
    np.testing.assert_allclose(masked_whiten(values, mask, eps=0.0), [[-1, 0], [1, 0]])
    # shift_mean=False only rescales: (x - 2) / 1 + 2 = x
    np.testing.assert_allclose(
        masked_whiten(values, mask, shift_mean=False, eps=0.0), [[1, 2], [3, 0]]
    )
    # biased variance 2/3: (x - 2) / sqrt(2/3)
    np.testing.assert_allclose(
        masked_whiten(values, mask, unbiased=False, eps=0.0),
        [[-1 / np.sqrt(2 / 3), 0], [1 / np.sqrt(2 / 3), 0]],
    )


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        ([[1, 1]], r"mask has shape \(1, 2\), expected \(2, 2\)"),
        ([[1, 0.5], [1, 1]], "only 0/1"),
        ([[0, 0], [0, 0]], "selects no element"),
    ],
)
def test_bad_masks_are_rejected(mask, message):
    with pytest.raises(ValueError, match=message):
        masked_mean(np.zeros((2, 2)), mask)
