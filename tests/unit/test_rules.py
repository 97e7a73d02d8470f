"""Every combination rule and uncertainty measure against a direct numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from combiner.stages.rules import RULES, combine, load_rule, softmax, uncertainty

W = [1.0, 2.0, 0.5, 4.0]


@pytest.fixture
def stacked() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(4, 5, 10)).astype(np.float32)


def probs(x: np.ndarray) -> np.ndarray:
    return np.exp(x) / np.exp(x).sum(-1, keepdims=True)


def test_softmax_rows_sum_to_one_and_match_the_definition(stacked):
    s = softmax(stacked)
    np.testing.assert_allclose(s.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(s, probs(stacked), rtol=1e-5)


def test_mean_is_the_average_over_members(stacked):
    np.testing.assert_allclose(combine(stacked, "mean"), stacked.mean(0), rtol=1e-6)


def test_mean_with_softmax_averages_probabilities(stacked):
    ref = np.mean([probs(m) for m in stacked], axis=0)
    np.testing.assert_allclose(combine(stacked, "mean", apply_softmax=True), ref, rtol=1e-5)


def test_weighted_mean_uses_normalised_weights(stacked):
    ref = sum(wi * m for wi, m in zip(W, stacked, strict=True)) / sum(W)
    np.testing.assert_allclose(combine(stacked, "weighted_mean", W), ref, rtol=1e-5)


def test_geometric_mean_is_the_renormalised_weighted_product_of_probabilities(stacked):
    p = probs(stacked.astype(np.float64))
    product = np.prod([pi ** (wi / sum(W)) for wi, pi in zip(W, p, strict=True)], axis=0)
    ref = product / product.sum(-1, keepdims=True)
    out = combine(stacked, "geometric_mean", W, apply_softmax=True)
    np.testing.assert_allclose(out, ref, rtol=1e-4)
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)


def test_median_and_max_are_elementwise_over_members(stacked):
    np.testing.assert_allclose(combine(stacked, "median"), np.median(stacked, axis=0))
    np.testing.assert_allclose(combine(stacked, "max"), stacked.max(axis=0))


def test_vote_gives_the_weighted_fraction_of_members_per_class():
    # 4 members, 1 sample, 3 classes: votes for classes 0, 1, 1, 2
    stacked = np.array([[[9, 0, 0]], [[0, 9, 0]], [[0, 9, 0]], [[0, 0, 9]]], dtype=np.float32)
    np.testing.assert_allclose(combine(stacked, "vote"), [[0.25, 0.5, 0.25]])
    weighted = combine(stacked, "vote", [5.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(weighted, [[5 / 8, 2 / 8, 1 / 8]])


def test_a_vote_tie_goes_to_the_lowest_class_index():
    stacked = np.array([[[0, 0, 9]], [[0, 9, 0]]], dtype=np.float32)  # one vote each: 2 and 1
    fractions = combine(stacked, "vote")
    np.testing.assert_allclose(fractions, [[0.0, 0.5, 0.5]])
    assert int(np.argmax(fractions)) == 1
    np.testing.assert_allclose(uncertainty(stacked, "agreement"), [0.5])


def test_entropy_and_mutual_information_match_their_definitions(stacked):
    p = probs(stacked.astype(np.float64))
    mean_p = p.mean(0)
    h_mean = -(mean_p * np.log(mean_p)).sum(-1)
    mean_h = (-(p * np.log(p)).sum(-1)).mean(0)
    np.testing.assert_allclose(uncertainty(stacked, "entropy", True), h_mean, rtol=1e-4)
    mi = uncertainty(stacked, "mutual_information", True)
    np.testing.assert_allclose(mi, h_mean - mean_h, rtol=1e-3, atol=1e-6)
    assert (mi >= -1e-6).all()


def test_members_that_agree_have_no_mutual_information_and_full_agreement():
    same = np.repeat(np.random.default_rng(1).normal(size=(1, 6, 4)), 3, axis=0)
    np.testing.assert_allclose(uncertainty(same, "mutual_information", True), 0.0, atol=1e-6)
    np.testing.assert_allclose(uncertainty(same, "agreement", True), 1.0)
    np.testing.assert_allclose(uncertainty(same, "variance", True), 0.0, atol=1e-12)


def test_variance_is_the_members_variance_averaged_over_classes(stacked):
    p = probs(stacked.astype(np.float64))
    np.testing.assert_allclose(uncertainty(stacked, "variance", True), p.var(0).mean(-1), rtol=1e-4)


def test_agreement_is_the_fraction_of_members_voting_with_the_plurality(stacked):
    votes = stacked.argmax(-1)  # (members, batch)
    plurality = [np.bincount(v, minlength=10).argmax() for v in votes.T]
    ref = (votes == np.array(plurality)[None]).mean(0)
    np.testing.assert_allclose(uncertainty(stacked, "agreement"), ref)


def test_half_precision_inputs_are_combined_in_float32():
    x = np.full((2, 1, 3), 60000, dtype=np.float16)  # the sum overflows in float16
    out = combine(x, "mean")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, 60000, rtol=1e-3)


def test_a_user_rule_is_imported_from_the_given_folder(tmp_path, stacked):
    (tmp_path / "my_rules_for_test.py").write_text(
        "import numpy as np\n"
        "def trimmed(stacked, weights):\n"
        "    s = np.sort(stacked, axis=0)\n"
        "    return s[1:-1].mean(axis=0)\n"
    )
    rule = load_rule("my_rules_for_test:trimmed", [str(tmp_path)])
    ref = np.sort(stacked, axis=0)[1:-1].mean(0)
    np.testing.assert_allclose(combine(stacked, rule), ref, rtol=1e-6)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("average", "unknown rule 'average'"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("numpy:no_such_function", "has no 'no_such_function'"),
        ("numpy:pi", "is not callable"),
    ],
)
def test_bad_rules_are_refused_with_the_reason(name, message):
    with pytest.raises(ValueError, match=message):
        load_rule(name)


def test_every_built_in_rule_keeps_the_output_shape(stacked):
    for name in RULES:
        assert combine(stacked, name, W, apply_softmax=True).shape == stacked.shape[1:]
