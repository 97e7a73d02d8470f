"""Every rule and measure fed inf, NaN, zeros and values near the float32 maximum, against
references written out here with plain arithmetic (not combiner.stages.rules)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from combiner.stages.rules import combine, softmax, uncertainty

INF = math.inf
NAN = math.nan
BIG = float(np.finfo(np.float32).max)  # 3.4028235e38


def rows(*values: list[float]) -> np.ndarray:
    """Members' outputs for one sample: ``(members, 1, classes)`` in float32."""
    return np.array([[v] for v in values], dtype=np.float32)


def limit_softmax(row: list[float]) -> list[float]:
    """The softmax of one row by its definition, and its limit where a logit is infinite."""
    if any(math.isnan(v) for v in row):
        return [NAN] * len(row)
    top = max(row)
    if math.isinf(top):  # +inf classes share it all; all -inf: equal logits, uniform
        winners = [v == top for v in row]
        return [w / sum(winners) for w in winners]
    e = [math.exp(v - top) for v in row]
    return [v / sum(e) for v in e]


# -------------------------------------------------------------------------------- softmax


@pytest.mark.parametrize(
    "row",
    [
        [1.0, INF, 2.0, INF],
        [0.0, -INF, 0.0],
        [-INF, -INF, -INF],
        [INF, -INF, 5.0],
        [0.0, 0.0, 0.0, 0.0],
        [BIG, -BIG, 0.0],
        [BIG, BIG, 1.0],
        [-BIG, -BIG, -BIG],
    ],
    ids=["+inf", "-inf", "all -inf", "both infs", "zeros", "max and -max", "max twice", "-max"],
)
def test_softmax_of_a_row_with_infinities_or_extremes_is_its_limit_and_a_distribution(row):
    got = softmax(np.array([row], dtype=np.float32))[0]
    np.testing.assert_allclose(got, limit_softmax(row), rtol=1e-6, atol=1e-30)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got.sum(), 1.0, rtol=1e-6)


def test_softmax_of_a_row_holding_nan_is_nan_and_leaves_other_rows_alone():
    got = softmax(np.array([[0.0, NAN, 1.0], [0.0, 0.0, 0.0]], dtype=np.float32))
    assert np.isnan(got[0]).all()
    np.testing.assert_allclose(got[1], [1 / 3] * 3, rtol=1e-6)


# -------------------------------------------------------------------------------- the means


def test_mean_of_values_near_the_float32_maximum_does_not_overflow():
    stacked = rows([BIG, 0.9 * BIG, -BIG], [BIG, BIG, -BIG])
    expected = [(BIG + BIG) / 2, (0.9 * BIG + BIG) / 2, -BIG]
    got = combine(stacked, "mean")
    assert got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_allclose(got[0], expected, rtol=1e-6)


def test_weighted_mean_of_values_near_the_float32_maximum_does_not_overflow():
    stacked = rows([BIG, -BIG, 3e38], [BIG, BIG, 3e38], [0.5 * BIG, -BIG, 3e38])
    weights = [1.0, 2.0, 5.0]
    expected = [
        sum(w * m[0][c] for w, m in zip(weights, stacked.astype(float), strict=True)) / 8.0
        for c in range(3)
    ]
    got = combine(stacked, "weighted_mean", weights)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[0], expected, rtol=1e-6)


@pytest.mark.parametrize("rule", ["mean", "weighted_mean", "geometric_mean", "median", "max"])
def test_with_softmax_every_rule_answers_finite_probabilities_for_infinite_logits(rule):
    members = [[INF, 0.0, 0.0], [0.0, -INF, 2.0], [-INF, -INF, -INF], [BIG, -BIG, 0.0]]
    weights = [1.0, 2.0, 3.0, 4.0]
    got = combine(rows(*members), rule, weights, apply_softmax=True)[0]
    p = [limit_softmax(m) for m in members]
    if rule == "mean":
        expected = [sum(pm[c] for pm in p) / 4 for c in range(3)]
    elif rule == "weighted_mean":
        expected = [sum(w * pm[c] for w, pm in zip(weights, p, strict=True)) / 10 for c in range(3)]
    elif rule == "geometric_mean":  # product of p^(w/sum w), probabilities floored at 1e-12
        product = [
            math.prod(max(pm[c], 1e-12) ** (w / 10) for w, pm in zip(weights, p, strict=True))
            for c in range(3)
        ]
        expected = [v / sum(product) for v in product]
    elif rule == "median":
        expected = [sorted(pm[c] for pm in p)[1:3] for c in range(3)]
        expected = [(a + b) / 2 for a, b in expected]
    else:
        expected = [max(pm[c] for pm in p) for c in range(3)]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-12)


