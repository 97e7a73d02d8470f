"""The allocation matrix: how many instances of each member on each device, at which batch size.

Pure functions over frozen data, as in the paper: a **worst-fit** placement (members by memory
need, largest first, each on the device with the most free memory), then a **greedy** search
that applies the single move raising the predicted throughput most (add an instance where it
fits, change a member's batch size, move or remove an instance) until no move helps.

The cost model (``evaluate``), for an allocation N[m, d] (instances) and batch sizes b[m]:

* one instance of member m on device d serves ``r[m, d] = b / latency(b)`` samples per second
  while it runs (the profile's latency, divided by the device's ``speed``);
* member m's capacity is ``T_m = sum_d N[m, d] * r[m, d]``; a request stream of T requests per
  second is spread over its instances in proportion to their speed, so every instance of m is
  busy a fraction ``T / T_m`` of the time;
* a device runs ``lanes`` instances side by side at full speed (a GPU 1, a CPU its cores);
  beyond that its instances share it, so ``sum_m N[m, d] * T / T_m <= lanes[d]``;
* the ensemble's throughput is the largest T meeting every constraint:
  ``T = min(min_m T_m, min_d lanes[d] / sum_m N[m, d] / T_m)``.

Several allocations often share the best T (another member still limits it); among equal T,
the greedy prefers fewer binding constraints, which is what lets it add an instance to one of
two equally limiting members and then to the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InfeasibleError, SpecError
from .hardware import Device
from .profile import Profile

__all__ = [
    "Evaluation",
    "Moves",
    "Problem",
    "SearchResult",
    "climb",
    "evaluate",
    "evaluate_moves",
    "exhaustive",
    "greedy",
    "moves",
    "problem",
    "worst_fit",
]

_EPS = 1e-9
_UNRUNNABLE = 1e30  # bytes: more than any device has


@dataclass(frozen=True)
class Problem:
    """Everything the search needs, as arrays: M members, D devices, B batch sizes."""

    members: tuple[str, ...]
    devices: tuple[Device, ...]
    batch_sizes: tuple[int, ...]
    rate: np.ndarray  # (M, D, B) samples/s of one instance; 0 where it cannot run
    memory: np.ndarray  # (M, D, B) bytes one instance needs; inf where it cannot run
    capacity: np.ndarray  # (D,) bytes free
    lanes: np.ndarray  # (D,)

    def __post_init__(self) -> None:
        # (M, B, D) copies for evaluate(); "cannot run" memory made finite so that 0 * it is 0
        object.__setattr__(self, "_rate_mbd", np.ascontiguousarray(self.rate.transpose(0, 2, 1)))
        finite = np.where(np.isfinite(self.memory), self.memory, _UNRUNNABLE)
        object.__setattr__(self, "_memory_mbd", np.ascontiguousarray(finite.transpose(0, 2, 1)))


def problem(
    members: Sequence[str],
    profile: Profile,
    devices: Sequence[Device],
    max_batch_size: int,
    profile_file: str | Path = "profile",
) -> Problem:
    curves = {m: [profile.curve(m, d) for d in devices] for m in members}
    sizes = sorted(
        {b for cs in curves.values() for c in cs if c for b in c.batch_sizes if b <= max_batch_size}
    )
    for m, cs in curves.items():
        if not any(cs):
            kinds = sorted({d.kind for d in devices} | {d.name for d in devices})
            raise SpecError(
                profile_file,
                f"members.{m}",
                f"no profile of member {m!r} for any of these devices "
                f"(looked for keys: {', '.join(kinds)})",
            )
    if not sizes:
        raise SpecError(profile_file, "members", f"no batch size up to {max_batch_size} measured")
    shape = (len(members), len(devices), len(sizes))
    rate = np.zeros(shape)
    memory = np.full(shape, np.inf)
    for i, m in enumerate(members):
        for j, (d, c) in enumerate(zip(devices, curves[m], strict=True)):
            if c is None:
                continue
            for k, b in enumerate(sizes):
                latency = c.latency(b)
                if latency is not None:
                    rate[i, j, k] = b / (latency / 1000.0 / d.speed)
                    memory[i, j, k] = c.memory(b)
    return Problem(
        members=tuple(members),
        devices=tuple(devices),
        batch_sizes=tuple(sizes),
        rate=rate,
        memory=memory,
        capacity=np.array([d.free_bytes for d in devices], dtype=float),
        lanes=np.array([d.lanes for d in devices], dtype=float),
    )


@dataclass(frozen=True)
class Evaluation:
    throughput: np.ndarray  # (K,) requests/s; 0 where infeasible
    binding: np.ndarray  # (K,) constraints at the minimum
    feasible: np.ndarray  # (K,) bool


def evaluate(p: Problem, n: np.ndarray, b: np.ndarray) -> Evaluation:
    """Predict K allocations at once: ``n`` is (K, M, D) instances, ``b`` (K, M) batch indices."""
    members = np.arange(len(p.members))
    rate = p._rate_mbd[members, b]  # type: ignore[attr-defined]  # (K, M, D)
    memory = p._memory_mbd[members, b]  # type: ignore[attr-defined]
    used = np.einsum("kmd,kmd->kd", n, memory)  # unrunnable placements exceed every capacity
    member_rate = np.einsum("kmd,kmd->km", n, rate)
    feasible = (used <= p.capacity).all(axis=1) & (member_rate > 0).all(axis=1)
    safe_rate = np.where(member_rate > 0, member_rate, np.inf)
    load = np.einsum("kmd,km->kd", n, 1.0 / safe_rate)  # (K, D): lanes busy per request/s
    with np.errstate(divide="ignore"):
        device_limit = np.where(load > 0, p.lanes / load, np.inf)
    limits = np.concatenate([member_rate, device_limit], axis=1)
    throughput = limits.min(axis=1)
    binding = (limits <= throughput[:, None] * (1 + _EPS)).sum(axis=1)
    return Evaluation(np.where(feasible, throughput, 0.0), binding, feasible)


@dataclass(frozen=True)
class SearchResult:
    instances: np.ndarray  # (M, D)
    batch: np.ndarray  # (M,) indices into Problem.batch_sizes
    throughput: float
    evaluations: int


def worst_fit(p: Problem) -> tuple[np.ndarray, np.ndarray]:
    """One instance per member, largest member first, each on the device with the most free
    memory, at the member's most efficient batch size (the highest throughput per instance)
    that still fits there, else the largest that does.

    Where worst-fit leaves a member with no room although a placement exists (tightly packed
    devices), a depth-first search over devices finds one. Raises InfeasibleError naming the
    member that fits nowhere, the memory it needs and the largest free device memory.
    """
    need = np.where(np.isfinite(p.memory[:, :, 0]), p.memory[:, :, 0], -1).max(axis=1)
    order = sorted(range(len(p.members)), key=lambda i: (-need[i], i))
    free = p.capacity.copy()
    placement: dict[int, int] = {}
    for m in order:
        fits = (p.rate[m, :, 0] > 0) & (p.memory[m, :, 0] <= free)
        if not fits.any():
            found = _pack(p, order)
            if found is None:
                runnable = p.rate[m, :, 0] > 0
                best = int(np.argmax(np.where(runnable, free, -1)))
                raise InfeasibleError(
                    f"member {p.members[m]!r} needs {_bytes(need[m])} for one instance at "
                    f"batch size {p.batch_sizes[0]}, but the largest free device memory is "
                    f"{_bytes(free[best])} (on {p.devices[best].id})"
                    + (
                        ""
                        if free[best] == p.capacity[best]
                        else ", after placing the larger members"
                    )
                )
            placement = found
            break
        d = int(np.argmax(np.where(fits, free, -np.inf)))
        placement[m] = d
        free[d] -= p.memory[m, d, 0]
    free = p.capacity.copy()
    for m, d in placement.items():
        free[d] -= p.memory[m, d, 0]
    n = np.zeros((len(p.members), len(p.devices)), dtype=np.int64)
    batch = np.zeros(len(p.members), dtype=np.int64)
    for m in order:  # largest first: each takes the most efficient batch that still fits
        d = placement[m]
        room = free[d] + p.memory[m, d, 0]
        k = int(np.argmax(np.where(p.memory[m, d] <= room, p.rate[m, d], -1.0)))
        n[m, d], batch[m] = 1, k
        free[d] = room - p.memory[m, d, k]
    return n, batch


def _pack(p: Problem, order: list[int], budget: int = 200_000) -> dict[int, int] | None:
    """A placement of one instance per member at the smallest batch size, by depth-first search
    (devices with the most free memory first); None if there is none within the budget."""
    free = p.capacity.copy()
    placement: dict[int, int] = {}
    steps = 0

    def place(i: int) -> bool:
        nonlocal steps
        if i == len(order):
            return True
        m = order[i]
        tried: set[float] = set()
        for d in np.argsort(-free, kind="stable"):
            steps += 1
            need = p.memory[m, d, 0]
            if steps > budget or p.rate[m, d, 0] <= 0 or need > free[d] or free[d] in tried:
                continue
            tried.add(free[d])  # identical devices with equal room: one try is enough
            free[d] -= need
            placement[m] = int(d)
            if place(i + 1):
                return True
            free[d] += need
            del placement[m]
        return False

    return placement if place(0) else None


def _bytes(x: float) -> str:
    return f"{x / 2**30:.2f} GiB ({int(x)} bytes)"


@dataclass(frozen=True)
class Moves:
    """K candidate allocations, each the current one with at most two members' rows changed.

    Slot j of candidate k gives member ``member[k, j]`` the instance row ``row[k, j]`` (D,) and
    batch index ``batch[k, j]``; a slot naming member M (one past the last) changes nothing.
    """

    member: np.ndarray  # (K, 2)
    row: np.ndarray  # (K, 2, D)
    batch: np.ndarray  # (K, 2)

    def __len__(self) -> int:
        return len(self.member)

    def apply(self, k: int, n: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, b = n.copy(), b.copy()
        for m, row, batch in zip(self.member[k], self.row[k], self.batch[k], strict=True):
            if m < len(n):
                n[m], b[m] = row, batch
        return n, b


def moves(n: np.ndarray, b: np.ndarray, sizes: int) -> Moves:
    """Every allocation one move away: add, remove or move one instance; swap the devices of
    two instances of different members; change one member's batch size, alone, or smaller
    with one more instance, or larger with one fewer."""
    members, devices = n.shape
    eye = np.eye(devices, dtype=n.dtype)
    held_m, held_d = np.nonzero(n)
    spare = n.sum(axis=1)[held_m] > 1  # removing one keeps the member served
    singles: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (members, rows, batches)

    def single(ms: np.ndarray, rows: np.ndarray, batches: np.ndarray) -> None:
        singles.append((ms, rows, batches))

    all_m = np.repeat(np.arange(members), devices)
    all_d = np.tile(np.arange(devices), members)
    single(all_m, n[all_m] + eye[all_d], b[all_m])  # add
    rm_m, rm_d = held_m[spare], held_d[spare]
    single(rm_m, n[rm_m] - eye[rm_d], b[rm_m])  # remove
    mv_m = np.repeat(held_m, devices)
    mv_src = np.repeat(held_d, devices)
    mv_dst = np.tile(np.arange(devices), len(held_m))
    keep = mv_src != mv_dst
    mv_m, mv_src, mv_dst = mv_m[keep], mv_src[keep], mv_dst[keep]
    single(mv_m, n[mv_m] - eye[mv_src] + eye[mv_dst], b[mv_m])  # move
    rb_m = np.repeat(np.arange(members), sizes)
    rb_k = np.tile(np.arange(sizes), members)
    keep = rb_k != b[rb_m]
    rb_m, rb_k = rb_m[keep], rb_k[keep]
    single(rb_m, n[rb_m], rb_k)  # another batch size
    smaller = rb_k < b[rb_m]  # a smaller batch frees memory: one more instance with it
    sm_m, sm_k = rb_m[smaller], rb_k[smaller]
    ra_m, ra_d = np.repeat(sm_m, devices), np.tile(np.arange(devices), len(sm_m))
    single(ra_m, n[ra_m] + eye[ra_d], np.repeat(sm_k, devices))
    # a larger batch needs memory: one fewer instance with it
    ri, hi = np.nonzero((rb_m[:, None] == rm_m[None, :]) & ~smaller[:, None])
    single(rb_m[ri], n[rb_m[ri]] - eye[rm_d[hi]], rb_k[ri])
    ms = np.concatenate([s[0] for s in singles])
    rows = np.concatenate([s[1] for s in singles])
    batches = np.concatenate([s[2] for s in singles])
    none = np.full(len(ms), members)
    member = np.stack([ms, none], axis=1)
    row = np.stack([rows, np.zeros_like(rows)], axis=1)
    batch = np.stack([batches, np.zeros_like(batches)], axis=1)
    # swap: instances of two members trade devices
    i, j = np.nonzero((held_m[:, None] < held_m[None, :]) & (held_d[:, None] != held_d[None, :]))
    m1, d1, m2, d2 = held_m[i], held_d[i], held_m[j], held_d[j]
    swap_member = np.stack([m1, m2], axis=1)
    swap_row = np.stack([n[m1] - eye[d1] + eye[d2], n[m2] - eye[d2] + eye[d1]], axis=1)
    swap_batch = np.stack([b[m1], b[m2]], axis=1)
    return Moves(
        np.concatenate([member, swap_member]),
        np.concatenate([row, swap_row]),
        np.concatenate([batch, swap_batch]),
    )


def evaluate_moves(p: Problem, n: np.ndarray, b: np.ndarray, mv: Moves) -> Evaluation:
    """The same prediction as :func:`evaluate` for every candidate of ``mv``, computed from the
    current allocation's totals and the (at most two) changed rows: O(K * D), not O(K * M * D)."""
    members = len(p.members)
    idx = np.arange(members)
    rate_now = p._rate_mbd[idx, b]  # type: ignore[attr-defined]  # (M, D)
    mem_now = p._memory_mbd[idx, b]  # type: ignore[attr-defined]
    member_rate = (n * rate_now).sum(axis=1)  # (M,)
    used = (n * mem_now).sum(axis=0)  # (D,)
    load = (n / member_rate[:, None]).sum(axis=0)  # (D,)
    # a phantom member M: infinitely fast, holding nothing, for slots that change nothing
    ext_rate = np.append(member_rate, np.inf)
    ext_n = np.vstack([n, np.zeros((1, n.shape[1]), dtype=n.dtype)])
    ext_mem = np.vstack([mem_now, np.zeros((1, n.shape[1]))])
    ms, rows, bs = mv.member, mv.row, mv.batch  # (K, 2), (K, 2, D), (K, 2)
    real = ms < members
    safe_m = np.where(real, ms, 0)
    new_rate_rows = p._rate_mbd[safe_m, bs]  # type: ignore[attr-defined]  # (K, 2, D)
    new_mem_rows = p._memory_mbd[safe_m, bs]  # type: ignore[attr-defined]
    new_member_rate = np.where(real, (rows * new_rate_rows).sum(axis=2), np.inf)  # (K, 2)
    old_rows = ext_n[ms]  # (K, 2, D)
    old_rate = ext_rate[ms]  # (K, 2)
    # phantom slots hold zero rows, so they add nothing below
    new_used = used + (rows * new_mem_rows - old_rows * ext_mem[ms]).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):  # unrunnable rows: infeasible anyway
        delta = (rows / new_member_rate[:, :, None] - old_rows / old_rate[:, :, None]).sum(1)
    new_load = np.maximum(load + delta, 0.0)
    with np.errstate(divide="ignore"):
        device_limit = np.where(new_load > 1e-15, p.lanes / new_load, np.inf)  # (K, D)
    # the slowest member not changed by the candidate: among the three slowest overall
    order = np.argsort(member_rate, kind="stable")[:3]
    slowest_other = np.full(len(ms), np.inf)
    for m in order[::-1]:
        untouched = (ms != m).all(axis=1)
        slowest_other = np.where(untouched, member_rate[m], slowest_other)
    throughput = np.minimum(
        np.minimum(slowest_other, new_member_rate.min(axis=1)), device_limit.min(axis=1)
    )
    feasible = (new_used <= p.capacity).all(axis=1) & (new_member_rate > 0).all(axis=1)
    threshold = throughput * (1 + _EPS)
    sorted_rates = np.sort(member_rate)
    at_or_below = np.searchsorted(sorted_rates, threshold, side="right")  # (K,)
    changed_old = (real & (old_rate <= threshold[:, None])).sum(axis=1)
    changed_new = (real & (new_member_rate <= threshold[:, None])).sum(axis=1)
    binding = at_or_below - changed_old + changed_new + (device_limit <= threshold[:, None]).sum(1)
    return Evaluation(np.where(feasible, throughput, 0.0), binding, feasible)


