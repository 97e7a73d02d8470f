"""``chorus tune``: the greedy search with each candidate measured on the live Triton.

Starts from the cost model's plan, measured. Each step takes the moves of the greedy
(:func:`orchestrator.allocate.moves`), ranks them by the cost model, and measures the most
promising few for real: applied through explicit model control (a config override, no
restart), driven through the combiner with closed-loop load. The best measured candidate is
taken if it beats the current plan; the search stops when none does or the budget of
measurements is spent. After every measurement the best plan so far and the history are
written to the checkpoint, so an interrupted search keeps what it found.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tritonclient.utils import triton_to_np_dtype

from .allocate import SearchResult, evaluate_moves, moves, problem
from .bench import ensemble_load
from .errors import ChorusError
from .plan import Plan, make_plan
from .profile import Profile
from .spec import Ensemble
from .up import Deployment

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
    rng = np.random.default_rng(0)
    shape = (max(256, batch), *(d if d > 0 else 1 for d in tensor.shape))
    x = rng.random(shape).astype(triton_to_np_dtype(tensor.dtype))
    batch = min(batch, ensemble.max_batch_size)
    p = problem(start.members, profile, start.devices, ensemble.max_batch_size)
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
    deployment = Deployment(ensemble, workdir, plan=start)
    with deployment as endpoints, Progress(*columns, disable=not show_progress) as progress:
        task = progress.add_task("measuring the starting plan", total=budget)

        def measure(plan: Plan, description: str, predicted: float) -> float:
            deployment.apply(plan)
            load = ensemble_load(endpoints.ensemble, x, batch, concurrency, seconds)
            history.append((description, predicted, load.samples_per_s))
            progress.advance(task)
            return load.samples_per_s

        best, best_measured = (
            start,
            measure(start, "start (cost model's plan)", start.predicted_throughput),
        )
        _checkpoint(checkpoint, plan_out, best, best_measured, history)
        while len(history) < budget:
            n, b = arrays(best)
            mv = moves(n, b, len(p.batch_sizes))
            e = evaluate_moves(p, n, b, mv)
            ranked = [
                int(k)
                for k in np.argsort(-np.where(e.feasible, e.throughput, -1.0), kind="stable")
                if e.feasible[k]
            ]
            step_best: tuple[float, Plan] | None = None
            for k in ranked[: min(candidates_per_step, budget - len(history))]:
                n2, b2 = mv.apply(k, n, b)
                candidate = make_plan(
                    ensemble.name, p, SearchResult(n2, b2, float(e.throughput[k]), 0)
                )
                what = _describe(best, candidate)
                progress.update(task, description=f"measuring: {what}")
                got = measure(candidate, what, candidate.predicted_throughput)
                if got > best_measured and (step_best is None or got > step_best[0]):
                    step_best = (got, candidate)
                _checkpoint(
                    checkpoint,
                    plan_out,
                    step_best[1] if step_best else best,
                    max(best_measured, step_best[0] if step_best else 0),
                    history,
                )
            if step_best is None:
                break
            best_measured, best = step_best
        deployment.apply(best)
    _checkpoint(checkpoint, plan_out, best, best_measured, history)
    return TuneResult(best, best_measured, len(history), tuple(history))


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
