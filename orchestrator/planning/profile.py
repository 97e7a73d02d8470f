"""Profiles: per member and device, the memory one instance needs and its latency per batch size.

The file (``profile.json``) is written by ``chorus profile`` or by hand, for hardware that is
not here::

    {"members": {"resnet": {"gpu": {"memory_bytes": 5000000000,
                                    "memory_per_sample_bytes": 20000000,
                                    "latency_ms": {"1": 5.0, "8": 12.5, "32": 40.0}}}}}

Keys under a member are a device kind (``gpu``, ``cpu``) or an exact device name, which wins.
Measuring lives in :mod:`orchestrator.measuring.measure`; this module is pure.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.errors import from_validation
from orchestrator.planning.files import read_json
from orchestrator.planning.hardware import Device

__all__ = ["HOST_COSTS", "Curve", "Host", "Profile", "load_profile", "save_profile"]

# the fields of Host that are costs in ms (a median over measuring rounds, or None: unmeasured)
HOST_COSTS = ("combiner_cpu_ms", "client_cpu_ms", "latency_ms", "call_cpu_ms", "sequential_call_ms")


@dataclass(frozen=True)
class Curve:
    """One member on one kind of device."""

    memory_bytes: int
    memory_per_sample_bytes: int
    latency_ms: tuple[tuple[int, float], ...]  # (batch size, ms), sorted by batch size
    # measured by chorus profile on Triton (optional): the time an instance is busy with one
    # batch (Triton's compute statistics), and the CPU Triton's processes spend on one call
    service_ms: tuple[tuple[int, float], ...] = ()
    cpu_ms: tuple[tuple[int, float], ...] = ()

    def memory(self, batch: int) -> int:
        return self.memory_bytes + batch * self.memory_per_sample_bytes

    def latency(self, batch: int) -> float | None:
        """Latency in ms at ``batch`` (a call's round trip), interpolated linearly between
        measured sizes; None outside the measured range."""
        return _interpolate(self.latency_ms, batch)

    def service(self, batch: int) -> float | None:
        """ms an instance is busy with a batch: measured, else the latency."""
        return _interpolate(self.service_ms, batch) if self.service_ms else self.latency(batch)

    def cpu(self, batch: int) -> float:
        """CPU ms Triton spends on one call of ``batch`` (0 where not measured)."""
        return (_interpolate(self.cpu_ms, batch) or 0.0) if self.cpu_ms else 0.0

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(b for b, _ in self.latency_ms)


def _interpolate(points: tuple[tuple[int, float], ...], batch: int) -> float | None:
    for (b0, l0), (b1, l1) in pairwise(points):
        if b0 <= batch <= b1:
            return l0 + (l1 - l0) * (batch - b0) / (b1 - b0)
    if points and batch == points[-1][0]:
        return points[-1][1]
    return None


@dataclass(frozen=True)
class Host:
    """What serving costs beyond the members' calls as measured one at a time, per request
    of ``rows`` rows, measured through the combiner under load on this host's CPU:

    * ``combiner_cpu_ms``: the CPU per request of the processes serving beyond the members'
      calls and the client (the combiner, the kernel's loopback network charged to them);
    * ``client_cpu_ms``: the client's CPU per request (counted when it runs on this host);
    * ``call_cpu_ms``: what one member call costs when serving, beyond Triton's CPU for that
      call measured one call at a time (the combiner's side of the call, less the wake-ups
      that a busy Triton does not pay);
    * ``latency_ms``: what a request adds to its slowest member call (members concurrent);
    * ``sequential_call_ms``: what each member call adds to a request when the members are
      called one after another, beyond its round trip measured alone and ``latency_ms``;
    * ``busy_share``: the share of the CPU's cores serving keeps busy when its load would take
      them all (the processes of a request wait on each other); None: all of them.

    A cost is the median over repeated measuring rounds; ``bounds`` holds its range over them
    (field, lowest, highest). A cost the host could not measure (a median below 0: the
    difference of two windows lost in the host's noise) is None, and ``unmeasured`` says why
    (field, reason); the planner counts it as 0. So is a ``busy_share`` that this host's load
    cannot tell (the planner then counts every core). Files written by hand or by an older
    Chorus may hold a negative ``call_cpu_ms`` or ``sequential_call_ms`` (a correction)."""

    rows: int
    combiner_cpu_ms: float | None
    client_cpu_ms: float | None
    latency_ms: float | None
    call_cpu_ms: float | None = 0.0
    sequential_call_ms: float | None = 0.0
    busy_share: float | None = None
    unmeasured: tuple[tuple[str, str], ...] = ()
    bounds: tuple[tuple[str, float, float], ...] = ()


@dataclass(frozen=True)
class Profile:
    members: Mapping[str, Mapping[str, Curve]]
    host: Host | None = None

    def curve(self, member: str, device: Device, borrow: bool = False) -> Curve | None:
        """The member's curve for this device: by its exact name, else by its kind; with
        ``borrow``, else the member's first curve of any device (the device's ``speed`` then
        says how much faster it is than the one measured)."""
        curves = self.members.get(member, {})
        found = curves.get(device.name) or curves.get(device.kind)
        if found is None and borrow and curves:
            found = next(iter(curves.values()))
        return found

    def uncovered(self, members: Sequence[str], devices: Sequence[Device]) -> dict[str, list[str]]:
        """Device id -> the members that have no curve for it (devices with none left out)."""
        missing = {d.id: [m for m in members if self.curve(m, d) is None] for d in devices}
        return {d: ms for d, ms in missing.items() if ms}

    def to_json(self) -> str:
        data: dict[str, object] = {
            "members": {
                m: {
                    key: {
                        "memory_bytes": c.memory_bytes,
                        "memory_per_sample_bytes": c.memory_per_sample_bytes,
                        "latency_ms": {str(b): round(lat, 4) for b, lat in c.latency_ms},
                        **({"service_ms": _points(c.service_ms)} if c.service_ms else {}),
                        **({"cpu_ms": _points(c.cpu_ms)} if c.cpu_ms else {}),
                    }
                    for key, c in curves.items()
                }
                for m, curves in self.members.items()
            }
        }
        if self.host is not None:
            host = self.host
            data["host"] = {
                "rows_per_request": host.rows,
                **{name: _round(getattr(host, name), 4) for name in HOST_COSTS},
                "busy_share": _round(host.busy_share, 3),
                **({"unmeasured": dict(host.unmeasured)} if host.unmeasured else {}),
                **(
                    {"bounds": {f: [round(lo, 4), round(hi, 4)] for f, lo, hi in host.bounds}}
                    if host.bounds
                    else {}
                ),
            }
        return json.dumps(data, indent=2) + "\n"


def _points(points: tuple[tuple[int, float], ...]) -> dict[str, float]:
    return {str(b): round(v, 4) for b, v in points}


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


class _CurveFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    memory_bytes: int = Field(ge=0)
    memory_per_sample_bytes: int = Field(0, ge=0)
    latency_ms: dict[int, float] = Field(min_length=1, description="batch size -> latency")
    service_ms: dict[int, float] = Field({}, description="batch size -> busy time of an instance")
    cpu_ms: dict[int, float] = Field({}, description="batch size -> Triton CPU per call")

    @field_validator("latency_ms", "service_ms", "cpu_ms", mode="before")
    @classmethod
    def _batch_sizes_written_plainly(cls, v: Any) -> Any:
        # pydantic reads "01", "+1" and "1_0" as numbers: two spellings of one batch size
        # would keep the last without a word
        if isinstance(v, dict):
            for batch in v:
                if not isinstance(batch, int) and not re.fullmatch(r"[1-9][0-9]*", str(batch)):
                    raise ValueError(
                        f"batch size {batch!r} is not a whole number from 1, written "
                        "plainly (1, 8, 64)"
                    )
        return v

    @field_validator("latency_ms", "service_ms")
    @classmethod
    def _positive(cls, v: dict[int, float]) -> dict[int, float]:
        for batch, ms in v.items():
            if batch < 1 or ms <= 0:
                raise ValueError(f"batch sizes and latencies must be positive (got {batch}: {ms})")
        return v

    @field_validator("cpu_ms")
    @classmethod
    def _not_negative(cls, v: dict[int, float]) -> dict[int, float]:
        # the kernel counts CPU time in ticks: a short measurement may see none
        for batch, ms in v.items():
            if batch < 1 or ms < 0:
                raise ValueError(f"batch sizes must be positive, CPU not negative ({batch}: {ms})")
        return v


class _HostFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    rows_per_request: int = Field(ge=1)
    combiner_cpu_ms: float | None = Field(ge=0)
    client_cpu_ms: float | None = Field(0.0, ge=0)
    latency_ms: float | None = Field(0.0, ge=0)
    call_cpu_ms: float | None = 0.0
    sequential_call_ms: float | None = 0.0
    busy_share: float | None = Field(None, gt=0, le=1)
    unmeasured: dict[str, str] = Field({}, description="cost -> why it could not be measured")
    bounds: dict[str, tuple[float, float]] = Field(
        {}, description="cost -> (lowest, highest) over the measuring rounds"
    )

    @field_validator("unmeasured", "bounds")
    @classmethod
    def _costs(cls, v: dict[str, object]) -> dict[str, object]:
        for name in v:
            if name not in (*HOST_COSTS, "busy_share"):
                known = ", ".join((*HOST_COSTS, "busy_share"))
                raise ValueError(f"{name!r} is not a measured cost (one of: {known})")
        return v


class _ProfileFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    members: dict[str, dict[str, _CurveFile]]
    host: _HostFile | None = None


def load_profile(path: str | Path) -> Profile:
    file = Path(path)
    try:
        spec = _ProfileFile.model_validate_json(read_json(file))
    except ValidationError as e:
        raise from_validation(file, e) from None
    host = spec.host
    return Profile(
        {
            m: {
                key: Curve(
                    c.memory_bytes,
                    c.memory_per_sample_bytes,
                    tuple(sorted(c.latency_ms.items())),
                    tuple(sorted(c.service_ms.items())),
                    tuple(sorted(c.cpu_ms.items())),
                )
                for key, c in curves.items()
            }
            for m, curves in spec.members.items()
        },
        None
        if host is None
        else Host(
            host.rows_per_request,
            host.combiner_cpu_ms,
            host.client_cpu_ms,
            host.latency_ms,
            host.call_cpu_ms,
            host.sequential_call_ms,
            host.busy_share,
            tuple(host.unmeasured.items()),
            tuple((name, lo, hi) for name, (lo, hi) in host.bounds.items()),
        ),
    )


def save_profile(profile: Profile, path: str | Path) -> None:
    Path(path).write_text(profile.to_json())
