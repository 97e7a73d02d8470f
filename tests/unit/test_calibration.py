"""Choosing a cascade on validation rows (orchestrator.planning.cascade), the calibration file,
and what serving and planning read of it; ``chorus calibrate``'s checks of its inputs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from combiner import CascadeRoute, exits
from orchestrator.errors import ChorusError, SpecError
from orchestrator.planning.cascade import (
    MAX_SPLITS,
    MAX_THRESHOLDS,
    Calibration,
    Combining,
    calibration,
    candidates,
    choose,
    combination_of,
    ensemble_accuracy,
    frontier,
    load_calibration,
    member_costs,
    member_shares,
    resolve_cascade,
    save_calibration,
    simulate,
    splits,
)
from orchestrator.planning.hardware import Device
from orchestrator.planning.plan import Plan
from orchestrator.planning.profile import Curve, Profile
from orchestrator.planning.spec import Cascade, Ensemble, Member, Tensor, load_ensemble
from tests.cli import chorus
from tests.onnx_models import linear

MEAN = Combining(
    rule="mean", weights={"a": 1.0, "b": 1.0, "c": 1.0}, softmax=False, exit="agreement"
)


def _row(label: int, p: float, classes: int = 3) -> np.ndarray:
    """Probabilities: ``p`` on ``label``, the rest shared by the other classes."""
    out = np.full(classes, (1 - p) / (classes - 1), dtype=np.float32)
    out[label] = p
    return out


def _agreeing_80(wrong_together: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """100 rows, 3 classes; a and b are cheap, c is dear and always right. On rows 0-79 a and b
    agree, rightly (but on the first ``wrong_together`` rows, wrongly); on 80-89 b is wrong
    and surer than a is right, on 90-99 a is wrong and surer than b."""
    labels = np.arange(100) % 3
    a, b, c = [], [], []
    for i, y in enumerate(labels):
        other = (y + 1) % 3
        if i < wrong_together:  # not sure enough to outvote c
            a.append(_row(other, 0.5))
            b.append(_row(other, 0.5))
        elif i < 80:
            a.append(_row(y, 0.8))
            b.append(_row(y, 0.8))
        elif i < 90:
            a.append(_row(y, 0.6))
            b.append(_row(other, 0.7))
        else:
            a.append(_row(other, 0.7))
            b.append(_row(y, 0.6))
        c.append(_row(y, 0.98))
    return {"a": np.stack(a), "b": np.stack(b), "c": np.stack(c)}, labels


COSTS = {"a": 1.0, "b": 1.0, "c": 10.0}


def test_the_cheapest_cascade_is_the_tier_that_agrees_on_80_percent_then_the_rest():
    outputs, _ = _agreeing_80()
    found = candidates(outputs, COSTS, MEAN)
    chosen = choose(found, target=0.995)
    assert chosen is not None
    assert chosen.tiers == (("a", "b"), ("c",))
    assert chosen.threshold == pytest.approx(1.0)
    assert chosen.answered == pytest.approx((0.8, 0.2))
    assert chosen.reach == pytest.approx((1.0, 0.2))
    assert chosen.fidelity == 1.0
    assert chosen.cost == pytest.approx((1 + 1 + 0.2 * 10) / 12)
    # every split of a, b, c (by cost) was tried, at every share of votes
    assert {c.tiers for c in found} == {
        (("a",), ("b", "c")),
        (("a", "b"), ("c",)),
        (("a",), ("b",), ("c",)),
    }
    assert {round(c.threshold, 6) for c in found if c.tiers == (("a", "b"), ("c",))} == {0.5, 1.0}


def test_with_labels_the_cascade_is_judged_by_its_accuracy():
    outputs, labels = _agreeing_80()
    found = candidates(outputs, COSTS, MEAN, labels=labels)
    full = ensemble_accuracy(outputs, MEAN, labels)
    assert full == 1.0
    chosen = choose(found, target=0.995, full_accuracy=full)
    assert chosen is not None and chosen.accuracy == 1.0
    assert chosen.tiers == (("a", "b"), ("c",))
    # 10 points of accuracy may go: a alone (right on 90%) answers every row
    cheap = choose(found, target=0.9, full_accuracy=full)
    assert cheap is not None and cheap.tiers[0] == ("a",) and cheap.answered[0] == 1.0
    assert cheap.accuracy == pytest.approx(0.9)


def test_no_cascade_is_chosen_when_none_reaches_the_fidelity():
    outputs, _ = _agreeing_80(wrong_together=5)  # the first tier agrees wrongly on 5 rows
    found = candidates(outputs, COSTS, MEAN)
    assert max(c.fidelity for c in found) == pytest.approx(0.95)
    assert choose(found, target=0.995) is None


def test_the_simulation_matches_a_hand_computation():
    a = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.55, 0.45]], dtype=np.float32)
    b = np.array([[0.8, 0.2], [0.1, 0.9], [0.9, 0.1], [0.3, 0.7]], dtype=np.float32)
    combining = Combining("mean", {"a": 1.0, "b": 1.0}, softmax=False, exit="confidence")
    got = simulate(
        {"a": a, "b": b},
        {"a": 1.0, "b": 3.0},
        combining,
        (("a",), ("b",)),
        threshold=0.7,
        labels=np.array([0, 1, 0, 1]),
    )
    # a is confident (>= 0.7) on rows 0 and 2, answering 0 and 1; a and b answer rows 1 and 3
    # with class 1. The full ensemble answers 0, 1, 0, 1: row 2 differs, and is wrong.
    assert got.answered == (0.5, 0.5)
    assert got.reach == (1.0, 0.5)
    assert got.fidelity == 0.75
    assert got.accuracy == 0.75
    assert got.cost == pytest.approx((1.0 * 1 + 0.5 * 3) / 4)


def test_the_rows_that_exit_are_those_the_combiners_exit_rule_lets_out():
    rng = np.random.default_rng(0)
    outputs = {m: rng.random((50, 4)).astype(np.float32) for m in "abc"}
    combining = Combining("mean", dict.fromkeys("abc", 1.0), softmax=True, exit="confidence")
    got = simulate(outputs, COSTS, combining, (("a", "b"), ("c",)), threshold=0.3)
    stacked = np.stack([outputs["a"], outputs["b"]])
    served = exits(stacked, "mean", [1.0, 1.0], True, "confidence", 0.3)
    assert got.answered[0] == pytest.approx(served.mean())


def test_an_output_with_positions_exits_and_matches_only_on_every_position():
    # 2 rows x 2 positions x 2 classes; a and b agree on both positions of row 0 only
    a = np.array([[[0.9, 0.1], [0.8, 0.2]], [[0.9, 0.1], [0.3, 0.7]]], dtype=np.float32)
    b = np.array([[[0.7, 0.3], [0.6, 0.4]], [[0.6, 0.4], [0.6, 0.4]]], dtype=np.float32)
    c = np.array([[[0.9, 0.1], [0.9, 0.1]], [[0.9, 0.1], [0.1, 0.9]]], dtype=np.float32)
    got = simulate({"a": a, "b": b, "c": c}, COSTS, MEAN, (("a", "b"), ("c",)), 1.0)
    assert got.answered == (0.5, 0.5)
    assert got.fidelity == 1.0


def test_members_are_tried_cheapest_first_and_the_file_s_tiers_alone_when_it_sets_them():
    outputs, _ = _agreeing_80()
    dear_a = {"a": 10.0, "b": 1.0, "c": 1.0}
    found = candidates(outputs, dear_a, MEAN)
    assert all(c.tiers[0][0] in ("b", "c") for c in found)
    fixed = candidates(outputs, COSTS, MEAN, tiers=(("c",), ("a", "b")), threshold=1.0)
    assert [(c.tiers, c.threshold) for c in fixed] == [((("c",), ("a", "b")), 1.0)]


def test_every_split_into_contiguous_tiers_is_tried_and_many_members_are_capped():
    assert splits(["a", "b", "c"]) == [
        (("a",), ("b", "c")),
        (("a", "b"), ("c",)),
        (("a",), ("b",), ("c",)),
    ]
    assert len(splits(list("abcdefgh"))) == 2**7 - 1  # all of them, under the cap
    many = splits([f"m{i}" for i in range(20)])
    assert len(many) <= MAX_SPLITS
    assert sum(len(s) == 2 for s in many) == 19  # every split into two is kept
    assert max(len(s) for s in many) == 3


def test_confidence_thresholds_are_the_distinct_scores_thinned_to_a_grid():
    rng = np.random.default_rng(1)
    outputs = {m: rng.random((500, 5)).astype(np.float32) for m in "ab"}
    combining = Combining("mean", dict.fromkeys("ab", 1.0), softmax=False, exit="confidence")
    found = candidates(outputs, {"a": 1.0, "b": 2.0}, combining)
    assert 2 <= len(found) <= MAX_THRESHOLDS
    assert found[-1].answered[0] > 0  # the highest score still lets its row out


def test_the_frontier_keeps_only_what_no_cheaper_candidate_matches():
    outputs, _ = _agreeing_80()
    best = frontier(candidates(outputs, COSTS, MEAN))
    costs = [c.cost for c in best]
    fidelities = [c.fidelity for c in best]
    assert costs == sorted(costs) and fidelities == sorted(fidelities)
    assert len(set(fidelities)) == len(fidelities)


def _curve(points: dict[int, float]) -> Curve:
    return Curve(1 << 20, 0, tuple(sorted(points.items())), tuple(sorted(points.items())))


def _device(kind: str) -> Device:
    return Device("local", kind, 0, kind, 16 << 30, 16 << 30)  # type: ignore[arg-type]


def test_a_member_s_cost_is_its_least_busy_time_per_row_on_the_first_device_with_all_curves():
    profile = Profile(
        {
            "a": {"gpu": _curve({1: 2.0, 8: 4.0}), "cpu": _curve({1: 1.0, 8: 6.0})},
            "b": {"cpu": _curve({1: 3.0, 4: 6.0, 8: 16.0})},
        }
    )
    # the GPU lacks b: the CPU's times, at each member's best batch size
    assert member_costs(profile, ["a", "b"], [_device("gpu"), _device("cpu")]) == {
        "a": 0.75,
        "b": 1.5,
    }
    with pytest.raises(ChorusError, match="chorus profile"):
        member_costs(profile, ["a", "b"], [_device("gpu")])


def _ensemble(tmp_path: Path, **cascade: object) -> Ensemble:
    for m in "abc":  # a calibration holds the files' digests
        if not (tmp_path / f"{m}.onnx").exists():
            (tmp_path / f"{m}.onnx").write_bytes(f"model {m}".encode())
    members = tuple(Member(m, tmp_path / f"{m}.onnx", 1.0, (), (), (), ()) for m in "abc")
    given = {"tiers": None, "exit": "agreement", "threshold": None, "output": "y", **cascade}
    return Ensemble(
        name="toy",
        file=tmp_path / "ensemble.yaml",
        members=members,
        inputs=(Tensor("x", "FP32", (4,)),),
        outputs=(Tensor("y", "FP32", (3,)),),
        rule="mean",
        softmax=False,
        max_batch_size=8,
        cascade=Cascade(**given),  # type: ignore[arg-type]
    )


def _calibrated(tmp_path: Path, target: float = 0.995, wrong_together: int = 0) -> Calibration:
    outputs, _ = _agreeing_80(wrong_together)
    found = candidates(outputs, COSTS, MEAN)
    return calibration(_ensemble(tmp_path), choose(found, target), found, target, rows=100)


def test_a_calibration_is_saved_and_read_back(tmp_path):
    made = _calibrated(tmp_path)
    save_calibration(made, tmp_path / "cal" / "calibration.json")
    back = load_calibration(tmp_path / "cal" / "calibration.json")
    assert back == made
    assert back.tiers == [["a", "b"], ["c"]] and back.reach == pytest.approx([1.0, 0.2])
    assert member_shares(back) == pytest.approx({"a": 1.0, "b": 1.0, "c": 0.2})


def test_a_calibration_that_found_no_cascade_says_so_and_keeps_every_member(tmp_path):
    made = _calibrated(tmp_path, wrong_together=5)
    assert made.tiers is None and made.threshold is None
    assert (made.fidelity, made.cost, made.reach) == (1.0, 1.0, [1.0])
    assert made.best_fidelity == pytest.approx(0.95)
    said: list[str] = []
    assert resolve_cascade(_ensemble(tmp_path), made, "cal.json", said.append) == (None, None)
    assert "full ensemble" in said[0] and "95.00%" in said[0]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("{not json", ""),
        ('{"ensemble": "toy"}', "members"),
    ],
    ids=["not JSON", "fields missing"],
)
def test_a_bad_calibration_file_is_named(tmp_path, text, field):
    path = tmp_path / "calibration.json"
    path.write_text(text)
    with pytest.raises(SpecError) as e:
        load_calibration(path)
    assert str(path) in str(e.value)
    if field:
        assert field in str(e.value)


def test_a_calibration_with_reach_for_other_tiers_is_refused(tmp_path):
    data = _calibrated(tmp_path).model_dump()
    data["reach"] = [1.0]
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(SpecError, match="reach has 1 values for 2 tiers"):
        load_calibration(tmp_path / "c.json")


@pytest.mark.parametrize(
    ("reach", "words"),
    [
        ([0.5, 0.2], "every row reaches the first tier"),
        ([1.0, -3.0], "every row reaches the first tier"),
        ([1.0, 1.5], "every row reaches the first tier"),
    ],
)
def test_a_tampered_reach_is_refused(tmp_path, reach, words):
    data = _calibrated(tmp_path).model_dump()
    data["reach"] = reach
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(SpecError, match=words):
        load_calibration(tmp_path / "c.json")


def test_a_growing_reach_is_refused(tmp_path):
    data = _calibrated(tmp_path).model_dump()
    data["tiers"], data["reach"] = [["a"], ["b"], ["c"]], [1.0, 0.2, 0.5]
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(SpecError, match="cannot grow"):
        load_calibration(tmp_path / "c.json")


def test_a_calibration_that_found_none_does_not_undo_the_file_s_own_tiers_and_threshold(
    tmp_path,
):
    said: list[str] = []
    none = _calibrated(tmp_path, wrong_together=5)
    assert none.tiers is None
    ensemble = _ensemble(tmp_path, tiers=(("a", "b"), ("c",)), threshold=1.0)
    route, shares = resolve_cascade(ensemble, none, "cal.json", said.append)
    assert route is not None and route.tiers == (("a", "b"), ("c",)) and route.threshold == 1.0
    assert shares is None
    assert "the file sets its tiers and threshold: serving them" in said[0]
    assert resolve_cascade(_ensemble(tmp_path), none) == (None, None)  # nothing to serve


def test_serving_takes_the_tiers_and_threshold_from_the_calibration(tmp_path):
    route, shares = resolve_cascade(_ensemble(tmp_path), _calibrated(tmp_path))
    assert route == CascadeRoute(
        tiers=(("a", "b"), ("c",)), exit="agreement", threshold=1.0, output="y"
    )
    assert shares == pytest.approx({"a": 1.0, "b": 1.0, "c": 0.2})


def test_the_file_s_threshold_wins_and_then_the_plan_assumes_every_row_reaches_every_member(
    tmp_path,
):
    said: list[str] = []
    route, shares = resolve_cascade(
        _ensemble(tmp_path, threshold=0.5), _calibrated(tmp_path), "cal.json", said.append
    )
    assert route is not None and route.threshold == 0.5 and route.tiers == (("a", "b"), ("c",))
    assert shares is None and "every row reaches every member" in said[0]


def test_a_file_with_tiers_and_threshold_needs_no_calibration(tmp_path):
    said: list[str] = []
    ensemble = _ensemble(tmp_path, tiers=(("a",), ("b", "c")), threshold=1.0)
    route, shares = resolve_cascade(ensemble, None, say=said.append)
    assert route is not None and route.tiers == (("a",), ("b", "c"))
    assert shares is None and "every row reaches every member" in said[0]


@pytest.mark.parametrize("left_out", ["threshold", "tiers"])
def test_without_a_calibration_what_the_file_leaves_out_names_chorus_calibrate(tmp_path, left_out):
    given = {"tiers": (("a",), ("b", "c")), "threshold": 1.0}
    given[left_out] = None
    with pytest.raises(SpecError, match="chorus calibrate") as e:
        resolve_cascade(_ensemble(tmp_path, **given), None)
    assert e.value.field == f"combine.cascade.{left_out}"


def _retrained(e: Ensemble) -> Ensemble:
    e.members[0].path.write_bytes(b"retrained")
    return e


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda e: dataclasses.replace(e, name="other"), "ensemble"),
        (lambda e: dataclasses.replace(e, members=e.members[:2]), "members"),
        (
            lambda e: dataclasses.replace(
                e, cascade=dataclasses.replace(e.cascade, exit="confidence")
            ),
            "exit",
        ),
        (
            lambda e: dataclasses.replace(
                e, cascade=dataclasses.replace(e.cascade, tiers=(("a",), ("b", "c")))
            ),
            "tiers",
        ),
        (lambda e: dataclasses.replace(e, rule="max"), "combination.rule"),
        (lambda e: dataclasses.replace(e, softmax=True), "combination.softmax"),
        (
            lambda e: dataclasses.replace(
                e, members=(dataclasses.replace(e.members[0], weight=5.0), *e.members[1:])
            ),
            "combination.weights",
        ),
        (_retrained, "combination.files"),
    ],
    ids=[
        "other ensemble",
        "other members",
        "other exit rule",
        "other tiers",
        "other rule",
        "softmax",
        "other weights",
        "a retrained member",
    ],
)
def test_a_stale_calibration_is_refused_saying_to_calibrate_again(tmp_path, change, field):
    made = _calibrated(tmp_path)
    with pytest.raises(SpecError, match=r"run 'chorus calibrate ensemble\.yaml' again") as e:
        resolve_cascade(change(_ensemble(tmp_path)), made, "cal.json")
    assert e.value.field == field and e.value.file == "cal.json"


def test_an_ensemble_without_a_cascade_ignores_the_calibration(tmp_path):
    plain = dataclasses.replace(_ensemble(tmp_path), cascade=None)
    assert resolve_cascade(plain, _calibrated(tmp_path)) == (None, None)


def test_with_a_cascade_the_combiner_s_batches_in_flight_follow_the_first_tier_only(tmp_path):
    from orchestrator.deploying.up import combiner_config

    ensemble = _ensemble(tmp_path)
    ensemble = dataclasses.replace(
        ensemble,
        members=tuple(
            dataclasses.replace(m, input_map=(("x", "x"),), output_map=(("y", "y"),))
            for m in ensemble.members
        ),
    )
    plan = Plan(
        ensemble="toy",
        devices=(_device("cpu"),),
        planned_memory_bytes={},
        members=("a", "b", "c"),
        instances={"a": {"local/cpu0": 4}, "b": {"local/cpu0": 3}, "c": {"local/cpu0": 1}},
        max_batch_size=dict.fromkeys("abc", 8),
        predicted_throughput=0.0,
    )
    route = CascadeRoute(tiers=(("a", "b"), ("c",)), exit="agreement", threshold=1.0, output="y")
    assert combiner_config(ensemble, "127.0.0.1:1", plan).max_in_flight == 1
    config = combiner_config(ensemble, "127.0.0.1:1", plan, cascade=route)
    assert config.cascade == route and config.max_in_flight == 3


# chorus calibrate checks what it is given before it starts anything


@pytest.fixture
def cascaded(tmp_path: Path) -> Path:
    for i, m in enumerate("ab"):
        linear(tmp_path / f"{m}.onnx", seed=i)
    spec = {
        "name": "toy",
        "members": [{"name": m, "path": f"{m}.onnx"} for m in "ab"],
        "combine": {"softmax": True, "cascade": {"exit": "agreement"}},
    }
    (tmp_path / "ensemble.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "ensemble.yaml"


def _calibrate(ensemble: Path, *args: str):
    work = ensemble.parent / "work"
    return chorus("calibrate", str(ensemble), "--workdir", str(work), *args, timeout=60)


@pytest.mark.parametrize(
    ("inputs", "words"),
    [
        (np.zeros((10, 5), dtype=np.float32), "shape [10, 5]"),
        (np.zeros((10, 4), dtype=np.float64), "float64"),
        (np.zeros((0, 4), dtype=np.float32), "no rows"),
        (np.array([[0, 0, 0, 0], [0, np.nan, 0, 0], [np.inf] * 4], np.float32), "2 row(s): 1, 2"),
    ],
    ids=["wrong shape", "wrong dtype", "no rows", "not finite"],
)
def test_calibrate_names_what_is_wrong_with_the_inputs(cascaded, inputs, words):
    np.save(cascaded.parent / "x.npy", inputs)
    result = _calibrate(cascaded, "--inputs", str(cascaded.parent / "x.npy"))
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and "x.npy" in result.stderr
    assert not (cascaded.parent / "work").exists()  # nothing started


def test_calibrate_checks_the_labels_and_the_fidelity(cascaded):
    np.save(cascaded.parent / "x.npy", np.zeros((10, 4), dtype=np.float32))
    np.save(cascaded.parent / "y.npy", np.zeros(9, dtype=np.int64))
    inputs = ("--inputs", str(cascaded.parent / "x.npy"))
    short = _calibrate(cascaded, *inputs, "--labels", str(cascaded.parent / "y.npy"))
    assert short.returncode == 2 and "9 labels for 10 input rows" in short.stderr
    zero = _calibrate(cascaded, *inputs, "--fidelity", "0")
    assert zero.returncode == 2 and "--fidelity" in zero.stderr and "(0, 1]" in zero.stderr


def test_calibrate_needs_a_cascade_section_and_says_how_to_add_one(cascaded):
    spec = yaml.safe_load(cascaded.read_text())
    del spec["combine"]["cascade"]
    cascaded.write_text(yaml.safe_dump(spec))
    np.save(cascaded.parent / "x.npy", np.zeros((10, 4), dtype=np.float32))
    result = _calibrate(cascaded, "--inputs", str(cascaded.parent / "x.npy"))
    assert result.returncode == 2
    assert "combine.cascade" in result.stderr and "exit: agreement" in result.stderr


def test_plan_sizes_the_members_for_the_calibration_s_shares(cascaded, tmp_path):
    profile = {
        "members": {
            m: {"cpu": {"memory_bytes": 1 << 20, "latency_ms": {"1": 1.0, "8": 4.0}}} for m in "ab"
        }
    }
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    (tmp_path / "hw.yaml").write_text(
        yaml.safe_dump(
            {"nodes": [{"name": "n", "devices": [{"kind": "cpu", "memory_gb": 4, "cores": 2}]}]}
        )
    )
    made = Calibration(
        ensemble="toy",
        members=["a", "b"],
        output="y",
        exit="agreement",
        tiers=[["a"], ["b"]],
        threshold=1.0,
        reach=[1.0, 0.25],
        fidelity=1.0,
        cost=0.6,
        target=0.99,
        rows=100,
        combination=combination_of(load_ensemble(cascaded)),
    )
    save_calibration(made, tmp_path / "cal.json")
    args = ["plan", str(cascaded), "--profile", str(tmp_path / "profile.json")]
    args += ["--hardware", str(tmp_path / "hw.yaml"), "--calibration", str(tmp_path / "cal.json")]
    result = chorus(*args, "--json", "--workdir", str(tmp_path / "work"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["shares"] == {"a": 1.0, "b": 0.25}
    assert "cal.json" in result.stderr


def test_a_tier_no_validation_row_reached_is_planned_for_one_row(tmp_path):
    made = _calibrated(tmp_path).model_copy(update={"reach": [1.0, 0.0]})
    assert member_shares(made) == {"a": 1.0, "b": 1.0, "c": 0.01}  # 1 of the 100 rows
