"""The allocation matrix: how many instances of each member on each device, at which batch size.

Pure functions over frozen data, as in the paper: a **worst-fit** placement (members by memory
need, largest first, each on the device with the most free memory), then a **greedy** search
that applies the single move raising the predicted throughput most (add an instance where it
fits, change a member's batch size, move or remove an instance) until no move helps.

This module is the face of that stage; each step has a module of its own, in the order a plan
is made:

* :mod:`~orchestrator.planning.problem`: the profile and the devices as arrays
  (:class:`Problem`, built by :func:`problem`);
* :mod:`~orchestrator.planning.cost_model`: the throughput predicted for an allocation
  (:func:`evaluate`), and the model itself, in its docstring;
* :mod:`~orchestrator.planning.placement`: the worst-fit placement (:func:`worst_fit`);
* :mod:`~orchestrator.planning.balance`: the balanced start for many members (batch sizes
  within a memory budget, every device about as busy as the others: :func:`balanced`);
* :mod:`~orchestrator.planning.moves`: the allocations one move away (:func:`moves`), scored
  all at once (:func:`evaluate_moves`);
* :mod:`~orchestrator.planning.climb`: one hill-climb, scored by any :class:`Evaluator`
  (:func:`climb`);
* :mod:`~orchestrator.planning.search`: the planner's search, climbs from several starts and
  iterated local search (:func:`greedy`), and the exhaustive reference (:func:`exhaustive`).
"""

from __future__ import annotations

from orchestrator.planning.climb import PREDICTED, Evaluator, SearchResult, climb
from orchestrator.planning.cost_model import (
    Evaluation,
    evaluate,
    member_latency,
    sequential_throughput,
)
from orchestrator.planning.moves import Moves, evaluate_moves, moves
from orchestrator.planning.placement import worst_fit
from orchestrator.planning.problem import Problem, problem
from orchestrator.planning.search import exhaustive, greedy

__all__ = [
    "PREDICTED",
    "Evaluation",
    "Evaluator",
    "Moves",
    "Problem",
    "SearchResult",
    "climb",
    "evaluate",
    "evaluate_moves",
    "exhaustive",
    "greedy",
    "member_latency",
    "moves",
    "problem",
    "sequential_throughput",
    "worst_fit",
]
