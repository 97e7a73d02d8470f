"""The devices to plan for: this machine's (discovered), or another's (a hardware file).

The only module that touches NVML. Discovery works with no GPU and no NVML library: then the
machine is its CPU alone. A hardware file describes machines that are not here, on one or
several nodes::

    nodes:
      - name: node0
        devices:
          - {kind: gpu, index: 0, name: "Tesla V100-SXM2-16GB", memory_gb: 16}
          - {kind: gpu, index: 1, name: "A100-SXM4-40GB", memory_gb: 40, speed: 2.0}
          - {kind: cpu, cores: 32, memory_gb: 128}

``speed`` scales a profile measured on another device of the same kind (default 1.0);
``lanes`` is how many instances the device runs at full speed side by side (default: a GPU 1,
a CPU its cores).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import psutil
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
)

from orchestrator.errors import SpecError, from_validation
from orchestrator.planning.files import Real, read_yaml

__all__ = ["LOCAL_NODE", "Device", "NodeName", "discover", "gpu_used_bytes", "load_hardware"]

LOCAL_NODE = "node0"
_GB = 1 << 30


@dataclass(frozen=True)
class Device:
    node: str
    kind: Literal["gpu", "cpu"]
    index: int
    name: str
    memory_bytes: int
    free_bytes: int
    cores: int = 0  # CPU only
    speed: float = 1.0  # latency of a profile measured on this kind of device is divided by it
    lanes: int = 1  # instances that run side by side at full speed

    @property
    def id(self) -> str:
        return f"{self.node}/{self.kind}{self.index}"


def discover(node: str = LOCAL_NODE) -> tuple[Device, ...]:
    """The GPUs NVML reports (if any), then the CPU."""
    return (*_gpus(node), _cpu(node))


def gpu_used_bytes(index: int) -> int:
    """Memory in use on one GPU, as NVML reports it."""
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    finally:
        pynvml.nvmlShutdown()


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
    """The cores this process may run on, the machine's memory (total, and what it can give
    without swapping), and the CPU's model name."""
    cores = len(os.sched_getaffinity(0))
    memory = psutil.virtual_memory()
    return Device(
        node, "cpu", 0, _cpu_model(), memory.total, memory.available, cores=cores, lanes=cores
    )


def _cpu_model() -> str:
    """The CPU's model name, as profiles may name the device ("cpu" where it has none). psutil
    does not give it, and ``platform.processor()`` gives the architecture on Linux: it is read
    from /proc/cpuinfo, where x86 machines list it (ARM ones do not)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "cpu"
            )
    except OSError:
        return "cpu"


def _not_a_folder_step(name: str) -> str:
    if name in (".", ".."):
        raise ValueError(f"{name!r} is not a node name: each node gets a folder by its name")
    return name


# a node's name: its repository's folder under the render's output, its service and pod names
NodeName = Annotated[
    str,
    Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=255),  # (a folder's name)
    AfterValidator(_not_a_folder_step),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DeviceFile(_Strict):
    kind: Literal["gpu", "cpu"]
    # (a number past these is a typo: a GPU index of 1e20 had been rendered into Triton's
    # config, and that many cores had the data path plan 256 combiner processes)
    # (strict: YAML's `true` had been read as 1, a GPU index node0/gpu1)
    index: StrictInt = Field(0, ge=0, le=1023)
    name: str | None = Field(None, description="device name, matched against profile keys")
    memory_gb: Real = Field(gt=0, le=1e9)  # up to an exabyte
    cores: StrictInt | None = Field(None, ge=1, le=1 << 20, description="CPU cores")
    speed: Real = Field(1.0, gt=0, le=1e6)
    lanes: StrictInt | None = Field(None, ge=1, le=1024)


class NodeFile(_Strict):
    name: NodeName
    devices: list[DeviceFile] = Field(min_length=1)


class HardwareFile(_Strict):
    nodes: list[NodeFile] = Field(min_length=1)


def load_hardware(path: str | Path) -> tuple[Device, ...]:
    """The devices a hardware file describes, in file order."""
    file = Path(path)
    raw = read_yaml(file)
    try:
        spec = HardwareFile.model_validate(raw)
    except ValidationError as e:
        raise from_validation(file, e) from None
    devices: list[Device] = []
    seen: set[str] = set()
    for n, node in enumerate(spec.nodes):
        for i, d in enumerate(node.devices):
            cores = d.cores or 0
            lanes = d.lanes or (max(1, cores) if d.kind == "cpu" else 1)
            memory = int(d.memory_gb * _GB)
            device = Device(
                node.name,
                d.kind,
                d.index,
                d.name or d.kind,
                memory,
                memory,
                cores=cores,
                speed=d.speed,
                lanes=lanes,
            )
            if device.id in seen:
                raise SpecError(
                    file, f"nodes[{n}].devices[{i}].index", f"device {device.id} is listed twice"
                )
            seen.add(device.id)
            devices.append(device)
    return tuple(devices)
