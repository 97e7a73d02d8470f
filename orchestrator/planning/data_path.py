"""How many combiner processes a plan needs, and what they carry.

A combiner process runs its event loop on one core, so it answers at most about
``1000 / combiner_cpu_ms`` requests a second, ``rows`` rows each, where ``chorus profile``
measured both on this host (:class:`~orchestrator.planning.profile.Host`). The plan needs
enough processes to carry what its members serve, within the cores of the combiner's node that
Triton's own work leaves: a core for each instance on that node's CPU (an instance runs one
batch at a time) and, when GPUs there hold instances, one core for Triton's front end.

When even that many processes carry less than the members serve, the data path caps the plan:
its predicted throughput is what the processes carry, and the plan says so with both numbers.
Without a measurement (no host costs in the profile) the plan keeps one process and says why;
without the node's cores (a hardware file listing no CPU there) the count is not capped by
them, and the plan says that too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from orchestrator.planning.hardware import Device
from orchestrator.planning.profile import Host

__all__ = ["MAX_WORKERS", "DataPath", "combiner_cpu", "data_path"]

MAX_WORKERS = 256  # combiner processes on one host, at most


# why a plan has no measure of what a combiner process carries
UNMEASURED = (
    "the profile has no measurement of the combiner's CPU per request; run 'chorus profile' on "
    "the serving host to size it"
)
UNSIZED = "the plan was made before Chorus sized the combiner; run 'chorus plan' again to size it"


@dataclass(frozen=True)
class DataPath:
    workers: int  # combiner processes
    members_throughput: float  # samples/s the members' plan serves
    per_worker: float | None  # samples/s one process carries; None: not measured
    cores: int | None  # cores the combiner may use on its node (0: none spare); None: not known
    rows: int = 1  # rows per request of that measure
    why: str = UNMEASURED  # when per_worker is None

    @property
    def capacity(self) -> float | None:
        """Samples/s the processes carry (None: not measured)."""
        return None if self.per_worker is None else self.workers * self.per_worker

    @property
    def caps(self) -> bool:
        """Whether the processes carry less than the members serve."""
        return self.capacity is not None and self.capacity < self.members_throughput

    @property
    def throughput(self) -> float:
        """What the plan serves: the members' throughput, or the data path's when it caps."""
        capacity = self.capacity
        return (
            self.members_throughput if capacity is None else min(capacity, self.members_throughput)
        )

    def describe(self) -> str:
        """One line for the terminal: the count and why."""
        if self.per_worker is None:
            return f"combiner: {self.workers} process(es) ({self.why})"
        each = (
            f"one carries about {self.per_worker:,.0f} samples/s in requests of {self.rows} "
            f"row(s), as the profile measured"
        )
        if self.cores is None:
            room = "the node's CPU cores are not known, so the count is not capped by them"
        elif self.cores == 0:
            room = "no core is left beside Triton's work: it shares Triton's"
        else:
            room = f"{self.cores} core(s) left to it beside Triton's work"
        line = f"combiner: {self.workers} process(es) ({each}; {room})"
        if self.caps:
            line += (
                f"; the data path caps this plan at {self.throughput:,.1f} samples/s, where the "
                f"members would serve {self.members_throughput:,.1f}"
            )
        return line


def combiner_cpu(devices: Sequence[Device]) -> int | None:
    """The index of the CPU the combiner runs on: the CPU of the first device's node (where the
    first Triton is, and the combiner beside it); None if that node lists no CPU."""
    if not devices:
        return None
    node = devices[0].node
    return next((j for j, d in enumerate(devices) if d.node == node and d.kind == "cpu"), None)


def data_path(
    members_throughput: float,
    host: Host | None,
    devices: Sequence[Device],
    instances: Mapping[str, Mapping[str, int]],
) -> DataPath:
    """The combiner processes for a plan whose members serve ``members_throughput`` samples/s
    with ``instances`` (member -> device id -> count) on ``devices``; the combiner runs on the
    first device's node (:func:`combiner_cpu`). A measure of 0 ms is no measure."""
    cpu_ms = None if host is None else host.combiner_cpu_ms
    if host is None or not cpu_ms or cpu_ms <= 0:
        return DataPath(1, members_throughput, None, None)
    per_worker = host.rows * 1000.0 / cpu_ms
    here = combiner_cpu(devices)
    cores = None
    if here is not None and devices[here].cores:
        cpu = devices[here]
        on_node = {d.id: d for d in devices if d.node == cpu.node}
        cpu_instances = sum(per.get(cpu.id, 0) for per in instances.values())
        gpu_busy = any(
            count and device in on_node and on_node[device].kind == "gpu"
            for per in instances.values()
            for device, count in per.items()
        )
        cores = max(0, cpu.cores - cpu_instances - (1 if gpu_busy else 0))
    needed = max(1, math.ceil(members_throughput / per_worker))
    workers = min(MAX_WORKERS, needed if cores is None else max(1, min(needed, cores)))
    return DataPath(workers, members_throughput, per_worker, cores, host.rows)
