"""The cost model: the throughput the planner predicts for an allocation, and why.

For an allocation N[m, d] (instances) and batch sizes b[m] (``evaluate``):

* one instance of member m on device d serves ``r[m, d] = b / busy(b)`` samples per second
  while it runs (the profile's busy time per batch where measured, else its latency, divided
  by the device's ``speed``);
* member m's capacity is ``T_m = sum_d N[m, d] * r[m, d]``; a stream of T samples per
  second is spread over its instances in proportion to their speed, so every instance of m is
  busy a fraction ``T / T_m`` of the time;
* a device runs ``lanes`` instances side by side at full speed (a GPU 1, a CPU its cores, or
  as many as the profile saw serving keep busy there); beyond that its instances share it,
  so ``sum_m N[m, d] * T / T_m <= lanes[d]``;
* on a CPU device, where the profile measured them, the CPU the members' calls there cost
  per sample (Triton's, measured one call at a time, corrected by what a call costs when
  serving), plus the combiner's per sample (``host``), fit in its cores:
  ``T * (sum_m N[m, d] * r[m, d] / T_m * cpu[m, d] + host[d]) <= lanes[d]``;
* the ensemble's throughput is the largest T meeting every constraint.

With a latency target, every member's fill time (the rows of the ensemble that fill one of its
batches, over T) plus its slowest instance's service time must be within it.

With a cascade, the members are called in tiers and member m sees only a share ``s[m]`` of the
ensemble's rows (1 for the first tier, known from a calibration): at T rows per second it
serves ``s[m] * T`` samples per second. Every constraint above is linear in what m serves, so
the problem counts in rows of the ensemble instead, with arrays the :class:`Problem` derives
once: an instance covers ``r[m, d] / s[m]`` rows per second and spends ``cpu[m, d] * s[m]``
CPU seconds per row. Then ``T <= T_m / s[m]``, the lanes and the CPU read as written above,
and the search, the incremental evaluation of moves and the placement need no change of
their own. What is not a rate is the time to fill a batch: b samples of m are ``b / s[m]``
rows of the ensemble, so a member that few rows reach fills its batches slowly, and the
latency target asks it for smaller batches, hence more instances, than its load alone would.
Nor does a later tier get batches larger than what reaches it of one combiner batch (about
``s[m]`` times the ensemble's batch limit: the rows left are sent on per combiner batch), so
:func:`orchestrator.planning.problem.problem` marks the larger sizes as ones it cannot run.
Without a cascade every share is 1 and every array is the profile's.

Several allocations often share the best T (another member or device still limits it); among
equal T, the search prefers fewer binding constraints, which is what lets it add an instance to
one of two equally limiting members and then to the other, and then the least congestion,
``sum over constraints of (T / limit) ** 8``: the constraints nearest to binding dominate it,
so lowering it frees the bottlenecks of many devices before any single move can raise T.

The same prediction for every move from one allocation, computed incrementally, is
:func:`orchestrator.planning.moves.evaluate_moves`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orchestrator.planning.problem import Problem

__all__ = [
    "CONGESTION_POWER",
    "TOLERANCE",
    "Evaluation",
    "bottlenecks",
    "evaluate",
    "meets_latency_target",
    "member_latency",
    "sequential_throughput",
]

TOLERANCE = 1e-9  # relative: throughputs this close count as equal
CONGESTION_POWER = 8  # how much the constraints nearest to binding count over the others


@dataclass(frozen=True)
class Evaluation:
    """The cost model's answer for K allocations."""

    throughput: np.ndarray  # (K,) rows of the ensemble (samples) per second; 0 where infeasible
    binding: np.ndarray  # (K,) constraints at the minimum
    feasible: np.ndarray  # (K,) bool
    congestion: np.ndarray  # (K,) sum over constraints of (throughput / limit) ** CONGESTION_POWER


def evaluate(p: Problem, n: np.ndarray, b: np.ndarray) -> Evaluation:
    """Predict K allocations at once: ``n`` is (K, M, D) instances, ``b`` (K, M) batch indices."""
    member_rate, device_limit, feasible = _limits(p, n, b)
    limits = np.concatenate([member_rate, device_limit], axis=1)
    throughput = limits.min(axis=1)
    binding = (limits <= throughput[:, None] * (1 + TOLERANCE)).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(limits > 0, throughput[:, None] / limits, 1.0)
    congestion = (ratio**CONGESTION_POWER).sum(axis=1)
    if p.latency_target is not None:
        members = np.arange(len(p.members))
        rows = p.batch_rows[members, b]  # (K, M)
        service = p.service_by_batch[members, b]  # (K, M, D)
        slowest = np.where(n > 0, service, 0.0).max(axis=2)
        feasible &= meets_latency_target(p, rows, slowest, throughput)
    return Evaluation(np.where(feasible, throughput, 0.0), binding, feasible, congestion)


