"""The neighbourhood of an allocation: every allocation one move away (:func:`moves`), and the
cost model's prediction for all of them at once (:func:`evaluate_moves`).

A climb scores thousands of neighbours per step. Each differs from the current allocation in
at most two members' rows, so :func:`evaluate_moves` updates the current allocation's totals
with the changed rows (O(K * D)) instead of evaluating each neighbour in full (O(K * M * D));
its answers are :func:`orchestrator.planning.cost_model.evaluate`'s. With a cascade the
problem's arrays already count in rows of the ensemble (the shares folded into the rates and
the fill times, as the cost model's docstring says), so nothing here reads a share.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orchestrator.planning.cost_model import (
    CONGESTION_POWER,
    TOLERANCE,
    Evaluation,
    meets_latency_target,
)
from orchestrator.planning.problem import Problem

__all__ = [
    "KIND_CELLS",
    "MAX_SWAPS",
    "SWAP_CELLS",
    "SWAP_POOL",
    "Moves",
    "evaluate_moves",
    "moves",
]

MAX_SWAPS = 100_000  # swaps in one neighbourhood at most (of ~500 instances and more)
SWAP_POOL = 2_000  # instances the swaps are drawn from at most
SWAP_CELLS = 8_000_000  # and swaps x 2 x devices at most (hundreds of GPUs)
KIND_CELLS = 4_000_000  # moves of each other kind x 2 x devices at most (thousands of GPUs)


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

    def slice(self, start: int, stop: int) -> Moves:
        return Moves(self.member[start:stop], self.row[start:stop], self.batch[start:stop])

    def apply(self, k: int, n: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, b = n.copy(), b.copy()
        for m, row, batch in zip(self.member[k], self.row[k], self.batch[k], strict=True):
            if m < len(n):
                n[m], b[m] = row, batch
        return n, b


def moves(n: np.ndarray, b: np.ndarray, sizes: int, only: np.ndarray | None = None) -> Moves:
    """Every allocation one move away: add, remove or move one instance; swap the devices of
    two instances of different members (at most :data:`MAX_SWAPS` of them and
    :data:`SWAP_CELLS` entries, evenly sampled, from at most :data:`SWAP_POOL` instances);
    change one member's batch size, alone, or smaller with one more instance, or larger with
    one fewer (each kind evenly sampled to :data:`KIND_CELLS` entries, on thousands of
    devices). ``only`` (M,) bool: just the moves of
    those members (a swap: if either is one), built for them alone (on many members and
    devices, building every move costs more than scoring the few that matter)."""
    members, devices = n.shape
    chosen = np.flatnonzero(np.ones(members, dtype=bool) if only is None else only)
    eye = np.eye(devices, dtype=n.dtype)
    held_m, held_d = np.nonzero(n)
    mine = np.isin(held_m, chosen)
    own_m, own_d = held_m[mine], held_d[mine]  # the chosen members' instances
    spare = n.sum(axis=1)[own_m] > 1  # removing one keeps the member served
    singles: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (members, rows, batches)

    def single(ms: np.ndarray, rows: np.ndarray, batches: np.ndarray) -> None:
        singles.append((ms, rows, batches))

    most = max(1, KIND_CELLS // (2 * devices))  # moves of one kind, at most (evenly sampled)
    all_m, all_d = _thin(most, np.repeat(chosen, devices), np.tile(np.arange(devices), len(chosen)))
    single(all_m, n[all_m] + eye[all_d], b[all_m])  # add
    rm_m, rm_d = own_m[spare], own_d[spare]
    single(rm_m, n[rm_m] - eye[rm_d], b[rm_m])  # remove
    mv_m = np.repeat(own_m, devices)
    mv_src = np.repeat(own_d, devices)
    mv_dst = np.tile(np.arange(devices), len(own_m))
    keep = mv_src != mv_dst
    mv_m, mv_src, mv_dst = _thin(most, mv_m[keep], mv_src[keep], mv_dst[keep])
    single(mv_m, n[mv_m] - eye[mv_src] + eye[mv_dst], b[mv_m])  # move
    rb_m = np.repeat(chosen, sizes)
    rb_k = np.tile(np.arange(sizes), len(chosen))
    keep = rb_k != b[rb_m]
    rb_m, rb_k = rb_m[keep], rb_k[keep]
    single(rb_m, n[rb_m], rb_k)  # another batch size
    smaller = rb_k < b[rb_m]  # a smaller batch frees memory: one more instance with it
    sm_m, sm_k = rb_m[smaller], rb_k[smaller]
    ra_m, ra_d, ra_k = _thin(
        most,
        np.repeat(sm_m, devices),
        np.tile(np.arange(devices), len(sm_m)),
        np.repeat(sm_k, devices),
    )
    single(ra_m, n[ra_m] + eye[ra_d], ra_k)
    # a larger batch needs memory: one fewer instance with it
    ri, hi = _thin(most, *np.nonzero((rb_m[:, None] == rm_m[None, :]) & ~smaller[:, None]))
    single(rb_m[ri], n[rb_m[ri]] - eye[rm_d[hi]], rb_k[ri])
    ms = np.concatenate([s[0] for s in singles])
    rows = np.concatenate([s[1] for s in singles])
    batches = np.concatenate([s[2] for s in singles])
    none = np.full(len(ms), members)
    member = np.stack([ms, none], axis=1)
    row = np.stack([rows, np.zeros_like(rows)], axis=1)
    batch = np.stack([batches, np.zeros_like(batches)], axis=1)
    # swap: instances of two members trade devices (of thousands of instances, an even
    # sample of them and of their pairs, so that a step stays bounded)
    pool = np.arange(len(held_m))
    if len(pool) > SWAP_POOL:
        pool = np.linspace(0, len(pool) - 1, SWAP_POOL).astype(np.int64)
    pm, pd, pmine = held_m[pool], held_d[pool], mine[pool]
    i, j = np.nonzero(
        (pm[:, None] < pm[None, :])
        & (pd[:, None] != pd[None, :])
        & (pmine[:, None] | pmine[None, :])
    )
    most = min(MAX_SWAPS, SWAP_CELLS // (2 * devices))  # each swap is 2 x D wide
    if len(i) > most:
        pick = np.linspace(0, len(i) - 1, most).astype(np.int64)
        i, j = i[pick], j[pick]
    m1, d1, m2, d2 = pm[i], pd[i], pm[j], pd[j]
    swap_member = np.stack([m1, m2], axis=1)
    swap_row = np.stack([n[m1] - eye[d1] + eye[d2], n[m2] - eye[d2] + eye[d1]], axis=1)
    swap_batch = np.stack([b[m1], b[m2]], axis=1)
    return Moves(
        np.concatenate([member, swap_member]),
        np.concatenate([row, swap_row]),
        np.concatenate([batch, swap_batch]),
    )


def _thin(most: int, *columns: np.ndarray) -> tuple[np.ndarray, ...]:
    """The same rows of every column, at most ``most`` of them, evenly spread."""
    if len(columns[0]) <= most:
        return columns
    pick = np.linspace(0, len(columns[0]) - 1, most).astype(np.int64)
    return tuple(c[pick] for c in columns)


def evaluate_moves(p: Problem, n: np.ndarray, b: np.ndarray, mv: Moves) -> Evaluation:
    """The same prediction as :func:`evaluate` for every candidate of ``mv``, computed from the
    current allocation's totals and the (at most two) changed rows: O(K * D), not O(K * M * D)."""
    members = len(p.members)
    idx = np.arange(members)
    rate_now = p.rate_by_batch[idx, b]  # (M, D)
    mem_now = p.memory_by_batch[idx, b]
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
    new_rate_rows = p.rate_by_batch[safe_m, bs]  # (K, 2, D)
    new_mem_rows = p.memory_by_batch[safe_m, bs]
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
    if p.counts_cpu:
        cpu_now = p.cpu_by_batch[idx, b]  # (M, D)
        share_now = n * rate_now * cpu_now / member_rate[:, None]  # CPU s per sample, by d
        need = share_now.sum(axis=0) + p.host_cpu_by_device
        ext_share = np.vstack([share_now, np.zeros((1, n.shape[1]))])
        new_cpu_rows = p.cpu_by_batch[safe_m, bs]
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
    threshold = throughput * (1 + TOLERANCE)
    sorted_rates = np.sort(member_rate)
    at_or_below = np.searchsorted(sorted_rates, threshold, side="right")  # (K,)
    changed_old = (real & (old_rate <= threshold[:, None])).sum(axis=1)
    changed_new = (real & (new_member_rate <= threshold[:, None])).sum(axis=1)
    binding = at_or_below - changed_old + changed_new + (device_limit <= threshold[:, None]).sum(1)
    # congestion relative to the current throughput t0, from the current sum and the changed rows
    t0 = max(float(member_rate.min()), 1e-30)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        base = ((t0 / member_rate) ** CONGESTION_POWER).sum()
        old_terms = np.where(real, (t0 / old_rate) ** CONGESTION_POWER, 0.0).sum(axis=1)
        new_terms = np.where(real, (t0 / new_member_rate) ** CONGESTION_POWER, 0.0).sum(axis=1)
        scale = throughput / t0
        device_terms = np.where(device_limit > 0, throughput[:, None] / device_limit, 1.0)
        congestion = scale**CONGESTION_POWER * np.maximum(base - old_terms + new_terms, 0.0) + (
            device_terms**CONGESTION_POWER
        ).sum(axis=1)
    if p.latency_target is not None:
        feasible &= _moves_meet_target(p, n, b, mv, throughput)
    return Evaluation(np.where(feasible, throughput, 0.0), binding, feasible, congestion)


def _moves_meet_target(
    p: Problem, n: np.ndarray, b: np.ndarray, mv: Moves, throughput: np.ndarray
) -> np.ndarray:
    """:func:`meets_latency_target` for every candidate: the current rows that fill a batch
    and slowest service times, with the changed members' replaced."""
    members = len(p.members)
    service_now = p.service_by_batch[np.arange(members), b]  # (M, D)
    slowest_now = np.where(n > 0, service_now, 0.0).max(axis=1)
    rows = np.tile(p.batch_rows[np.arange(members), b], (len(mv), 1))  # (K, M)
    slowest = np.tile(slowest_now, (len(mv), 1))
    for j in range(mv.member.shape[1]):
        k = np.flatnonzero(mv.member[:, j] < members)
        m, batch = mv.member[k, j], mv.batch[k, j]
        rows[k, m] = p.batch_rows[m, batch]
        service = p.service_by_batch[m, batch]  # (k, D)
        slowest[k, m] = np.where(mv.row[k, j] > 0, service, 0.0).max(axis=1)
    return meets_latency_target(p, rows, slowest, throughput)
