"""A start for the search on many members: batch sizes chosen within a memory budget, then
instances placed so that every device is about as busy as the others.

On many members or devices a climb from the worst-fit placement changes one instance at a time
and runs out of budget long before each device is as busy as it can be. This start gets there
directly, from the cost model's own terms (:mod:`orchestrator.planning.cost_model`): at a
throughput T, an instance of member m keeps its device busy ``T / T_m`` of the time, so m's
instances together take ``T / r[m]`` of one device at its rate r[m], however they are spread;
every instance also takes its memory, wherever it is.

1. **Batch sizes** (:func:`knapsack_batches`): each member's batch size minimises its work,
   ``1 / r[m, b]`` device-seconds per row, plus ``mu`` times the memory of one instance; ``mu``
   is the least that keeps one instance of every member within a ``fraction`` of all the
   devices' memory. That is the Lagrangian of "the least work whose instances fit": large
   batches where memory is plentiful, smaller ones where it is not. Several fractions are
   tried, since what is left is the room for second instances and for packing.
2. **Placement at T** (:func:`_place`): members by their work, largest first; each is given
   instances one at a time, each on the device with the most time left after what the member
   already takes there (and the memory for one instance), until its instances carry T and
   no device is busier than its lanes. A member that finds no memory at its batch size tries
   its smaller ones.
3. **T** is bisected: the largest at which step 2 places every member.

Each candidate is scored by the cost model (which also counts what this start does not: CPU,
the latency target); the best feasible one is the start. The work is bounded: fractions x
bisection steps x members x instances, all small.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np

from orchestrator.planning.climb import SearchResult
from orchestrator.planning.cost_model import evaluate
from orchestrator.planning.problem import Problem

__all__ = ["FRACTIONS", "PERTURBED", "PERTURBED_BATCHES", "balanced", "knapsack_batches"]

# shares of all devices' memory the members' first instances may take, tried in turn
FRACTIONS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)
PERTURBED = 8  # random orders of the members tried at each of the best batch sizes, at least
PERTURBED_CELLS = 12_000  # ... and as many as this over members x devices (small: cheap)
PERTURBED_BATCHES = 3  # the fractions' batch sizes that placed best, perturbed
Order = str | np.ndarray  # "work", "either", or a factor per member on its work
_STEPS = 18  # bisection steps on T: within 1/2**18 of the best T step 2 reaches
_SLACK = 1e-9  # relative: a device is not over its lanes by rounding


def knapsack_batches(p: Problem, memory: float) -> np.ndarray:
    """(M,) batch indices: the least work (``1 / rate`` at the member's best device) whose
    instances, one a member at its least memory over the devices, fit in ``memory`` bytes,
    by the Lagrangian (a member that fits nowhere within it takes its smallest memory). With
    a latency target, only batch sizes served within it on some device count."""
    rate = p.rate_by_batch.max(axis=2)  # (M, B)
    need = p.memory_by_batch.min(axis=2)  # (M, B): unrunnable is more than any device has
    if p.latency_target is not None:  # a batch served slower than the target never meets it
        quick = p.service_by_batch.min(axis=2) < p.latency_target  # (M, B)
        quick[~quick.any(axis=1), 0] = True  # none does: the smallest, for the error to name
        rate = np.where(quick, rate, 0.0)
    with np.errstate(divide="ignore"):
        work = np.where(rate > 0, 1.0 / rate, np.inf)
    rows = np.arange(len(p.members))

    def pick(mu: float) -> tuple[np.ndarray, float]:
        b = np.argmin(work + mu * need, axis=1)
        return b, float(need[rows, b].sum())

    b, used = pick(0.0)
    if used <= memory:
        return b
    low, high = 0.0, 1e-12
    while pick(high)[1] > memory and high < 1e30:
        high *= 16
    for _ in range(60):
        mid = (low + high) / 2
        if pick(mid)[1] > memory:
            low = mid
        else:
            high = mid
    return pick(high)[0]


def balanced(
    p: Problem, stop: Callable[[], bool] = lambda: False, seed: int = 0
) -> SearchResult | None:
    """The balanced start (the module's docstring): the best feasible candidate by the cost
    model (its evaluations: the candidates scored), or None if none was feasible. First each
    fraction's batch sizes with the members in both orders and both ways of placing them;
    then, at the :data:`PERTURBED_BATCHES` batch sizes that placed best, :data:`PERTURBED`
    orders of the members by their work scaled by a random factor in [0.7, 1.3] (from
    ``seed``): the packing depends on the order, and a few more orders find tighter ones.
    ``stop`` is asked between candidates (a search's budget)."""
    best: SearchResult | None = None
    scored = 0
    reached = 0.0  # the best the cost model gave so far: a later candidate must beat it
    total = float(p.capacity.sum())
    by_batches: dict[bytes, tuple[float, np.ndarray]] = {}  # each batch vector's best
    rng = np.random.default_rng(seed)
    orders = min(
        4 * PERTURBED, max(PERTURBED, PERTURBED_CELLS // (len(p.members) * len(p.devices)))
    )
    factors = rng.uniform(0.7, 1.3, (orders, len(p.members)))

    def candidates() -> Iterator[tuple[np.ndarray, Order]]:
        for fraction in FRACTIONS:
            b = knapsack_batches(p, fraction * total)
            if b.tobytes() not in by_batches:
                by_batches[b.tobytes()] = (0.0, b)
                yield from ((b, order) for order in ("work", "either"))
        ranked = sorted(by_batches.values(), key=lambda x: -x[0])
        for _, b in [x for x in ranked if x[0] > 0][:PERTURBED_BATCHES]:
            yield from ((b, factor) for factor in factors)

    for b, order in candidates():
        for tight in (False, True):
            if stop():
                return None if best is None else replace(best, evaluations=scored)
            found = _bisect(p, b, tight, order, reached)
            if found is None:
                continue
            n, nb, _ = found
            t = float(evaluate(p, n[None], nb[None]).throughput[0])
            scored += 1
            key = b.tobytes()
            by_batches[key] = (max(t, by_batches[key][0]), b)
            if t > 0 and (best is None or t > best.throughput):
                best, reached = SearchResult(n, nb, t, 0), t
    return None if best is None else replace(best, evaluations=scored)


def _bisect(
    p: Problem, b: np.ndarray, tight: bool, order: Order, floor: float
) -> tuple[np.ndarray, np.ndarray, float] | None:
    """:func:`_place` at the largest T it reaches, bisected between ``floor`` and the devices'
    time over the members' work at ``b``: (instances, batch indices, T), or None if it does
    not place every member above ``floor``."""
    rows = np.arange(len(p.members))
    rate = p.rate_by_batch[rows, b].max(axis=1)
    if (rate <= 0).any():
        return None
    high = float(p.lanes.sum() / (1.0 / rate).sum())
    if high <= floor:
        return None
    low, placed = floor, None
    if floor > 0:  # one try first: most candidates do not beat the best so far
        placed = _place(p, b, tight, order, floor * (1 + 1e-6))
        if placed is None:
            return None
    for _ in range(_STEPS):
        mid = (low + high) / 2
        found = _place(p, b, tight, order, mid)
        if found is None:
            high = mid
        else:
            low, placed = mid, found
    return None if placed is None else (*placed, low)


def _place(
    p: Problem, b: np.ndarray, tight: bool, order: Order, t: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """Every member placed at throughput ``t`` (the module's step 2), or None if one finds no
    room: (instances, batch indices, some smaller than ``b`` where memory ran out; with a
    latency target, on devices and at batch sizes that meet it at ``t``, the fill time
    counted as the cost model does). Members
    in ``order``: "work", the most work first; "either", the largest share first of one
    device's time or of one device's memory (where memory binds, the large members first);
    an array (M,): the most work times its factor first."""
    members, devices = len(p.members), len(p.devices)
    busy = np.zeros(devices)  # the share of the time each device is busy
    free = p.capacity.astype(float).copy()
    n = np.zeros((members, devices), dtype=np.int64)
    batch = b.copy()
    rows = np.arange(members)
    work = t / p.rate_by_batch[rows, b].max(axis=1)
    cap = int(p.lanes.sum()) + devices  # instances one member may take: more never help
    if isinstance(order, np.ndarray):
        key = work * order
    elif order == "either":
        need = p.memory_by_batch[rows, b].min(axis=1) / max(float(p.capacity.max()), 1.0)
        key = np.maximum(work / max(float(p.lanes.max()), 1e-9), need)
    else:
        key = work
    target = p.latency_target
    for m in np.argsort(-key, kind="stable"):
        peak = p.rate_by_batch[m].max(axis=1)  # (B,)
        least = p.memory_by_batch[m].min(axis=1)  # (B,)
        options = [int(b[m])] + [
            int(k) for k in np.argsort(-peak, kind="stable") if least[k] < least[b[m]]
        ]
        if target is not None:  # at t, the batch fills in rows / t: the others, fastest first
            options += [int(k) for k in np.argsort(-peak, kind="stable") if k not in options]
        for k in options:
            if peak[k] <= 0:
                continue
            rate, memory = p.rate_by_batch[m, k], p.memory_by_batch[m, k]
            if target is not None:  # only devices whose service leaves time to fill a batch
                late = p.batch_rows[m, k] / t + p.service_by_batch[m, k] > target
                if late.all():
                    continue
                rate = np.where(late, 0.0, rate)
            got = _tight(rate, memory, t, busy, free, p.lanes) if tight else None
            if got is None:
                got = _spread(rate, memory, t, busy, free, p.lanes, cap)
            if got is not None:
                n[m], batch[m] = got, k
                break
        else:
            return None
    return n, batch


def _tight(
    rate: np.ndarray,
    memory: np.ndarray,
    t: float,
    busy: np.ndarray,
    free: np.ndarray,
    lanes: np.ndarray,
) -> np.ndarray | None:
    """Best fit: the fewest devices, one instance each, that take an equal share of the
    member's work (``t`` over their rates), chosen among those with the time and the memory
    for it the ones with the least time left, so that the devices pack tight. ``busy`` and
    ``free`` are updated if it fits, untouched if not."""
    slack = np.where((rate > 0) & (memory <= free), lanes - busy, -np.inf)
    order = np.argsort(-slack, kind="stable")
    for k in range(1, int(np.isfinite(slack).sum()) + 1):
        chosen = order[:k]  # the most time left: if any k fit, these do
        share = t / float(rate[chosen].sum())
        if share > 1 or slack[chosen[-1]] < share * (1 - _SLACK):
            continue
        fits = np.flatnonzero(slack >= share * (1 - _SLACK))
        tightest = fits[np.argsort(slack[fits], kind="stable")[:k]]
        closer = t / float(rate[tightest].sum())
        if closer <= 1 and (slack[tightest] >= closer * (1 - _SLACK)).all():
            chosen, share = tightest, closer
        n = np.zeros(len(rate), dtype=np.int64)
        n[chosen] = 1
        busy[chosen] += share
        free[chosen] -= memory[chosen]
        return n
    return None


def _spread(
    rate: np.ndarray,
    memory: np.ndarray,
    t: float,
    busy: np.ndarray,
    free: np.ndarray,
    lanes: np.ndarray,
    cap: int,
) -> np.ndarray | None:
    """Worst fit: the member's instances added one at a time, each where the most time is
    left after its share so far (several on one device where it has the time: a CPU's
    cores), until they carry ``t`` within every device's lanes. ``busy`` and ``free`` are
    updated if it fits, untouched if not."""
    runs = rate > 0
    open_ = runs & (memory <= free)
    if not open_.any() or t / rate[open_].max() > (lanes - busy)[open_].sum() * (1 + _SLACK):
        return None  # its instances take t / rate lanes at least: more than the time left
    n = np.zeros(len(rate), dtype=np.int64)
    room = free.copy()
    for _ in range(cap):
        carried = float(n @ rate)
        share = n * (t / carried) if carried > 0 else np.zeros(len(rate))
        if carried >= t and (busy + share <= lanes * (1 + _SLACK)).all():
            busy += share
            free[:] = room
            return n
        open_ = runs & (memory <= room)
        if not open_.any():
            return None
        d = int(np.argmax(np.where(open_, lanes - busy - share, -np.inf)))
        n[d] += 1
        room[d] -= memory[d]
    return None
