"""One hill-climb over allocations, scored by a pluggable :class:`Evaluator`.

From a start, :func:`climb` applies the single move (:mod:`orchestrator.planning.moves`) that
scores best, until none helps, looking two moves ahead where one is not enough. It knows
nothing of how moves are scored: the planner scores them with the cost model
(:data:`PREDICTED`); ``chorus tune`` measures them on the live Triton. Where to start it and
how to get out of its local optima is :mod:`orchestrator.planning.search`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from orchestrator.planning.cost_model import TOLERANCE, Evaluation, evaluate
from orchestrator.planning.moves import Moves, evaluate_moves, moves
from orchestrator.planning.problem import Problem

__all__ = ["PREDICTED", "Evaluator", "SearchResult", "climb"]


@dataclass(frozen=True)
class SearchResult:
    """An allocation a search found, its score, and the evaluations it took."""

    instances: np.ndarray  # (M, D)
    batch: np.ndarray  # (M,) indices into Problem.batch_sizes
    throughput: float
    evaluations: int


class Evaluator(Protocol):
    """How :func:`climb` scores allocations: the cost model (:data:`PREDICTED`), or anything
    else with the same answers (``chorus tune`` measures on the live Triton)."""

    lookahead: bool  # whether climb may look two moves ahead when stuck

    def current(self, p: Problem, n: np.ndarray, b: np.ndarray) -> Evaluation:
        """The starting allocation's score, as a one-element Evaluation."""
        ...

    def candidates(
        self, p: Problem, n: np.ndarray, b: np.ndarray, mv: Moves
    ) -> tuple[Evaluation, int]:
        """Scores of the moves (infeasible where not scored) and what they cost."""
        ...


class _Predicted:
    lookahead = True

    def current(self, p: Problem, n: np.ndarray, b: np.ndarray) -> Evaluation:
        return evaluate(p, n[None], b[None])

    def candidates(
        self, p: Problem, n: np.ndarray, b: np.ndarray, mv: Moves
    ) -> tuple[Evaluation, int]:
        return evaluate_moves(p, n, b, mv), len(mv)


PREDICTED: Evaluator = _Predicted()


def climb(
    p: Problem,
    start: tuple[np.ndarray, np.ndarray],
    max_steps: int = 10_000,
    lookahead_budget: int = 20_000,
    max_evaluations: int | None = None,
    evaluator: Evaluator = PREDICTED,
    calm: bool = False,
) -> SearchResult:
    """Hill-climb from ``start`` by the best single move, until no move helps (or after
    ``max_evaluations``, keeping the best found).

    Where no single move helps, the most promising moves (as many as ``lookahead_budget``
    evaluations allow, 2 to 16) are each followed by their best next move: memory-bound
    allocations often need a step down (a smaller batch, an instance removed) before the step
    up. The search stops when two moves cannot help.
    """
    n, b = start
    current = evaluator.current(p, n, b)
    best = _score(current, 0)
    evaluations = 1
    for _ in range(max_steps):
        if max_evaluations is not None and evaluations >= max_evaluations:
            break
        mv = moves(n, b, len(p.batch_sizes))
        e, cost = evaluator.candidates(p, n, b, mv)
        evaluations += cost
        pick = _best_step(e, best, calm)
        if pick is not None:
            n, b = mv.apply(pick, n, b)
            best = _score(e, pick)
            continue
        if not evaluator.lookahead or lookahead_budget <= 0:
            break
        # stuck: look two moves ahead from the most promising first moves
        t = np.where(e.feasible, e.throughput, -1.0)
        width = min(16, max(2, lookahead_budget // len(mv)), int(e.feasible.sum()))
        found = None
        for first in np.lexsort((e.congestion, e.binding, -t))[:width]:
            n1, b1 = mv.apply(int(first), n, b)
            mv2 = moves(n1, b1, len(p.batch_sizes))
            e2, cost = evaluator.candidates(p, n1, b1, mv2)
            evaluations += cost
            t2 = np.where(e2.feasible, e2.throughput, -1.0)
            second = int(np.argmax(t2))
            if t2[second] > best[0] * (1 + TOLERANCE) and (
                found is None or t2[second] > found[0][0]
            ):
                found = (_score(e2, second), *mv2.apply(second, n1, b1))
        if found is None:
            break
        best, n, b = found
    return SearchResult(n, b, best[0], evaluations)


def _score(e: Evaluation, k: int) -> tuple[float, int, float]:
    return float(e.throughput[k]), int(e.binding[k]), float(e.congestion[k])


def _best_step(e: Evaluation, best: tuple[float, int, float], calm: bool = False) -> int | None:
    """The move raising throughput most (the fewest binding constraints among equals); else
    one keeping it while binding fewer constraints; else one keeping both while less
    congested; else None."""
    best_t, best_bind, best_c = best
    t = np.where(e.feasible, e.throughput, -1.0)
    if (t > best_t * (1 + TOLERANCE)).any():
        near = t >= t.max() * (1 - TOLERANCE)
    else:
        same = t >= best_t * (1 - TOLERANCE)
        near = same & (e.binding < best_bind)
        if not near.any():
            if not calm:
                return None
            calmer = same & (e.binding == best_bind) & (e.congestion < best_c * (1 - _CALMER))
            if not calmer.any():
                return None
            return int(np.flatnonzero(calmer)[np.argmin(e.congestion[calmer])])
    return int(np.flatnonzero(near)[np.argmin(e.binding[near])])


_CALMER = 1e-6  # a move at equal throughput must cut congestion by this much (relative)
