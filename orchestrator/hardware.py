"""What devices this machine has. The only module that touches NVML.

Works with no GPU and no NVML library: then the machine is its CPU alone.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Literal

__all__ = ["Device", "discover"]


@dataclass(frozen=True)
class Device:
    node: str
    kind: Literal["gpu", "cpu"]
    index: int
    name: str
    memory_bytes: int
    free_bytes: int
    cores: int = 0  # CPU only

    @property
    def id(self) -> str:
        return f"{self.node}/{self.kind}{self.index}"


def discover(node: str | None = None) -> tuple[Device, ...]:
    """The GPUs NVML reports (if any), then the CPU."""
    node = node or socket.gethostname()
    return (*_gpus(node), _cpu(node))


def _gpus(node: str) -> list[Device]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver, no library, no GPU
        return []
    try:
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append(
                Device(
                    node=node,
                    kind="gpu",
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else name,
                    memory_bytes=int(mem.total),
                    free_bytes=int(mem.free),
                )
            )
        return devices
    finally:
        pynvml.nvmlShutdown()


def _cpu(node: str) -> Device:
    cores = len(os.sched_getaffinity(0))
    total = available = 0
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key == "MemTotal":
                total = int(value.split()[0]) * 1024
            elif key == "MemAvailable":
                available = int(value.split()[0]) * 1024
    model = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "cpu"
            )
    except OSError:
        pass
    return Device(node, "cpu", 0, model, total, available, cores=cores)
