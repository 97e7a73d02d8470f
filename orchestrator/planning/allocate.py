"""The allocation matrix: how many instances of each member on each device, at which batch size.

Pure functions over frozen data, as in the paper: a **worst-fit** placement (members by memory
need, largest first, each on the device with the most free memory), then a **greedy** search
that applies the single move raising the predicted throughput most (add an instance where it
fits, change a member's batch size, move or remove an instance) until no move helps.

The cost model (``evaluate``), for an allocation N[m, d] (instances) and batch sizes b[m]:

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

Several allocations often share the best T (another member or device still limits it); among
equal T, the search prefers fewer binding constraints, which is what lets it add an instance to
one of two equally limiting members and then to the other, and then the least congestion,
``sum over constraints of (T / limit) ** 8``: the constraints nearest to binding dominate it,
so lowering it frees the bottlenecks of many devices before any single move can raise T.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from orchestrator.errors import InfeasibleError, SpecError
from orchestrator.planning.hardware import Device
from orchestrator.planning.profile import Profile

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
    latency_target: float | None = None  # seconds: no member's fill + service time beyond it
    # where measured (chorus profile): samples/s of one call's round trip (the rate above is
    # of the instance's busy time), Triton's CPU seconds per sample on CPU devices, and what a
    # request of rows_per_request rows costs beyond its members: CPU seconds per sample on
    # host_device (the combiner's), seconds of latency per request
    call_rate: np.ndarray | None = None  # (M, D, B)
    cpu: np.ndarray | None = None  # (M, D, B)
    host_cpu: float = 0.0
    host_device: int = -1
    host_latency: float = 0.0
    sequential_call: float = 0.0  # seconds each member call adds when called one at a time
    rows_per_request: int = 1

    def __post_init__(self) -> None:
        # (M, B, D) copies for evaluate(); "cannot run" memory made finite so that 0 * it is 0
        object.__setattr__(self, "_rate_mbd", np.ascontiguousarray(self.rate.transpose(0, 2, 1)))
        finite = np.where(np.isfinite(self.memory), self.memory, _UNRUNNABLE)
        object.__setattr__(self, "_memory_mbd", np.ascontiguousarray(finite.transpose(0, 2, 1)))
        sizes = np.array(self.batch_sizes, dtype=float)
        object.__setattr__(self, "_sizes", sizes)
        call = self.rate if self.call_rate is None else self.call_rate
        object.__setattr__(self, "_call_mbd", np.ascontiguousarray(call.transpose(0, 2, 1)))
        with np.errstate(divide="ignore"):  # seconds one call takes; inf where it cannot run
            service = np.where(call > 0, sizes / call, np.inf)
        object.__setattr__(self, "_service_mbd", np.ascontiguousarray(service.transpose(0, 2, 1)))
        cpu = np.zeros_like(self.rate) if self.cpu is None else self.cpu
        object.__setattr__(self, "_cpu_mbd", np.ascontiguousarray(cpu.transpose(0, 2, 1)))
        host = np.zeros(len(self.devices))
        if self.host_device >= 0:
            host[self.host_device] = self.host_cpu
        object.__setattr__(self, "_host", host)
        object.__setattr__(self, "_counts_cpu", bool(cpu.any() or host.any()))


def problem(
    members: Sequence[str],
    profile: Profile,
    devices: Sequence[Device],
    max_batch_size: int,
    profile_file: str | Path = "profile",
    latency_target_ms: float | None = None,
    borrow_curves: bool = False,
    clients_on_host: bool = False,
) -> Problem:
    """The arrays for these members on these devices; a device with no curve for a member
    cannot hold it (``borrow_curves``: it runs the member's curve of another device, scaled by
    its ``speed``). Where the profile measured them, an instance is busy for its service time
    (not the call's round trip), and the CPU that Triton spends per call and the combiner per
    request (``clients_on_host``: and the clients) count against the first CPU device."""
    curves = {m: [profile.curve(m, d, borrow_curves) for d in devices] for m in members}
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
    call_rate = np.zeros(shape)
    cpu = np.zeros(shape)
    memory = np.full(shape, np.inf)
    cpus = [j for j, d in enumerate(devices) if d.kind == "cpu"]
    host = profile.host if cpus else None
    per_call = (host.call_cpu_ms or 0.0) if host is not None else 0.0  # None: unmeasured
    for i, m in enumerate(members):
        for j, (d, c) in enumerate(zip(devices, curves[m], strict=True)):
            if c is None:
                continue
            for k, b in enumerate(sizes):
                latency, service = c.latency(b), c.service(b)
                if latency is not None and service is not None:
                    rate[i, j, k] = b / (service / 1000.0 / d.speed)
                    call_rate[i, j, k] = b / (latency / 1000.0 / d.speed)
                    memory[i, j, k] = c.memory(b)
                    if d.kind == "cpu" and c.cpu_ms:  # a call when serving, never below 0
                        cpu[i, j, k] = max(0.0, c.cpu(b) + per_call) / 1000.0 / d.speed / b
    lanes = np.array([d.lanes for d in devices], dtype=float)
    host_cpu = host_latency = sequential_call = 0.0
    rows = 1
    if host is not None:
        # a cost the profile could not measure (None) counts as 0
        spent = (host.combiner_cpu_ms or 0.0) + (
            (host.client_cpu_ms or 0.0) if clients_on_host else 0.0
        )
        host_cpu, rows = spent / 1000.0 / host.rows, host.rows
        host_latency = (host.latency_ms or 0.0) / 1000.0
        sequential_call = (host.sequential_call_ms or 0.0) / 1000.0
        if host.busy_share is not None:  # the cores serving keeps busy on the host's CPU
            lanes[cpus[0]] *= host.busy_share
    return Problem(
        members=tuple(members),
        devices=tuple(devices),
        batch_sizes=tuple(sizes),
        rate=rate,
        memory=memory,
        capacity=np.array([d.free_bytes for d in devices], dtype=float),
        lanes=lanes,
        latency_target=None if latency_target_ms is None else latency_target_ms / 1000.0,
        call_rate=call_rate,
        cpu=cpu,
        host_cpu=host_cpu,
        host_device=cpus[0] if cpus else -1,
        host_latency=host_latency,
        sequential_call=sequential_call,
        rows_per_request=rows,
    )


@dataclass(frozen=True)
class Evaluation:
    throughput: np.ndarray  # (K,) samples/s; 0 where infeasible
    binding: np.ndarray  # (K,) constraints at the minimum
    feasible: np.ndarray  # (K,) bool
    congestion: np.ndarray  # (K,) sum over constraints of (throughput / limit) ** _POWER


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
    if p._counts_cpu:  # type: ignore[attr-defined]
        cpu = p._cpu_mbd[members, b]  # type: ignore[attr-defined]  # (K, M, D) s per sample
        share = n * rate / safe_rate[:, :, None]  # of each member's samples, done on d
        need = np.einsum("kmd,kmd->kd", share, cpu) + p._host  # type: ignore[attr-defined]
        with np.errstate(divide="ignore"):
            device_limit = np.minimum(device_limit, np.where(need > 1e-15, p.lanes / need, np.inf))
    limits = np.concatenate([member_rate, device_limit], axis=1)
    throughput = limits.min(axis=1)
    binding = (limits <= throughput[:, None] * (1 + _EPS)).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(limits > 0, throughput[:, None] / limits, 1.0)
    congestion = (ratio**_POWER).sum(axis=1)
    if p.latency_target is not None:
        sizes = p._sizes[b]  # type: ignore[attr-defined]  # (K, M)
        service = p._service_mbd[members, b]  # type: ignore[attr-defined]  # (K, M, D)
        slowest = np.where(n > 0, service, 0.0).max(axis=2)
        feasible &= _meets_target(p, sizes, slowest, throughput)
    return Evaluation(np.where(feasible, throughput, 0.0), binding, feasible, congestion)


_POWER = 8  # congestion: how much the constraints nearest to binding count over the others


def _meets_target(
    p: Problem, sizes: np.ndarray, slowest: np.ndarray, throughput: np.ndarray
) -> np.ndarray:
    """(K,) whether every member's fill + service time is within the latency target."""
    assert p.latency_target is not None
    with np.errstate(divide="ignore"):
        fill = np.where(throughput[:, None] > 0, sizes / throughput[:, None], np.inf)
    return (fill + slowest <= p.latency_target * (1 + _EPS)).all(axis=1)


def member_latency(p: Problem, n: np.ndarray, b: np.ndarray, throughput: float) -> np.ndarray:
    """(M,) seconds a sample may spend in each member at this throughput: the time to fill
    one batch (batch size / throughput, the worst case: the sample that opens the batch waits
    for the rest), plus the batch's service time on the slowest device holding the member."""
    members = np.arange(len(p.members))
    service = p._service_mbd[members, b]  # type: ignore[attr-defined]  # (M, D)
    slowest = np.where(n > 0, service, 0.0).max(axis=1)
    fill = p._sizes[b] / throughput if throughput > 0 else np.inf  # type: ignore[attr-defined]
    return np.asarray(fill + slowest, dtype=float)


def sequential_throughput(p: Problem, n: np.ndarray, b: np.ndarray) -> float:
    """The throughput when the members run one after another on each batch (the paper's
    baseline execution: one member at a time, one request at a time): each call's round trip
    and what the combiner adds to it, plus what the request adds, where the profile measured
    them; 0 if it does not fit."""
    members = np.arange(len(p.members))
    member_rate = (n * p._call_mbd[members, b]).sum(axis=1)  # type: ignore[attr-defined]
    used = (n * p._memory_mbd[members, b]).sum(axis=0)  # type: ignore[attr-defined]
    if (member_rate <= 0).any() or (used > p.capacity).any():
        return 0.0
    # s per sample of each member's calls, the combiner's share included (never below 0)
    calls = np.maximum(0.0, 1.0 / member_rate + p.sequential_call / p._sizes[b])  # type: ignore[attr-defined]
    per_sample = calls.sum() + p.host_latency / p.rows_per_request
    return float(1.0 / per_sample) if per_sample > 0 else 0.0


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
    if p._counts_cpu:  # type: ignore[attr-defined]
        cpu_now = p._cpu_mbd[idx, b]  # type: ignore[attr-defined]  # (M, D)
        share_now = n * rate_now * cpu_now / member_rate[:, None]  # CPU s per sample, by d
        need = share_now.sum(axis=0) + p._host  # type: ignore[attr-defined]
        ext_share = np.vstack([share_now, np.zeros((1, n.shape[1]))])
        new_cpu_rows = p._cpu_mbd[safe_m, bs]  # type: ignore[attr-defined]
        with np.errstate(divide="ignore", invalid="ignore"):
            new_share = np.nan_to_num(
                rows * new_rate_rows * new_cpu_rows / new_member_rate[:, :, None]
            )
            new_need = np.maximum(need + (new_share - ext_share[ms]).sum(axis=1), 0.0)
            device_limit = np.minimum(
                device_limit, np.where(new_need > 1e-15, p.lanes / new_need, np.inf)
            )
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
    # congestion relative to the current throughput t0, from the current sum and the changed rows
    t0 = max(float(member_rate.min()), 1e-30)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        base = ((t0 / member_rate) ** _POWER).sum()
        old_terms = np.where(real, (t0 / old_rate) ** _POWER, 0.0).sum(axis=1)
        new_terms = np.where(real, (t0 / new_member_rate) ** _POWER, 0.0).sum(axis=1)
        scale = throughput / t0
        device_terms = np.where(device_limit > 0, throughput[:, None] / device_limit, 1.0)
        congestion = scale**_POWER * np.maximum(base - old_terms + new_terms, 0.0) + (
            device_terms**_POWER
        ).sum(axis=1)
    if p.latency_target is not None:
        feasible &= _moves_meet_target(p, n, b, mv, throughput)
    return Evaluation(np.where(feasible, throughput, 0.0), binding, feasible, congestion)


def _moves_meet_target(
    p: Problem, n: np.ndarray, b: np.ndarray, mv: Moves, throughput: np.ndarray
) -> np.ndarray:
    members = len(p.members)
    service_now = p._service_mbd[np.arange(members), b]  # type: ignore[attr-defined]  # (M, D)
    slowest_now = np.where(n > 0, service_now, 0.0).max(axis=1)
    sizes = np.tile(p._sizes[b], (len(mv), 1))  # type: ignore[attr-defined]  # (K, M)
    slowest = np.tile(slowest_now, (len(mv), 1))
    for j in range(mv.member.shape[1]):
        k = np.flatnonzero(mv.member[:, j] < members)
        m, batch = mv.member[k, j], mv.batch[k, j]
        sizes[k, m] = p._sizes[batch]  # type: ignore[attr-defined]
        service = p._service_mbd[m, batch]  # type: ignore[attr-defined]  # (k, D)
        slowest[k, m] = np.where(mv.row[k, j] > 0, service, 0.0).max(axis=1)
    return _meets_target(p, sizes, slowest, throughput)


def greedy(
    p: Problem,
    start: tuple[np.ndarray, np.ndarray] | None = None,
    restart_evaluations: int = 50_000,
    effort: float = 1.0,
    seed: int = 0,
) -> SearchResult:
    """The planner's search. From ``start`` it is one climb. By default:

    * climbs from the worst-fit placement: with each member at its most efficient batch size,
      and with every member at each of the :data:`UNIFORM_STARTS` largest batch sizes that fit
      (cut at ``restart_evaluations`` unless a latency target needs them; memory-bound
      problems climb to different optima from each); or, on many identical
      devices, from a small group's plan tiled over them (:func:`_tiled`, which searches the
      group) and from worst-fit at the most efficient batch sizes;
    * then iterated local search on the two best, in turn: each chain's best is kicked (a few
      random moves) and climbed again; every other climb also takes moves that keep the
      throughput and relieve the constraints nearest to binding (``calm``). It stops after
      ``effort`` x :data:`KICK_EVALUATIONS` evaluations (fewer on more than four devices,
      where each costs more; none after a tiled start, whose group had them) or when every
      chain went ``effort`` x :data:`KICK_PATIENCE` kicks without finding better.

    A climb alone stops at a local optimum; the starts and the kicks get out of most
    (benchmarks/results/paper_scale.md measures what is left). Deterministic for a ``seed``."""
    if start is not None:
        return climb(p, start)
    n, b = worst_fit(p)
    cap = restart_evaluations if p.latency_target is None else None
    tiled = _tiled(p, effort, seed)
    if tiled is None:
        starts = [climb(p, (n, b))]
        fits = [
            k
            for k in range(len(p.batch_sizes))
            if evaluate(p, n[None], np.full_like(b, k)[None]).feasible[0]
        ]
        for k in fits[-UNIFORM_STARTS:]:
            starts.append(climb(p, (n, np.full_like(b, k)), max_evaluations=cap))
    else:  # many identical devices: a small group's plan, tiled, and worst-fit
        starts = [climb(p, tiled), climb(p, (n, b))]
    spent = sum(r.evaluations for r in starts)
    starts = sorted(starts, key=lambda r: -r.throughput)[:2]  # stable: the first among equals
    rng = np.random.default_rng(seed)
    # iterated local search from each start in turn
    chains = list(starts)
    # an evaluation costs about D: the same time, not the same count, on more devices; on
    # many identical devices the group's search (and its kicks) took the time
    kicks = 0.0 if tiled is not None else effort * KICK_EVALUATIONS * 4 / max(4, len(p.devices))
    budget = spent + int(kicks)
    idle = [0] * len(chains)
    patience = int(effort * KICK_PATIENCE)
    turn = 0
    while spent < budget and min(idle) < patience:
        i = turn % len(chains)
        turn += 1
        base = chains[i]
        if base.throughput <= 0 or idle[i] >= patience:
            idle[i] = patience
            continue
        kicked, cost = _kick(p, base.instances, base.batch, rng)
        found = climb(
            p,
            kicked,
            max_evaluations=max(1, budget - spent - cost),
            lookahead_budget=0,
            calm=turn % 2 == 0,
        )
        spent += cost + found.evaluations
        idle[i] += 1
        if found.throughput > base.throughput * (1 + _EPS):
            chains[i], idle[i] = found, 0
    best = max(chains, key=lambda r: r.throughput)  # the first among equals
    return SearchResult(best.instances, best.batch, best.throughput, spent)


def _tiled(p: Problem, effort: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """On D identical devices, the plan for the smallest group of them (a divisor of D, at
    least four) that holds every member, repeated D / group times: as good per device as the
    group's, and a start the search could not reach one move at a time on many devices. The
    group is planned at a fifth of the effort."""
    devices = len(p.devices)
    same = (
        (p.rate == p.rate[:, :1]).all()
        and (p.memory == p.memory[:, :1]).all()
        and (p.capacity == p.capacity[0]).all()
        and (p.lanes == p.lanes[0]).all()
    )
    if not same:
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
            found = greedy(sub, effort=effort / 5, seed=seed)
        except InfeasibleError:
            continue
        if found.throughput > 0:
            return np.tile(found.instances, (1, devices // group)), found.batch
    return None


UNIFORM_STARTS = 3  # the largest batch sizes that fit for every member, tried as starts
KICK_EVALUATIONS = 100_000  # evaluations of iterated local search at effort 1
KICK_PATIENCE = 20  # kicks in a row that find nothing better end it (at effort 1)


def _kick(
    p: Problem, n: np.ndarray, b: np.ndarray, rng: np.random.Generator
) -> tuple[tuple[np.ndarray, np.ndarray], int]:
    """2-4 random moves that keep the allocation feasible (any throughput): each drawn from
    a random sample of the moves, so a kick costs little next to a climb."""
    cost = 0
    for _ in range(int(rng.integers(_KICK_MOVES[0], _KICK_MOVES[1] + 1))):
        mv = moves(n, b, len(p.batch_sizes))
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
            if t2[second] > best[0] * (1 + _EPS) and (found is None or t2[second] > found[0][0]):
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
    if (t > best_t * (1 + _EPS)).any():
        near = t >= t.max() * (1 - _EPS)
    else:
        same = t >= best_t * (1 - _EPS)
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
