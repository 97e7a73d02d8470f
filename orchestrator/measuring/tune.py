"""``chorus tune``: the planner's climb with each candidate measured on the live Triton.

The search is :func:`orchestrator.planning.allocate.climb` itself, with a measuring evaluator
(as Model Analyzer separates its generators from its measurements): it starts from the cost model's
plan, measured; each step ranks the moves by the cost model and measures the most promising
few for real, applied through explicit model control (a config override, no restart) and
driven through the combiner with closed-loop load. The best measured candidate is taken if it
beats the current plan; the search stops when none does or the budget of measurements is
spent. After every measurement the best plan so far and the history are written to the
checkpoint, so an interrupted search keeps what it found.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orchestrator.deploying.up import Deployment
from orchestrator.errors import ChorusError
from orchestrator.measuring.bench import ensemble_load, random_rows
from orchestrator.planning.allocate import (
    Evaluation,
    Moves,
    Problem,
    SearchResult,
    climb,
    evaluate,
    evaluate_moves,
    problem,
)
from orchestrator.planning.plan import Plan, make_plan, with_data_path
from orchestrator.planning.profile import Profile
from orchestrator.planning.spec import Ensemble

__all__ = ["TuneResult", "tune"]


@dataclass(frozen=True)
class TuneResult:
    plan: Plan
    measured: float  # samples/s of the best plan
    measurements: int
    history: tuple[tuple[str, float, float], ...]  # (description, predicted, measured)


def tune(
    ensemble: Ensemble,
    start: Plan,
    profile: Profile,
    workdir: Path,
    checkpoint: Path,
    plan_out: Path,
    budget: int = 12,
    candidates_per_step: int = 2,
    seconds: float = 2.0,
    batch: int = 16,
    concurrency: int = 8,
    show_progress: bool = True,
) -> TuneResult:
    if len(ensemble.inputs) != 1:
        raise ChorusError("chorus tune drives single-input ensembles for now")
    (tensor,) = ensemble.inputs
    x = random_rows(tensor, max(256, batch))
    batch = min(batch, ensemble.max_batch_size)
    p = problem(
        start.members,
        profile,
        start.devices,
        ensemble.max_batch_size,
        latency_target_ms=start.latency_target_ms,
    )
    ids = [d.id for d in p.devices]
    history: list[tuple[str, float, float]] = []

    def arrays(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        n = np.array([[plan.instances[m].get(i, 0) for i in ids] for m in plan.members])
        b = np.array([p.batch_sizes.index(plan.max_batch_size[m]) for m in plan.members])
        return n, b

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    deployment = Deployment(ensemble, workdir, plan=start, workers=None)  # the plan's processes
    with deployment as endpoints, Progress(*columns, disable=not show_progress) as progress:
        task = progress.add_task("measuring the starting plan", total=budget)
        best: list[tuple[float, Plan]] = []  # the best measured so far

        def measure(n: np.ndarray, b: np.ndarray, predicted: float) -> float:
            plan = with_data_path(
                make_plan(ensemble.name, p, SearchResult(n, b, predicted, 0)), profile.host
            )
            what = _describe(best[0][1], plan) if best else "start (cost model's plan)"
            progress.update(task, description=f"measuring: {what}")
            deployment.apply(plan)
            load = ensemble_load(endpoints.ensemble, x, batch, concurrency, seconds)
            history.append((what, predicted, load.samples_per_s))
            progress.advance(task)
            if not best or load.samples_per_s > best[0][0]:
                best[:] = [(load.samples_per_s, plan)]
            _checkpoint(checkpoint, plan_out, best[0][1], best[0][0], history)
            return load.samples_per_s

        n, b = arrays(start)
        climb(
            p,
            (n, b),
            max_evaluations=budget,
            evaluator=_Measuring(measure, candidates_per_step, budget, history),
        )
        best_measured, best_plan = best[0]
        deployment.apply(best_plan)
    _checkpoint(checkpoint, plan_out, best_plan, best_measured, history)
    return TuneResult(best_plan, best_measured, len(history), tuple(history))


class _Measuring:
    """The planner's climb, scored on the live Triton: of each step's moves, the cost model's
    best few are measured; the rest count as not tried. No look-ahead (every look costs a
    measurement)."""

    lookahead = False

    def __init__(
        self,
        measure: Callable[[np.ndarray, np.ndarray, float], float],
        per_step: int,
        budget: int,
        history: list[tuple[str, float, float]],
    ) -> None:
        self._measure, self._per_step, self._budget, self._history = (
            measure,
            per_step,
            budget,
            history,
        )

    def current(self, p: Problem, n: np.ndarray, b: np.ndarray) -> Evaluation:
        predicted = float(evaluate(p, n[None], b[None]).throughput[0])
        got = self._measure(n, b, predicted)
        return Evaluation(
            np.array([got]), np.zeros(1, dtype=int), np.ones(1, dtype=bool), np.zeros(1)
        )

    def candidates(
        self, p: Problem, n: np.ndarray, b: np.ndarray, mv: Moves
    ) -> tuple[Evaluation, int]:
        e = evaluate_moves(p, n, b, mv)
        ranked = [int(k) for k in np.argsort(-e.throughput, kind="stable") if e.feasible[k]]
        room = max(0, self._budget - len(self._history))
        measured = np.zeros(len(mv))
        tried = np.zeros(len(mv), dtype=bool)
        for k in ranked[: min(self._per_step, room)]:
            n2, b2 = mv.apply(k, n, b)
            measured[k] = self._measure(n2, b2, float(e.throughput[k]))
            tried[k] = True
        none = np.zeros(len(mv))
        return Evaluation(measured, none.astype(int), tried, none), int(tried.sum())


def _describe(old: Plan, new: Plan) -> str:
    parts = []
    for m in new.members:
        if old.instances[m] != new.instances[m]:
            parts.append(
                f"{m} instances {_counts(old.instances[m])} -> {_counts(new.instances[m])}"
            )
        if old.max_batch_size[m] != new.max_batch_size[m]:
            parts.append(f"{m} batch {old.max_batch_size[m]} -> {new.max_batch_size[m]}")
    return "; ".join(parts) or "unchanged"


def _counts(per_device: Mapping[str, int]) -> str:
    return ",".join(f"{c}x{d.split('/')[-1]}" for d, c in sorted(per_device.items()))


def _checkpoint(
    path: Path, plan_out: Path, best: Plan, measured: float, history: list[tuple[str, float, float]]
) -> None:
    """The search so far, and the best plan as a plan file (``chorus up --plan``)."""
    plan_out.write_text(best.to_json())
    data = {
        "best_plan": best.to_dict(),
        "best_measured_samples_per_s": round(measured, 1),
        "measurements": [
            {"change": what, "predicted": round(pred, 1), "measured": round(got, 1)}
            for what, pred, got in history
        ],
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
