"""What processes and cores have used: the resident memory and CPU time of a process tree (a
Triton and its Python backend stubs, a combiner and its workers), and the busy and idle time of
a set of cores. The profile reads them before and after what it measures; everything goes
through psutil, nothing reads ``/proc`` by hand.

Every reader tolerates processes that end while it reads them (a backend stub that exits as its
model unloads, a deployment that has stopped): what has gone counts as nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence, Set

import psutil

__all__ = ["core_times_s", "cpu_by_process", "cpu_spent", "tree_cpu_s", "tree_rss_bytes"]

# a process's CPU so far, keyed by (pid, start time): a pid reused meanwhile is another process
ProcessCpu = Mapping[tuple[int, float], float]


def _tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants; none if it has gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_rss_bytes(pid: int, marker: str | None = None) -> int:
    """Resident memory of a process and all its descendants; with ``marker``, only of the
    descendants with an argument that contains it (a member's backend stubs), the process itself
    left out."""
    total = 0
    for process in _tree(pid):
        try:
            if marker is not None and (
                process.pid == pid or not any(marker in arg for arg in process.cmdline())
            ):
                continue
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total


def tree_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) of a process and its descendants so far, the children they
    have reaped included."""
    if pid is None:
        return 0.0
    total = 0.0
    for process in _tree(pid):
        try:
            t = process.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def cpu_by_process(roots: Sequence[int]) -> dict[tuple[int, float], float]:
    """CPU seconds (user + system) so far of each process of these trees, by (pid, start)."""
    spent: dict[tuple[int, float], float] = {}
    for root in roots:
        for process in _tree(root):
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    spent[(process.pid, process.create_time())] = times.user + times.system
            except psutil.Error:
                pass
    return spent


def cpu_spent(before: ProcessCpu, after: ProcessCpu) -> float:
    """CPU seconds spent between two readings of :func:`cpu_by_process` (a process that ended
    meanwhile is left out; one that began counts from its start)."""
    return sum(cpu - before.get(key, 0.0) for key, cpu in after.items())


def core_times_s(cores: Set[int]) -> tuple[float, float]:
    """(busy, idle) seconds of these cores so far (busy: every process and the kernel; idle:
    waiting for I/O included; time stolen by a hypervisor is neither).

    psutil lists the online cores in order, without their numbers: core ``i`` is at position
    ``i`` unless some core is offline. Then, unless these cores are all of them, which entries
    they are is unknown, and every online core is counted (more idle time: a busy share that
    comes out lower, the cautious side)."""
    per_core = psutil.cpu_times(percpu=True)
    if len(cores) < len(per_core) == os.sysconf("SC_NPROCESSORS_CONF"):
        counted = [t for core, t in enumerate(per_core) if core in cores]
    else:  # every online core (the scheduler lets a process on online cores only)
        counted = per_core if cores else []
    busy = sum(t.user + t.nice + t.system + t.irq + t.softirq for t in counted)
    idle = sum(t.idle + t.iowait for t in counted)
    return busy, idle
