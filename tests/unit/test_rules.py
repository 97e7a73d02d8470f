from __future__ import annotations

import numpy as np
import pytest

from combiner.rules import combine, softmax


@pytest.fixture
def stacked() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(4, 5, 10)).astype(np.float32)


def test_softmax_rows_sum_to_one_and_match_the_definition(stacked):
    s = softmax(stacked)
    np.testing.assert_allclose(s.sum(-1), 1.0, rtol=1e-6)
    ref = np.exp(stacked) / np.exp(stacked).sum(-1, keepdims=True)
    np.testing.assert_allclose(s, ref, rtol=1e-5)


def test_mean_is_the_average_over_members(stacked):
    np.testing.assert_allclose(combine(stacked, "mean"), stacked.mean(0), rtol=1e-6)


def test_mean_with_softmax_averages_probabilities(stacked):
    ref = np.mean([np.exp(m) / np.exp(m).sum(-1, keepdims=True) for m in stacked], axis=0)
    np.testing.assert_allclose(combine(stacked, "mean", apply_softmax=True), ref, rtol=1e-5)


def test_weighted_mean_uses_normalised_weights(stacked):
    w = [1.0, 2.0, 0.5, 4.0]
    ref = sum(wi * m for wi, m in zip(w, stacked, strict=True)) / sum(w)
    np.testing.assert_allclose(combine(stacked, "weighted_mean", w), ref, rtol=1e-5)


def test_half_precision_inputs_are_combined_in_float32():
    x = np.full((2, 1, 3), 60000, dtype=np.float16)  # the sum overflows in float16
    out = combine(x, "mean")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, 60000, rtol=1e-3)