def greedy(
    p: Problem,
    start: tuple[np.ndarray, np.ndarray] | None = None,
    restart_evaluations: int = 50_000,
) -> SearchResult:
    """The greedy search from ``start``, or, by default, from the worst-fit placement twice: at
    each member's most efficient batch size, then at the smallest one for at most
    ``restart_evaluations`` evaluations (the restart pays on small, memory-bound problems and
    is cut short on large ones); the better result wins."""
    if start is not None:
        return climb(p, start)
    n, b = worst_fit(p)
    results = [
        climb(p, (n, b)),
        climb(p, (n, np.zeros_like(b)), max_evaluations=restart_evaluations),
    ]
    best = max(results, key=lambda r: r.throughput)  # the first among equals
    return SearchResult(
        best.instances, best.batch, best.throughput, sum(r.evaluations for r in results)
    )


def climb(
    p: Problem,
    start: tuple[np.ndarray, np.ndarray],
    max_steps: int = 10_000,
    lookahead_budget: int = 20_000,
    max_evaluations: int | None = None,
) -> SearchResult:
    """Hill-climb from ``start`` by the best single move, until no move helps (or after
    ``max_evaluations``, keeping the best found).

    Where no single move helps, the most promising moves (as many as ``lookahead_budget``
    evaluations allow, 2 to 16) are each followed by their best next move: memory-bound
    allocations often need a step down (a smaller batch, an instance removed) before the step
    up. The search stops when two moves cannot help.
    """
    n, b = start
    current = evaluate(p, n[None], b[None])
    best_t, best_bind = float(current.throughput[0]), int(current.binding[0])
    evaluations = 1
    for _ in range(max_steps):
        if max_evaluations is not None and evaluations >= max_evaluations:
            break
        mv = moves(n, b, len(p.batch_sizes))
        e = evaluate_moves(p, n, b, mv)
        evaluations += len(mv)
        pick = _best_step(e, best_t, best_bind)
        if pick is not None:
            n, b = mv.apply(pick, n, b)
            best_t, best_bind = float(e.throughput[pick]), int(e.binding[pick])
            continue
        # stuck: look two moves ahead from the most promising first moves
        t = np.where(e.feasible, e.throughput, -1.0)
        width = min(16, max(2, lookahead_budget // len(mv)), int(e.feasible.sum()))
        found = None
        for first in np.lexsort((e.binding, -t))[:width]:
            n1, b1 = mv.apply(int(first), n, b)
            mv2 = moves(n1, b1, len(p.batch_sizes))
            e2 = evaluate_moves(p, n1, b1, mv2)
            evaluations += len(mv2)
            t2 = np.where(e2.feasible, e2.throughput, -1.0)
            second = int(np.argmax(t2))
            if t2[second] > best_t * (1 + _EPS) and (found is None or t2[second] > found[0]):
                found = (float(t2[second]), int(e2.binding[second]), *mv2.apply(second, n1, b1))
        if found is None:
            break
        best_t, best_bind, n, b = found
    return SearchResult(n, b, best_t, evaluations)


def _best_step(e: Evaluation, best_t: float, best_bind: int) -> int | None:
    """The move raising throughput most (fewest binding constraints among equals); else one
    keeping it while binding fewer constraints; else None."""
    t = np.where(e.feasible, e.throughput, -1.0)
    if (t > best_t * (1 + _EPS)).any():
        near = t >= t.max() * (1 - _EPS)
    else:
        near = (t >= best_t * (1 - _EPS)) & (e.binding < best_bind)
        if not near.any():
            return None
    return int(np.flatnonzero(near)[np.argmin(e.binding[near])])


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
