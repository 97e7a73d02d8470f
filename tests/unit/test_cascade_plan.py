"""The planner for a cascade: each member sized for the share of the ensemble's rows that
reach it (issue 18). Synthetic profiles; no server, no GPU."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from rich.console import Console

from orchestrator.errors import SpecError
from orchestrator.planning.allocate import evaluate, member_latency, problem, sequential_throughput
from orchestrator.planning.hardware import Device
from orchestrator.planning.plan import load_plan, plan_ensemble, plan_table, predict
from orchestrator.planning.profile import Curve, Profile
from tests.unit.test_allocate import GB, _cpu_problem, curve, fast_and_full, gpus

# Two tiers: two cheap members every row reaches, two dear ones that few rows reach. At 10 GB
# an instance, a 16 GB GPU holds one, so the plan is a split of the GPUs among the members.
TIERS = {
    "cheap_a": curve(10, fixed_ms=2, per_sample_ms=0.1),
    "cheap_b": curve(10, fixed_ms=3, per_sample_ms=0.15),
    "dear_a": curve(10, fixed_ms=10, per_sample_ms=1.0),
    "dear_b": curve(10, fixed_ms=12, per_sample_ms=1.2),
}
SECOND_TIER = ("dear_a", "dear_b")


def _profile(members):
    return Profile({m: {"gpu": c} for m, c in members.items()})


def _plan(members, devices, shares=None, **kwargs):
    return plan_ensemble(
        "e", list(members), 64, _profile(members), devices, shares=shares, **kwargs
    )


def _instances(plan, names):
    return sum(sum(plan.instances[m].values()) for m in names)


def test_a_small_share_for_the_second_tier_gives_it_fewer_instances_and_more_throughput():
    devices = gpus(8, memory_gb=16)
    full = _plan(TIERS, devices)
    cascade = _plan(TIERS, devices, shares=dict.fromkeys(SECOND_TIER, 0.2))
    assert _instances(cascade, SECOND_TIER) < _instances(full, SECOND_TIER)
    first_tier = [m for m in TIERS if m not in SECOND_TIER]
    assert _instances(cascade, first_tier) > _instances(full, first_tier)  # the work went there
    assert cascade.predicted_throughput > full.predicted_throughput
    # the plan keeps the full ensemble's throughput beside its own
    assert cascade.full_ensemble_throughput == pytest.approx(full.predicted_throughput)
    # and sizing for the shares beats serving the cascade on the full ensemble's plan
    on_full_plan = predict(replace(full, shares=cascade.shares), _profile(TIERS))
    assert cascade.predicted_throughput > on_full_plan * 1.2


def test_shares_of_one_give_exactly_the_plan_without_a_cascade():
    devices = gpus(6, memory_gb=16)
    for target in (None, 60.0):
        today = _plan(TIERS, devices, latency_target_ms=target)
        ones = _plan(TIERS, devices, shares=dict.fromkeys(TIERS, 1.0), latency_target_ms=target)
        cascade_fields = {"shares", "full_ensemble_throughput"}
        assert {k: v for k, v in ones.to_dict().items() if k not in cascade_fields} == (
            today.to_dict()
        )
        assert ones.full_ensemble_throughput == today.predicted_throughput
        assert set(ones.shares.values()) == {1.0}


def test_incremental_evaluation_of_moves_equals_full_evaluation_with_shares():
    rng = np.random.default_rng(17)
    members = {f"m{i}": curve(rng.uniform(1, 8), rng.uniform(1, 9)) for i in range(4)}
    shares = [1.0, 1.0, 0.3, 0.05]
    for target in (None, 80.0):
        p = problem(
            list(members),
            _profile(members),
            gpus(3, memory_gb=24),
            64,
            latency_target_ms=target,
            shares=shares,
        )
        rejected = 0
        for _ in range(5):
            n = rng.integers(0, 3, (4, 3))
            n[:, 0] += n.sum(axis=1) == 0
            # each member at a batch it gets (a later tier's rows of a batch bound it)
            runs = [np.flatnonzero(p.rate[m].max(axis=0) > 0) for m in range(4)]
            b = np.array([rng.choice(r) for r in runs])
            fast, full = fast_and_full(p, n, b)
            np.testing.assert_array_equal(fast.feasible, full.feasible)
            ok = full.feasible
            np.testing.assert_allclose(fast.throughput[ok], full.throughput[ok], rtol=1e-9)
            np.testing.assert_array_equal(fast.binding[ok], full.binding[ok])
            np.testing.assert_allclose(fast.congestion[ok], full.congestion[ok], rtol=1e-6)
            rejected += int((~full.feasible).sum())
        if target is not None:
            assert rejected > 0  # the target, with the shares in its fill times, did bind


def test_incremental_evaluation_counts_cpu_with_shares_as_the_full_one_does():
    p = replace(_cpu_problem(host_cpu_ms=3.0), shares=np.array([1.0, 0.4, 0.1]))
    rng = np.random.default_rng(5)
    for _ in range(5):
        n = rng.integers(1, 4, (3, 1))
        b = rng.integers(0, len(p.batch_sizes), 3)
        fast, full = fast_and_full(p, n, b)
        ok = full.feasible
        np.testing.assert_array_equal(fast.feasible, full.feasible)
        np.testing.assert_allclose(fast.throughput[ok], full.throughput[ok], rtol=1e-9)
        np.testing.assert_array_equal(fast.binding[ok], full.binding[ok])


def test_each_member_serves_its_share_of_the_rows_in_every_constraint():
    """With shares s, the ensemble's rows/s is what the full ensemble's would be if each
    member's rate and CPU were scaled by 1 / s and s: a member's own limit, the lanes and the
    CPU all weigh its load by its share."""
    plain = _cpu_problem(host_cpu_ms=3.0)
    shares = np.array([1.0, 0.5, 0.25])
    cascade = replace(plain, shares=shares)
    scaled = replace(
        plain, rate=plain.rate / shares[:, None, None], cpu=plain.cpu * shares[:, None, None]
    )
    rng = np.random.default_rng(9)
    n = rng.integers(1, 4, (6, 3, 1))
    b = rng.integers(0, len(plain.batch_sizes), (6, 3))
    np.testing.assert_allclose(
        evaluate(cascade, n, b).throughput, evaluate(scaled, n, b).throughput, rtol=1e-12
    )
    # one member, one instance, on a device of its own: T = its rate / its share
    single = problem(["m"], _profile({"m": curve(2)}), gpus(1), 64, shares=[0.25])
    one, top = np.ones((1, 1, 1), dtype=np.int64), np.array([[len(single.batch_sizes) - 1]])
    assert evaluate(single, one, top).throughput[0] == pytest.approx(4 * single.rate[0, 0, -1])
    # one member after another: each costs its share of the rows
    n1, b1 = n[0], b[0]
    per_row = 1 / sequential_throughput(cascade, n1, b1) - plain.host_latency / 64
    calls = (n1 * plain.call_rate.transpose(0, 2, 1)[np.arange(3), b1]).sum(axis=1)
    sizes = np.array(plain.batch_sizes, dtype=float)[b1]
    expected = (shares * (1 / calls + plain.sequential_call / sizes)).sum()
    assert per_row == pytest.approx(expected, rel=1e-9)


def test_a_member_few_rows_reach_gets_batches_that_fill_within_the_latency_target():
    """Its batches fill at its share of the ensemble's rate: at the same target it needs a
    smaller batch than with every row, and the fill time counted is batch / (share * T)."""
    members = {
        "first": curve(2, fixed_ms=2, per_sample_ms=0.1),
        "second": curve(2, fixed_ms=10, per_sample_ms=0.5),
    }
    devices, target_ms, share = gpus(2, memory_gb=16), 30.0, 0.25
    full = _plan(members, devices, latency_target_ms=target_ms)
    cascade = _plan(members, devices, shares={"second": share}, latency_target_ms=target_ms)
    unbound = _plan(members, devices, shares={"second": share})
    assert unbound.predicted_latency_ms["second"] > target_ms  # the target does bind
    throughput, batch = cascade.predicted_throughput, cascade.max_batch_size["second"]
    assert batch < full.max_batch_size["second"]
    fill_ms = batch / (share * throughput) * 1000
    latency_ms = fill_ms + members["second"].latency(batch)
    assert cascade.predicted_latency_ms["second"] == pytest.approx(latency_ms)
    assert latency_ms <= target_ms * (1 + 1e-9)
    assert all(v <= target_ms * (1 + 1e-9) for v in cascade.predicted_latency_ms.values())
    # the full ensemble's batch, filled at the share, would miss the target at this throughput
    blind = full.max_batch_size["second"] / (share * throughput) * 1000
    assert blind + members["second"].latency(full.max_batch_size["second"]) > target_ms
    assert sum(cascade.instances["second"].values()) >= 1
    # the problem's own account agrees
    p = problem(list(members), _profile(members), devices, 64, shares=[1.0, share])
    ids = [d.id for d in devices]
    n = np.array([[cascade.instances[m].get(i, 0) for i in ids] for m in members])
    b = np.array([p.batch_sizes.index(cascade.max_batch_size[m]) for m in members])
    assert member_latency(p, n, b, throughput)[1] * 1000 == pytest.approx(latency_ms)


@pytest.mark.parametrize(
    ("shares", "field", "message"),
    [
        ({"nobody": 0.5}, "shares.nobody", "no member named 'nobody'"),
        ({"dear_a": 0.0}, "shares.dear_a", r"in \(0, 1\]"),
        ({"dear_a": 1.5}, "shares.dear_a", r"in \(0, 1\]"),
        ({"dear_a": -0.2}, "shares.dear_a", r"in \(0, 1\]"),
        ({"dear_a": float("nan")}, "shares.dear_a", r"in \(0, 1\]"),
        ({"dear_a": "0.3"}, "shares.dear_a", r"in \(0, 1\]"),
        ({"dear_a": True}, "shares.dear_a", r"in \(0, 1\]"),
    ],
)
def test_bad_shares_are_refused_naming_the_member(shares, field, message):
    with pytest.raises(SpecError, match=message) as raised:
        _plan(TIERS, gpus(4, memory_gb=16), shares=shares, shares_file="calibration.json")
    assert raised.value.field == field
    assert raised.value.file == "calibration.json"


def test_a_problem_refuses_shares_outside_zero_to_one_or_of_the_wrong_length():
    for shares in ([1.0, 0.0], [1.0, 1.01], [1.0]):
        with pytest.raises(ValueError, match="shares"):
            problem(
                ["a", "b"], _profile({"a": curve(1), "b": curve(1)}), gpus(1), 64, shares=shares
            )


def test_a_cascade_plan_keeps_its_shares_in_its_file_its_prediction_and_its_table(tmp_path):
    devices = gpus(8, memory_gb=16)
    plan = _plan(TIERS, devices, shares={"dear_a": 0.2, "dear_b": 0.3})
    data = plan.to_dict()
    assert data["shares"] == {"cheap_a": 1.0, "cheap_b": 1.0, "dear_a": 0.2, "dear_b": 0.3}
    assert data["full_ensemble_throughput"] == pytest.approx(plan.full_ensemble_throughput, 1e-3)
    (tmp_path / "plan.json").write_text(plan.to_json())
    loaded = load_plan(tmp_path / "plan.json")
    assert loaded.to_json() == plan.to_json()
    assert predict(loaded, _profile(TIERS)) == pytest.approx(plan.predicted_throughput)
    # a plan without a cascade writes neither field, and reads back without them
    assert not {"shares", "full_ensemble_throughput"} & set(_plan(TIERS, devices).to_dict())
    console = Console(record=True, width=200)
    console.print(plan_table(plan))
    text = console.export_text()
    assert "share of rows" in text and "0.2" in text and "0.3" in text
    assert f"{plan.predicted_throughput:,.1f}" in text
    assert f"{plan.full_ensemble_throughput:,.1f}" in text


def test_a_later_tier_is_planned_at_the_batch_it_gets_the_rows_of_a_combiner_batch_reaching_it():
    """At a share of 0.05 a combiner batch of 64 rows sends about 3.2 of them on: the member is
    planned at the first measured size that holds them (4), never at a batch it never sees."""
    devices = gpus(4, memory_gb=16)
    plan = _plan(TIERS, devices, shares=dict.fromkeys(SECOND_TIER, 0.05))
    assert all(plan.max_batch_size[m] <= 4 for m in SECOND_TIER)
    assert max(plan.max_batch_size[m] for m in TIERS if m not in SECOND_TIER) > 4


def test_a_later_tier_measured_from_batch_8_on_keeps_its_batch_8():
    """Found by a hostile review: the cut-off came from every member's batch sizes together,
    so a member measured at 8 and 64 only, which 5% of 64 rows (4) reach, kept batches up to
    4, where it has none, and the plan failed ("runs at no batch size on any device")."""
    members = {
        "a": Curve(GB, 0, ((1, 2.0), (4, 3.0), (8, 4.0), (64, 20.0))),
        "c": Curve(GB, 0, ((8, 9.0), (64, 40.0))),
    }
    plan = _plan(members, gpus(2), shares={"c": 0.05})
    assert plan.max_batch_size["c"] == 8
    assert plan.predicted_throughput > 0


def test_a_later_tier_keeps_on_each_device_the_sizes_it_was_measured_at_there():
    """Found by a hostile review: the cut-off was shared by the devices, so 'c', measured at
    1 and 4 on a T4 (where it does not fit) and at 8 and 64 on an A100, lost every size on
    the A100 and could be placed nowhere."""
    devices = [
        Device("node0", "gpu", 0, "a100", 80 * GB, 80 * GB),
        Device("node0", "gpu", 1, "t4", 16 * GB, 16 * GB),
    ]
    profile = Profile(
        {
            "a": {"gpu": Curve(GB, 0, ((1, 2.0), (4, 3.0), (8, 4.0), (64, 20.0)))},
            "c": {
                "a100": Curve(GB, 0, ((8, 9.0), (64, 40.0))),
                "t4": Curve(20 * GB, 0, ((1, 30.0), (4, 60.0))),
            },
        }
    )
    plan = plan_ensemble("e", ["a", "c"], 64, profile, devices, shares={"c": 0.05})
    assert plan.instances["c"] and set(plan.instances["c"]) == {"node0/gpu0"}
    assert plan.max_batch_size["c"] == 8
