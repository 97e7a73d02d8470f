"""One hill-climb over allocations, scored by a pluggable :class:`Evaluator`.

From a start, :func:`climb` applies the single move (:mod:`orchestrator.planning.moves`) that
scores best, until none helps, looking two moves ahead where one is not enough. It knows
nothing of how moves are scored: the planner scores them with the cost model
(:data:`PREDICTED`); ``chorus tune`` measures them on the live Triton. Where to start it and
how to get out of its local optima is :mod:`orchestrator.planning.search`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from orchestrator.planning.cost_model import TOLERANCE, Evaluation, bottlenecks, evaluate
from orchestrator.planning.moves import Moves, evaluate_moves, moves
from orchestrator.planning.problem import Problem

__all__ = [
    "CHUNK_CELLS",
    "NEIGHBOURHOOD_CELLS",
    "PREDICTED",
    "Budget",
    "Evaluator",
    "SearchResult",
    "climb",
]

# moves x devices scored at once under a budget, which is checked between chunks: 16,384
# moves on 16 devices, a tenth of a second or so (a chunk of moves counted alone took 1.8 s
# on 1,024 GPUs, the budget 3 s)
CHUNK_CELLS = 16_384 * 16
# a step's neighbourhood at most (moves x 2 x devices entries, ~8 bytes each): beyond, the
# members' moves are built and scored in windows (hundreds of GPUs)
NEIGHBOURHOOD_CELLS = 16_000_000


class Budget:
    """What a search may spend, shared by all its climbs: ``evaluations`` (allocations scored,
    so that a budget gives the same plan on any machine) and ``seconds`` (wall time from the
    budget's creation); None: no limit. When it is spent, each climb keeps the best it has
    (a search always has its start's allocation in hand). ``on_progress(seconds, best)`` is
    told the best throughput found so far, once a second."""

    def __init__(
        self,
        evaluations: int | None = None,
        seconds: float | None = None,
        on_progress: Callable[[float, float], None] | None = None,
    ) -> None:
        self.evaluations = evaluations
        self.seconds = seconds
        self.spent = 0
        self.best = 0.0
        self.cut = False  # some part of the search stopped for it
        self._began = time.perf_counter()
        self._on_progress = on_progress
        self._next_report = 1.0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._began

    @property
    def exhausted(self) -> bool:
        if self.evaluations is not None and self.spent >= self.evaluations:
            return True
        return self.seconds is not None and self.elapsed >= self.seconds

    def charge(self, evaluations: int, best: float | None = None) -> None:
        """Count ``evaluations`` spent (and a better throughput found, if any)."""
        self.spent += evaluations
        if best is not None:
            self.best = max(self.best, best)
        if self._on_progress is not None and self.elapsed >= self._next_report:
            self._next_report = self.elapsed + 1.0
            self._on_progress(self.elapsed, self.best)

    def share(self, fraction: float) -> Budget:
        """A part of what is left, for one part of the search: spent on this budget too, and
        spent itself when this one is or when it took ``fraction`` of what was left."""
        part = _Part(self)
        if self.evaluations is not None:
            part.evaluations = self.spent + int(fraction * (self.left() or 0))
        if self.seconds is not None:
            part.seconds = self.elapsed + fraction * max(0.0, self.seconds - self.elapsed)
        return part

    def stop(self) -> bool:
        """Whether a part of the search must stop now (noted as ``cut`` if so)."""
        if self.exhausted:
            self.cut = True
        return self.cut and self.exhausted

    def left(self) -> int | None:
        """Evaluations left (None: no count)."""
        return None if self.evaluations is None else max(0, self.evaluations - self.spent)


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


class _Part(Budget):
    """A budget's share: counts what it spends on the whole too (:meth:`Budget.share`)."""

    def __init__(self, whole: Budget) -> None:
        super().__init__()
        self._whole = whole
        self.spent = whole.spent
        self._began = whole._began

    @property
    def exhausted(self) -> bool:
        return self._whole.exhausted or super().exhausted

    def charge(self, evaluations: int, best: float | None = None) -> None:
        super().charge(evaluations, best)
        self._whole.charge(evaluations, best)

    def stop(self) -> bool:
        stopping = super().stop()
        if stopping:
            self._whole.cut = True
        return stopping


def climb(
    p: Problem,
    start: tuple[np.ndarray, np.ndarray],
    max_steps: int = 10_000,
    lookahead_budget: int = 20_000,
    max_evaluations: int | None = None,
    evaluator: Evaluator = PREDICTED,
    calm: bool = False,
    budget: Budget | None = None,
    focus: bool = False,
) -> SearchResult:
    """Hill-climb from ``start`` by the best single move, until no move helps (or after
    ``max_evaluations``, or when the search's ``budget`` is spent, keeping the best found:
    under a budget a step's moves are scored in chunks, the budget checked between them, so
    no step runs past it by more than a chunk of :data:`CHUNK_CELLS`).

    Where no single move helps, the most promising moves (as many as ``lookahead_budget``
    evaluations allow, 2 to 16) are each followed by their best next move: memory-bound
    allocations often need a step down (a smaller batch, an instance removed) before the step
    up. The search stops when two moves cannot help. With ``focus`` (the cost model's
    evaluator only), a step scores just the moves of the members at or near the bottleneck
    (:func:`~orchestrator.planning.cost_model.bottlenecks`), and every move only when none of
    those helps.
    """
    n, b = start
    current = evaluator.current(p, n, b)
    best = _score(current, 0)
    evaluations = 1
    if budget is not None:
        budget.charge(1, best[0])

    def scored(n: np.ndarray, b: np.ndarray, mv: Moves) -> Evaluation | None:
        """The moves' scores; None if the budget ran out first."""
        nonlocal evaluations
        if budget is None:
            e, cost = evaluator.candidates(p, n, b, mv)
            evaluations += cost
            return e
        parts = []
        chunk = max(1, CHUNK_CELLS // len(p.devices))
        for lo in range(0, len(mv), chunk):
            if budget.stop():
                return None
            e, cost = evaluator.candidates(p, n, b, mv.slice(lo, lo + chunk))
            evaluations += cost
            budget.charge(cost)
            parts.append(e)
        return _joined(parts)

    def step(
        n: np.ndarray, b: np.ndarray, only: np.ndarray | None, turn: int
    ) -> tuple[Moves, Evaluation, int | None, bool] | None:
        """The best move among those of ``only`` (None: every member), window by window
        where they are too many to build at once (the first window rotating with ``turn``),
        until one helps: (its window's moves and scores, the pick or None, whether it took
        more than one window); None if the budget ran out."""
        windows = _windows(p, n, only)
        found = None
        for k in range(len(windows)):
            mv = moves(n, b, len(p.batch_sizes), windows[(turn + k) % len(windows)])
            e = scored(n, b, mv)
            if e is None:
                return None
            found = (mv, e, _best_step(e, best, calm), len(windows) > 1)
            if found[2] is not None:
                break
        return found

    for turn in range(max_steps):
        if max_evaluations is not None and evaluations >= max_evaluations:
            break
        if budget is not None and budget.stop():
            break
        only = bottlenecks(p, n, b) if focus else None
        got = step(n, b, only, turn)
        if got is None:
            break
        mv, e, pick, windowed = got
        if pick is None and only is not None and not only.all():  # every move, then
            got = step(n, b, None, turn)
            if got is None:
                break
            mv, e, pick, windowed = got
        if pick is not None:
            n, b = mv.apply(pick, n, b)
            best = _score(e, pick)
            if budget is not None:
                budget.charge(0, best[0])
            continue
        if not evaluator.lookahead or lookahead_budget <= 0 or windowed:
            break  # (two moves ahead over windows would build each window's neighbourhoods)
        # stuck: look two moves ahead from the most promising first moves
        t = np.where(e.feasible, e.throughput, -1.0)
        width = min(16, max(2, lookahead_budget // len(mv)), int(e.feasible.sum()))
        found = None
        for first in np.lexsort((e.congestion, e.binding, -t))[:width]:
            n1, b1 = mv.apply(int(first), n, b)
            mv2 = moves(n1, b1, len(p.batch_sizes))
            e2 = scored(n1, b1, mv2)
            if e2 is None:
                break
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


def _windows(p: Problem, n: np.ndarray, only: np.ndarray | None) -> list[np.ndarray | None]:
    """The members whose moves one step scores, as masks: ``only`` itself, unless their
    neighbourhood (about (instances + batch sizes + 1) x D moves a member, each D wide) would
    exceed :data:`NEIGHBOURHOOD_CELLS`; then consecutive groups of them that do not."""
    members, devices = n.shape
    chosen = np.flatnonzero(only) if only is not None else np.arange(members)
    cells = (n[chosen].sum(axis=1) + len(p.batch_sizes) + 1) * devices * devices * 2
    if cells.sum() <= NEIGHBOURHOOD_CELLS:
        return [only]
    groups: list[np.ndarray | None] = []
    start, total = 0, 0
    for i, c in enumerate(cells):
        if i > start and total + c > NEIGHBOURHOOD_CELLS:
            groups.append(_mask(members, chosen[start:i]))
            start, total = i, 0
        total += int(c)
    groups.append(_mask(members, chosen[start:]))
    return groups


def _mask(members: int, chosen: np.ndarray) -> np.ndarray:
    mask = np.zeros(members, dtype=bool)
    mask[chosen] = True
    return mask


def _joined(parts: list[Evaluation]) -> Evaluation:
    if len(parts) == 1:
        return parts[0]
    return Evaluation(
        *(np.concatenate([getattr(e, f) for e in parts]) for f in Evaluation.__dataclass_fields__)
    )


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
