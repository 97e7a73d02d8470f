"""The planner's search: where to start climbs, and how to get out of their local optima.

:func:`greedy` climbs (:func:`orchestrator.planning.climb.climb`) from the balanced start
(:mod:`orchestrator.planning.balance`), from a small group's plan tiled over many identical
devices, and at the paper's scale from the worst-fit placement at several batch sizes, then
runs iterated local search on the best: kick (a few random moves), climb again, keep what is
better. :func:`exhaustive` tries every allocation of a small problem, the reference the
planner benchmark measures the search against.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from orchestrator.errors import InfeasibleError
from orchestrator.planning.balance import balanced
from orchestrator.planning.climb import Budget, SearchResult, climb
from orchestrator.planning.cost_model import TOLERANCE, bottlenecks, evaluate
from orchestrator.planning.moves import Moves, evaluate_moves, moves
from orchestrator.planning.placement import worst_fit
from orchestrator.planning.problem import Problem

__all__ = [
    "FOCUS_CELLS",
    "KICK_EVALUATIONS",
    "KICK_PATIENCE",
    "UNIFORM_STARTS",
    "exhaustive",
    "greedy",
]


def greedy(
    p: Problem,
    start: tuple[np.ndarray, np.ndarray] | None = None,
    restart_evaluations: int = 50_000,
    effort: float = 1.0,
    seed: int = 0,
    budget: Budget | None = None,
) -> SearchResult:
    """The planner's search. From ``start`` it is one climb. By default, climbs from:

    * the balanced start (:func:`orchestrator.planning.balance.balanced`: batch sizes within
      a memory budget, every device about as busy as the others; its random orders from
      ``seed``), within half the budget where a tiled start follows;
    * on many identical devices, up to :data:`FOCUS_CELLS` members x devices, a small
      group's plan tiled over them (:func:`_tiled`, which searches the group);
    * at the paper's scale (up to :data:`FOCUS_CELLS`), or where nothing else fits: the
      worst-fit placement with each member at its most efficient batch size, and, without a
      tiled plan, with every member at each of the :data:`UNIFORM_STARTS` largest batch sizes
      that fit (cut at ``restart_evaluations`` unless a latency target needs them;
      memory-bound problems climb to different optima from each);

    then iterated local search on the two best, in turn: each chain's best is kicked (a few
    random moves) and climbed again; every other climb also takes moves that keep the
    throughput and relieve the constraints nearest to binding (``calm``). It stops after
    ``effort`` x :data:`KICK_EVALUATIONS` evaluations (fewer on more than four devices, where
    each costs more; none after a tiled start, whose group had them, nor beyond
    :data:`FOCUS_CELLS`) or when every chain went ``effort`` x :data:`KICK_PATIENCE` kicks
    without finding better.

    A climb alone stops at a local optimum; the starts and the kicks get out of most
    (benchmarks/results/paper_scale.md and planner_scale.md measure what is left). Under a
    ``budget`` (evaluations, seconds) every part of it stops when the budget is spent, and
    the best allocation found so far is the answer (a climb always has its start in hand,
    and the worst-fit placement, scored first, is the answer if nothing better was found in
    time). Deterministic for a ``seed`` (and an evaluation budget)."""
    focus = len(p.members) * len(p.devices) > FOCUS_CELLS
    if start is not None:
        return climb(p, start, budget=budget, focus=focus)
    n, b = worst_fit(p)  # raises InfeasibleError, naming the member, where nothing fits

    def spent_up() -> bool:
        return budget is not None and budget.stop()

    starts = []
    # worst-fit as it is, scored: the answer if the budget is spent before anything better
    e = evaluate(p, n[None], b[None])
    placed = SearchResult(n, b, float(e.throughput[0]), 1)
    if budget is not None:
        budget.charge(1, placed.throughput)
    # the balanced start within a third of the time (its candidates may all miss a latency
    # target): the climbs need the rest
    until = None
    if budget is not None and budget.seconds is not None:
        until = budget.elapsed + max(0.0, budget.seconds - budget.elapsed) / 3
    even = balanced(
        p,
        stop=lambda: (
            spent_up() or (until is not None and budget is not None and budget.elapsed > until)
        ),
        seed=seed,
    )
    # on many identical devices, a tiled start follows (half the budget is left for it), up
    # to FOCUS_CELLS: beyond, the balanced one was better in every case measured, and the
    # group's search took a third of the time (without a balanced start, worst-fit climbs)
    tiles = _identical(p) and len(p.devices) > 4 and not focus
    if even is not None:
        if budget is not None:
            budget.charge(even.evaluations, even.throughput)
        part = budget.share(0.5) if budget is not None and tiles else budget
        climbed = climb(p, (even.instances, even.batch), budget=part, focus=focus)
        starts.append(replace(climbed, evaluations=climbed.evaluations + even.evaluations))
    tiled = _tiled(p, effort, seed, budget) if tiles and not spent_up() else None
    if tiled is not None:  # a spent budget leaves the climb its start
        starts.append(climb(p, tiled[0], budget=budget, focus=focus))
    if (not focus or not starts) and not spent_up():
        cap = restart_evaluations if p.latency_target is None else None
        starts.append(climb(p, (n, b), budget=budget, focus=focus))
        if tiled is None:
            fits = [
                k
                for k in range(len(p.batch_sizes))
                if evaluate(p, n[None], np.full_like(b, k)[None]).feasible[0]
            ]
            for k in fits[-UNIFORM_STARTS:]:
                if spent_up():
                    break
                uniform = (n, np.full_like(b, k))
                starts.append(climb(p, uniform, max_evaluations=cap, budget=budget, focus=focus))
    if not any(r.throughput >= placed.throughput for r in starts):
        starts.append(placed)  # nothing climbed beyond worst-fit before the budget ran out
    spent = sum(r.evaluations for r in starts)
    starts = sorted(starts, key=lambda r: -r.throughput)[:2]  # stable: the first among equals
    rng = np.random.default_rng(seed)
    # iterated local search from each start in turn
    chains = list(starts)
    # an evaluation costs about D: the same time, not the same count, on more devices; on
    # many identical devices the group's search (and its kicks) took the time
    kicks = effort * KICK_EVALUATIONS * 4 / max(4, len(p.devices))
    if tiled is not None or focus:
        kicks = 0.0
    kick_until = spent + int(kicks)
    idle = [0] * len(chains)
    patience = int(effort * KICK_PATIENCE)
    turn = 0
    while spent < kick_until and min(idle) < patience:
        if spent_up():
            break
        i = turn % len(chains)
        turn += 1
        base = chains[i]
        if base.throughput <= 0 or idle[i] >= patience:
            idle[i] = patience
            continue
        kicked, cost = _kick(p, base.instances, base.batch, rng, focus)
        if budget is not None:
            budget.charge(cost)
        found = climb(
            p,
            kicked,
            max_evaluations=max(1, kick_until - spent - cost),
            lookahead_budget=0,
            calm=turn % 2 == 0,
            budget=budget,
            focus=focus,
        )
        spent += cost + found.evaluations
        idle[i] += 1
        if found.throughput > base.throughput * (1 + TOLERANCE):
            chains[i], idle[i] = found, 0
    best = max(chains, key=lambda r: r.throughput)  # the first among equals
    return SearchResult(best.instances, best.batch, best.throughput, spent)


def _identical(p: Problem) -> bool:
    """Whether every device is the same to the cost model (rates, memory, capacity, lanes)."""
    return bool(
        (p.rate == p.rate[:, :1]).all()
        and (p.memory == p.memory[:, :1]).all()
        and (p.capacity == p.capacity[0]).all()
        and (p.lanes == p.lanes[0]).all()
    )


def _tiled(
    p: Problem, effort: float, seed: int, budget: Budget | None = None
) -> tuple[tuple[np.ndarray, np.ndarray], int] | None:
    """On D identical devices, the plan for the smallest group of them (a divisor of D, at
    least four) that holds every member, repeated D / group times: as good per device as the
    group's, and a start the search could not reach one move at a time on many devices. The
    group is planned at a fifth of the effort."""
    devices = len(p.devices)
    if not _identical(p):
        return None
    for group in (g for g in range(4, devices) if devices % g == 0):
        host = p.host_device if p.host_device < group else -1
        sub = replace(
            p,
            devices=p.devices[:group],
            rate=p.rate[:, :group],
            memory=p.memory[:, :group],
            capacity=p.capacity[:group],
            lanes=p.lanes[:group],
            call_rate=None if p.call_rate is None else p.call_rate[:, :group],
            cpu=None if p.cpu is None else p.cpu[:, :group],
            host_device=host,
        )
        try:
            found = greedy(sub, effort=effort / 5, seed=seed, budget=budget)
        except InfeasibleError:
            continue
        if found.throughput > 0:
            tiles = devices // group
            return (np.tile(found.instances, (1, tiles)), found.batch), tiles
    return None


UNIFORM_STARTS = 3  # the largest batch sizes that fit for every member, tried as starts
# members x devices beyond which a climb scores the bottleneck members' moves first (the
# paper's scale, 12 x 16, scores every move)
FOCUS_CELLS = 256
KICK_EVALUATIONS = 100_000  # evaluations of iterated local search at effort 1
KICK_PATIENCE = 20  # kicks in a row that find nothing better end it (at effort 1)


def _kick(
    p: Problem, n: np.ndarray, b: np.ndarray, rng: np.random.Generator, focus: bool = False
) -> tuple[tuple[np.ndarray, np.ndarray], int]:
    """2-4 random moves that keep the allocation feasible (any throughput): each drawn from
    a random sample of the moves (with ``focus``, of the bottleneck members' moves), so a kick
    costs little next to a climb."""
    cost = 0
    for _ in range(int(rng.integers(_KICK_MOVES[0], _KICK_MOVES[1] + 1))):
        only = bottlenecks(p, n, b) if focus else None
        mv = moves(n, b, len(p.batch_sizes), only)
        pick = rng.choice(len(mv), size=min(len(mv), _KICK_SAMPLE), replace=False)
        sample = Moves(mv.member[pick], mv.row[pick], mv.batch[pick])
        e = evaluate_moves(p, n, b, sample)
        cost += len(sample)
        ok = np.flatnonzero(e.feasible)
        if not len(ok):
            break
        n, b = sample.apply(int(rng.choice(ok)), n, b)
    return (n, b), cost


_KICK_SAMPLE = 64
_KICK_MOVES = (2, 4)  # random moves in one kick, at least and at most


def exhaustive(p: Problem, max_instances: int = 3, chunk: int = 200_000) -> SearchResult:
    """The best allocation by trying all of them (small problems only: for the benchmark)."""
    members, devices = len(p.members), len(p.devices)
    cells = members * devices
    grid = np.stack(
        np.meshgrid(*[np.arange(max_instances + 1)] * cells, indexing="ij"), -1
    ).reshape(-1, members, devices)
    grid = grid[(grid.sum(axis=2) > 0).all(axis=1)]
    batches = np.stack(
        np.meshgrid(*[np.arange(len(p.batch_sizes))] * members, indexing="ij"), -1
    ).reshape(-1, members)
    best = SearchResult(grid[0], batches[0], -1.0, 0)
    total = 0
    pairs = len(grid) * len(batches)
    for start in range(0, pairs, chunk):
        idx = np.arange(start, min(start + chunk, pairs))
        ns, bs = grid[idx // len(batches)], batches[idx % len(batches)]
        e = evaluate(p, ns, bs)
        total += len(idx)
        t = np.where(e.feasible, e.throughput, -1.0)
        k = int(np.argmax(t))
        if t[k] > best.throughput:
            best = SearchResult(ns[k], bs[k], float(t[k]), 0)
    return SearchResult(best.instances, best.batch, best.throughput, total)
