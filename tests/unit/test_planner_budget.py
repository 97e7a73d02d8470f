"""The planner within a budget (issue 20): on a problem too large to search to the end, it
stops when its evaluations are spent, with a feasible plan, the same one every time; the
focused moves are the full neighbourhood's, restricted to the bottleneck members."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from orchestrator.errors import InfeasibleError
from orchestrator.planning.allocate import evaluate, greedy, moves, problem
from orchestrator.planning.climb import CHUNK_CELLS, Budget, climb
from orchestrator.planning.cost_model import bottlenecks
from orchestrator.planning.placement import worst_fit
from orchestrator.planning.plan import plan_ensemble
from orchestrator.planning.profile import Curve, Profile
from tests.unit.test_allocate import GB, curve, gpus


def _large(members: int = 100, devices: int = 16, seed: int = 3):
    """Members of 0.5-2 GB and varied speed on 16 GB GPUs: memory-bound, as a large zoo is."""
    rng = np.random.default_rng(seed)
    curves = {
        f"m{i}": curve(rng.uniform(0.5, 2), rng.uniform(1, 10), rng.uniform(0.05, 1.0))
        for i in range(members)
    }
    return list(curves), Profile({m: {"gpu": c} for m, c in curves.items()}), gpus(devices, 16)


def test_the_search_stops_at_its_evaluation_budget_with_a_feasible_plan():
    names, profile, devices = _large()
    p = problem(names, profile, devices, 64)
    unbounded_guess = 20_000
    budget = Budget(evaluations=unbounded_guess)
    found = greedy(p, budget=budget)
    assert budget.exhausted  # this search wanted more than the budget
    assert budget.spent <= unbounded_guess + CHUNK_CELLS // 16  # it overran by a chunk at most
    e = evaluate(p, found.instances[None], found.batch[None])
    assert e.feasible[0] and e.throughput[0] == found.throughput > 0
    used = (found.instances * p.memory_by_batch[np.arange(len(names)), found.batch]).sum(axis=0)
    assert (used <= p.capacity).all()  # never more on a device than its memory
    assert (found.instances.sum(axis=1) >= 1).all()  # every member served


def test_a_plan_under_an_evaluation_budget_is_the_same_every_time_and_more_budget_is_no_worse():
    names, profile, devices = _large(60)

    def plan(evaluations: int):
        # evaluations alone, not the default time limit: the same on a loaded machine
        return plan_ensemble(
            "e", names, 64, profile, devices, evaluations=evaluations, time_limit_s=None
        )

    first, again = plan(15_000), plan(15_000)
    assert first.to_dict() == again.to_dict()
    assert plan(60_000).predicted_throughput >= first.predicted_throughput


def test_the_focused_moves_are_the_full_moves_of_the_bottleneck_members():
    names, profile, devices = _large(30)
    p = problem(names, profile, devices, 64)
    n, b = worst_fit(p)
    only = bottlenecks(p, n, b)
    assert only is not None and 0 < only.sum() < len(names)
    full, focused = moves(n, b, len(p.batch_sizes)), moves(n, b, len(p.batch_sizes), only)

    def keys(mv):
        return {
            (tuple(mv.member[k]), mv.row[k].tobytes(), tuple(mv.batch[k])) for k in range(len(mv))
        }

    # a move of the full neighbourhood that changes some bottleneck member's row
    touches = only[np.minimum(full.member, len(names) - 1)] & (full.member < len(names))
    wanted = {
        (tuple(full.member[k]), full.row[k].tobytes(), tuple(full.batch[k]))
        for k in np.flatnonzero(touches.any(axis=1))
    }
    assert keys(focused) == wanted


def test_a_limit_no_member_holds_leaves_the_focused_climb_every_move():
    """The combiner's CPU, counted on a device holding no instance, limits the throughput: no
    member is a bottleneck, and the climb under a budget scores every move (it had crashed on
    an empty set of moves)."""
    names, profile, devices = _large(12, 64)
    p = problem(names, profile, devices, 64)
    n, b = worst_fit(p)
    empty = int(np.flatnonzero(n.sum(axis=0) == 0)[-1])
    alone = float(evaluate(p, n[None], b[None]).throughput[0])
    q = replace(p, host_device=empty, host_cpu=2.0 / alone)  # caps it at half of that
    assert bottlenecks(q, n, b) is None
    found = climb(q, (n, b), budget=Budget(evaluations=50_000), focus=True)
    assert found.throughput == pytest.approx(alone / 2)


def test_a_budget_spent_before_any_plan_meets_the_latency_target_says_so():
    names, profile, devices = _large(12, 4)
    with pytest.raises(InfeasibleError, match="budget ran out before it found a plan"):
        plan_ensemble(
            "e", names, 64, profile, devices, latency_target_ms=60, evaluations=1, time_limit_s=None
        )
    found = plan_ensemble("e", names, 64, profile, devices, latency_target_ms=60)
    assert found.predicted_throughput > 0  # the target can be met, given the search


def test_a_target_some_member_misses_at_batch_1_is_refused_before_the_search(monkeypatch):
    """The search of 100 members on 16 GPUs takes its whole time limit; a target that one
    member misses for a single sample on its fastest device is known to fail before it."""
    names, profile, devices = _large()
    profile = Profile({**profile.members, "slow": {"gpu": curve(1, fixed_ms=80)}})

    def no_search(*args, **kwargs):
        raise AssertionError("the search ran for a target no plan can meet")

    monkeypatch.setattr("orchestrator.planning.plan.greedy", no_search)
    with pytest.raises(InfeasibleError, match=r"latency target of 60 ms: member 'slow' takes 80"):
        plan_ensemble("e", [*names, "slow"], 64, profile, devices, latency_target_ms=60)


def test_a_member_measured_from_batch_8_on_is_judged_at_batch_8():
    """Found by a hostile review: the early refusal read every member at the smallest batch
    size of all (1), where one measured from 8 on has no time (inf), and refused a target of
    100 ms its 9 ms meet; a target of 5 ms names that batch."""
    profile = Profile(
        {
            "a": {"gpu": Curve(GB, 0, ((1, 5.0), (8, 9.0), (64, 40.0)))},
            "b": {"gpu": Curve(GB, 0, ((8, 9.0), (64, 40.0)))},
        }
    )
    found = plan_ensemble("e", ["a", "b"], 64, profile, gpus(2), latency_target_ms=100)
    assert found.predicted_throughput > 0
    with pytest.raises(InfeasibleError, match=r"'b' takes 9.0 ms for a batch of 8 on"):
        plan_ensemble("e", ["a", "b"], 64, profile, gpus(2), latency_target_ms=7)


def test_a_neighbourhood_too_large_to_build_at_once_is_scored_in_windows(monkeypatch):
    """Found by a hostile run: on 100 members x 256 GPUs one step built 450,000 moves 256
    wide (5 GB, 20 s past a 3 s budget). Beyond NEIGHBOURHOOD_CELLS a step builds and scores
    the members' moves a window at a time, each member in one window; the climb still climbs."""
    import orchestrator.planning.climb as climbing

    names, profile, devices = _large(30, 16)
    p = problem(names, profile, devices, 64)
    n, b = worst_fit(p)
    placed = float(evaluate(p, n[None], b[None]).throughput[0])
    monkeypatch.setattr(climbing, "NEIGHBOURHOOD_CELLS", 100_000)
    windows = climbing._windows(p, n, None)
    assert len(windows) > 1
    assert (np.sum(windows, axis=0) == 1).all()  # every member in exactly one window

    def cells(only):
        return len(moves(n, b, len(p.batch_sizes), only)) * 2 * len(devices)

    assert cells(None) > 100_000  # the whole neighbourhood would not fit
    assert all(cells(w) <= 2 * 100_000 for w in windows)  # each window about within it
    found = climb(p, (n, b), budget=Budget(evaluations=20_000))
    assert found.throughput > placed
    e = evaluate(p, found.instances[None], found.batch[None])
    assert e.feasible[0] and e.throughput[0] == found.throughput


def test_a_budget_is_checked_between_chunks_of_moves_times_devices():
    """Found on 4 members x 1,024 GPUs: a chunk was 16,384 moves whatever the devices, so
    one chunk of 9,009 moves each 1,024 wide took 1.8 s, and the 3 s search took 3.9. A chunk
    is now CHUNK_CELLS moves x devices; the climb still climbs."""
    from orchestrator.planning.climb import PREDICTED

    names, profile, devices = _large(4, 1024)
    p = problem(names, profile, devices, 64)
    n, b = worst_fit(p)
    placed = float(evaluate(p, n[None], b[None]).throughput[0])
    scored: list[int] = []

    class Counted:  # the cost model, counting the moves each call scores
        lookahead = True
        current = PREDICTED.current

        def candidates(self, p, n, b, mv):
            scored.append(len(mv))
            return PREDICTED.candidates(p, n, b, mv)

    found = climb(p, (n, b), evaluator=Counted(), budget=Budget(evaluations=30_000))
    assert sum(scored) > CHUNK_CELLS // len(devices)  # more than one chunk's worth was scored
    assert max(scored) * len(devices) <= CHUNK_CELLS
    assert found.throughput > placed