def test_geometric_mean_of_outputs_with_infinities_is_still_a_distribution():
    """Without softmax: outputs taken as probabilities, an infinite one takes the mass."""
    got = combine(rows([INF, 1.0, 1.0], [1.0, 1.0, 1.0]), "geometric_mean")[0]
    np.testing.assert_allclose(got, [1.0, 0.0, 0.0], atol=1e-12)


def test_zeros_combine_to_zeros_or_to_uniform_probabilities():
    zeros = rows([0.0] * 4, [0.0] * 4, [0.0] * 4)
    for rule in ("mean", "weighted_mean", "median", "max"):
        np.testing.assert_array_equal(combine(zeros, rule, [1.0, 2.0, 3.0])[0], [0.0] * 4)
        np.testing.assert_allclose(combine(zeros, rule, [1.0, 2.0, 3.0], True)[0], [0.25] * 4)
    # zero probabilities are floored at 1e-12, then renormalised: uniform
    np.testing.assert_allclose(combine(zeros, "geometric_mean")[0], [0.25] * 4, rtol=1e-6)


@pytest.mark.parametrize("rule", ["mean", "weighted_mean", "geometric_mean", "median", "max"])
def test_a_nan_in_a_member_row_makes_that_row_nan_and_no_other(rule):
    stacked = np.array(
        [[[NAN, 0.0, 1.0], [1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]],
        dtype=np.float32,
    )
    got = combine(stacked, rule, [1.0, 1.0], apply_softmax=True)
    assert np.isnan(got[0]).all()
    assert np.isfinite(got[1]).all()


# -------------------------------------------------------------------------------- vote


def test_a_member_whose_row_holds_nan_casts_no_vote():
    # members vote 2, 1 and (NaN: none); weights 1, 1, 2: fractions of the total weight 4
    stacked = rows([0.0, 0.0, 9.0], [0.0, 9.0, 0.0], [NAN, 9.0, 0.0])
    np.testing.assert_allclose(combine(stacked, "vote", [1.0, 1.0, 2.0])[0], [0.0, 0.25, 0.25])


def test_a_row_where_every_member_holds_nan_gets_no_vote_at_all():
    stacked = rows([NAN, 1.0, 0.0], [0.0, NAN, 0.0])
    np.testing.assert_array_equal(combine(stacked, "vote")[0], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(uncertainty(stacked, "agreement"), [0.0])


def test_vote_counts_infinite_and_extreme_outputs_for_their_class():
    stacked = rows([0.0, INF, 0.0], [-INF, -INF, 1.0], [BIG, -BIG, 0.0], [0.0, 0.0, 0.0])
    # votes: 1, 2, 0, and 0 (a tie of zeros goes to the lowest class)
    np.testing.assert_allclose(combine(stacked, "vote")[0], [0.5, 0.25, 0.25])


def test_a_nan_member_does_not_count_as_agreeing():
    stacked = rows([9.0, 0.0], [9.0, 0.0], [NAN, 0.0], [0.0, 9.0])
    # plurality: class 0 (two votes); agreeing: 2 of the 4 members
    np.testing.assert_allclose(uncertainty(stacked, "agreement"), [0.5])


# -------------------------------------------------------------------------------- measures


def test_measures_of_one_hot_and_uniform_probabilities_from_infinite_and_zero_logits():
    certain = rows([INF, 0.0, 0.0], [BIG, 0.0, -BIG])  # both: all on class 0
    np.testing.assert_allclose(uncertainty(certain, "entropy", True), [0.0], atol=1e-6)
    np.testing.assert_allclose(uncertainty(certain, "mutual_information", True), [0.0], atol=1e-6)
    np.testing.assert_allclose(uncertainty(certain, "variance", True), [0.0], atol=1e-12)
    np.testing.assert_allclose(uncertainty(certain, "agreement", True), [1.0])
    flat = rows([0.0] * 4, [-INF] * 4)  # both uniform
    np.testing.assert_allclose(uncertainty(flat, "entropy", True), [math.log(4)], rtol=1e-6)
    np.testing.assert_allclose(uncertainty(flat, "mutual_information", True), [0.0], atol=1e-6)


def test_variance_of_values_near_the_float32_maximum_is_computed_without_overflow():
    stacked = rows([BIG, 0.0], [-BIG, 0.0])
    # per class: the members' variance (population), then the mean over classes
    expected = (((BIG - 0.0) ** 2 + (-BIG - 0.0) ** 2) / 2 + 0.0) / 2
    got = uncertainty(stacked, "variance")
    np.testing.assert_allclose(got, [expected], rtol=1e-6)


def test_measures_of_a_row_holding_nan_are_nan():
    stacked = rows([NAN, 0.0, 1.0], [0.0, 1.0, 2.0])
    for measure in ("entropy", "mutual_information", "variance"):
        assert np.isnan(uncertainty(stacked, measure, True)).all(), measure
