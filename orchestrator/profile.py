"""Profiles: per member and device, the memory one instance needs and its latency per batch size.

The file (``profile.json``) is written by ``chorus profile`` or by hand, for hardware that is
not here::

    {"members": {"resnet": {"gpu": {"memory_bytes": 5000000000,
                                    "memory_per_sample_bytes": 20000000,
                                    "latency_ms": {"1": 5.0, "8": 12.5, "32": 40.0}}}}}

Keys under a member are a device kind (``gpu``, ``cpu``) or an exact device name, which wins.
Measuring lives in :mod:`orchestrator.measure`; this module is pure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import SpecError, from_validation
from .hardware import Device

__all__ = ["Curve", "Profile", "load_profile", "save_profile"]


@dataclass(frozen=True)
class Curve:
    """One member on one kind of device."""

    memory_bytes: int
    memory_per_sample_bytes: int
    latency_ms: tuple[tuple[int, float], ...]  # (batch size, ms), sorted by batch size

    def memory(self, batch: int) -> int:
        return self.memory_bytes + batch * self.memory_per_sample_bytes

    def latency(self, batch: int) -> float | None:
        """Latency in ms at ``batch``, interpolated linearly between measured sizes; None
        outside the measured range."""
        points = self.latency_ms
        for (b0, l0), (b1, l1) in pairwise(points):
            if b0 <= batch <= b1:
                return l0 + (l1 - l0) * (batch - b0) / (b1 - b0)
        if points and batch == points[-1][0]:
            return points[-1][1]
        return None

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(b for b, _ in self.latency_ms)


@dataclass(frozen=True)
class Profile:
    members: Mapping[str, Mapping[str, Curve]]

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
        data = {
            "members": {
                m: {
                    key: {
                        "memory_bytes": c.memory_bytes,
                        "memory_per_sample_bytes": c.memory_per_sample_bytes,
                        "latency_ms": {str(b): round(lat, 4) for b, lat in c.latency_ms},
                    }
                    for key, c in curves.items()
                }
                for m, curves in self.members.items()
            }
        }
        return json.dumps(data, indent=2) + "\n"


class _CurveFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    memory_bytes: int = Field(ge=0)
    memory_per_sample_bytes: int = Field(0, ge=0)
    latency_ms: dict[int, float] = Field(min_length=1, description="batch size -> latency")

    @field_validator("latency_ms")
    @classmethod
    def _positive(cls, v: dict[int, float]) -> dict[int, float]:
        for batch, ms in v.items():
            if batch < 1 or ms <= 0:
                raise ValueError(f"batch sizes and latencies must be positive (got {batch}: {ms})")
        return v


class _ProfileFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    members: dict[str, dict[str, _CurveFile]]


def load_profile(path: str | Path) -> Profile:
    file = Path(path)
    try:
        spec = _ProfileFile.model_validate_json(file.read_text())
    except FileNotFoundError:
        raise SpecError(file, "", "no such file") from None
    except ValidationError as e:
        raise from_validation(file, e) from None
    return Profile(
        {
            m: {
                key: Curve(
                    c.memory_bytes, c.memory_per_sample_bytes, tuple(sorted(c.latency_ms.items()))
                )
                for key, c in curves.items()
            }
            for m, curves in spec.members.items()
        }
    )


def save_profile(profile: Profile, path: str | Path) -> None:
    Path(path).write_text(profile.to_json())
