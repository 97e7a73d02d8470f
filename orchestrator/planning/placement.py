"""The paper's worst-fit placement: the allocation the search starts from.

One instance per member, largest member first, each on the device with the most free memory;
where that leaves a member no room although a placement exists, a depth-first search finds
one; where none exists, :class:`~orchestrator.errors.InfeasibleError` says which member fits
nowhere and by how much. It reads the profile's rates only to compare one member's batch sizes,
so a cascade's share of rows (one factor per member) changes nothing here.
"""

from __future__ import annotations

import numpy as np

from orchestrator.errors import InfeasibleError
from orchestrator.planning.problem import Problem

__all__ = ["worst_fit"]


def worst_fit(p: Problem) -> tuple[np.ndarray, np.ndarray]:
    """One instance per member, largest member first, each on the device with the most free
    memory, at the member's most efficient batch size (the highest throughput per instance)
    that still fits there, else the largest that does.

    Where worst-fit leaves a member with no room although a placement exists (tightly packed
    devices), a depth-first search over devices finds one. Raises InfeasibleError naming the
    member that fits nowhere, the memory it needs and the largest free device memory.
    """
    small, first = _smallest(p)
    need = np.where(np.isfinite(small), small, -1).max(axis=1)
    order = sorted(range(len(p.members)), key=lambda i: (-need[i], i))
    free = p.capacity.copy()
    placement: dict[int, int] = {}
    for m in order:
        fits = small[m] <= free  # (inf where it does not run)
        if not fits.any():
            found = _pack(p, order, small)
            if found is None:
                raise _nowhere(p, m, small[m], first[m], free)
            placement = found
            break
        d = int(np.argmax(np.where(fits, free, -np.inf)))
        placement[m] = d
        free[d] -= small[m, d]
    free = p.capacity.copy()
    for m, d in placement.items():
        free[d] -= small[m, d]
    n = np.zeros((len(p.members), len(p.devices)), dtype=np.int64)
    batch = np.zeros(len(p.members), dtype=np.int64)
    for m in order:  # largest first: each takes the most efficient batch that still fits
        d = placement[m]
        room = free[d] + small[m, d]
        k = int(
            np.argmax(np.where((p.memory[m, d] <= room) & (p.rate[m, d] > 0), p.rate[m, d], -1.0))
        )
        n[m, d], batch[m] = 1, k
        free[d] = room - p.memory[m, d, k]
    return n, batch


def _smallest(p: Problem) -> tuple[np.ndarray, np.ndarray]:
    """(M, D) the memory one instance needs at the smallest batch size it runs at on each
    device (inf where it runs at none: a member's curve may start above the smallest batch
    size another member was measured at), and that batch size's index."""
    memory = np.where(p.rate > 0, p.memory, np.inf)
    return memory.min(axis=2), memory.argmin(axis=2)


def _nowhere(
    p: Problem, m: int, small: np.ndarray, first: np.ndarray, free: np.ndarray
) -> InfeasibleError:
    """The error for member ``m``, which fits on no device (``small``: its memory there)."""
    runnable = np.isfinite(small)
    if not runnable.any():
        return InfeasibleError(f"member {p.members[m]!r} runs at no batch size on any device")
    best = int(np.argmax(np.where(runnable, free, -1)))
    least = int(np.argmin(np.where(runnable, small, np.inf)))
    return InfeasibleError(
        f"member {p.members[m]!r} needs {_bytes(small[least])} for one instance at batch size "
        f"{p.batch_sizes[first[least]]}, but the largest free device memory is "
        f"{_bytes(free[best])} (on {p.devices[best].id})"
        + ("" if free[best] == p.capacity[best] else ", after placing the larger members")
    )


def _pack(
    p: Problem, order: list[int], small: np.ndarray, budget: int = 200_000
) -> dict[int, int] | None:
    """A placement of one instance per member at its smallest batch size (``small``: its memory
    there, per device), by depth-first search (devices with the most free memory first); None
    if there is none within the budget."""
    if sum(small[m].min() for m in order) > p.capacity.sum():
        return None  # not even all the devices' memory together holds them
    free = p.capacity.copy()
    placement: dict[int, int] = {}
    steps = 0

    def place(i: int) -> bool:
        nonlocal steps
        if i == len(order):
            return True
        if steps > budget:
            return False
        m = order[i]
        tried: set[float] = set()
        for d in np.argsort(-free, kind="stable"):
            steps += 1
            need = small[m, d]
            if steps > budget or need > free[d] or free[d] in tried:
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