def bottlenecks(p: Problem, n: np.ndarray, b: np.ndarray, slack: float = 0.1) -> np.ndarray | None:
    """(M,) bool: the members a move must touch to raise one allocation's throughput or relieve
    what limits it: those whose capacity is within ``slack`` of the throughput, and those with
    an instance on a device whose limit is. A move of any other member changes no constraint
    at or near the minimum (the climb on many members scores only these moves). None when the
    limit is no member's (the host's CPU, counted on a device holding none): every move may
    relieve it."""
    member_rate, device_limit, _ = _limits(p, n[None], b[None])
    throughput = min(member_rate.min(), device_limit.min())
    near = throughput * (1 + slack)
    on_busy = (n[:, device_limit[0] <= near] > 0).any(axis=1)
    limiting = np.asarray((member_rate[0] <= near) | on_busy)
    return limiting if limiting.any() else None


def _limits(p: Problem, n: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For K allocations: each member's capacity (K, M), each device's limit on the throughput
    (K, D: its lanes, and its cores where CPU is counted), and whether they fit (K,)."""
    members = np.arange(len(p.members))
    rate = p.rate_by_batch[members, b]  # (K, M, D)
    memory = p.memory_by_batch[members, b]
    used = np.einsum("kmd,kmd->kd", n, memory)  # unrunnable placements exceed every capacity
    member_rate = np.einsum("kmd,kmd->km", n, rate)
    feasible = (used <= p.capacity).all(axis=1) & (member_rate > 0).all(axis=1)
    safe_rate = np.where(member_rate > 0, member_rate, np.inf)
    load = np.einsum("kmd,km->kd", n, 1.0 / safe_rate)  # (K, D): lanes busy per request/s
    with np.errstate(divide="ignore"):
        device_limit = np.where(load > 0, p.lanes / load, np.inf)
    if p.counts_cpu:
        cpu = p.cpu_by_batch[members, b]  # (K, M, D) s per sample
        share = n * rate / safe_rate[:, :, None]  # of each member's samples, done on d
        need = np.einsum("kmd,kmd->kd", share, cpu) + p.host_cpu_by_device
        with np.errstate(divide="ignore"):
            device_limit = np.minimum(device_limit, np.where(need > 1e-15, p.lanes / need, np.inf))
    return member_rate, device_limit, feasible


def meets_latency_target(
    p: Problem, batch_rows: np.ndarray, slowest: np.ndarray, throughput: np.ndarray
) -> np.ndarray:
    """(K,) whether every member's fill + service time is within the latency target, from
    the rows of the ensemble that fill one batch of each member ``batch_rows`` (K, M; its
    batch size over its share, :attr:`Problem.batch_rows`), the service time of its slowest
    instance ``slowest`` (K, M) and the ``throughput`` (K,, rows per second)."""
    assert p.latency_target is not None
    with np.errstate(divide="ignore"):
        fill = np.where(throughput[:, None] > 0, batch_rows / throughput[:, None], np.inf)
    return (fill + slowest <= p.latency_target * (1 + TOLERANCE)).all(axis=1)


def member_latency(p: Problem, n: np.ndarray, b: np.ndarray, throughput: float) -> np.ndarray:
    """(M,) seconds a sample may spend in each member at this throughput: the time to fill
    one batch (the rows that fill it, batch size / share, over the throughput; the worst case:
    the sample that opens the batch waits for the rest), plus the batch's service time on the
    slowest device holding the member."""
    members = np.arange(len(p.members))
    service = p.service_by_batch[members, b]  # (M, D)
    slowest = np.where(n > 0, service, 0.0).max(axis=1)
    fill = p.batch_rows[members, b] / throughput if throughput > 0 else np.inf
    return np.asarray(fill + slowest, dtype=float)


def sequential_throughput(p: Problem, n: np.ndarray, b: np.ndarray) -> float:
    """The throughput when the members run one after another on each batch (the paper's
    baseline execution: one member at a time, one request at a time): each call's round trip
    and what the combiner adds to it, plus what the request adds, where the profile measured
    them (with a cascade, each member's for the share of rows that reach it); 0 if it does not
    fit."""
    members = np.arange(len(p.members))
    member_rate = (n * p.call_rate_by_batch[members, b]).sum(axis=1)
    used = (n * p.memory_by_batch[members, b]).sum(axis=0)
    if (member_rate <= 0).any() or (used > p.capacity).any():
        return 0.0
    # s per sample of each member's calls, the combiner's share included (never below 0)
    calls = np.maximum(0.0, 1.0 / member_rate + p.sequential_call / p.batch_rows[members, b])
    per_sample = calls.sum() + p.host_latency / p.rows_per_request
    return float(1.0 / per_sample) if per_sample > 0 else 0.0
