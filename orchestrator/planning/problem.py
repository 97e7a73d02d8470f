"""The planning problem as arrays: what one instance of each member serves, needs and costs on
each device at each batch size, built from a profile and the devices by :func:`problem`.

:class:`Problem` holds the arrays as the profile gives them, indexed [member, device, batch
index]. The cost model gathers them millions of times per search by member and batch index, so
it reads copies laid out [member, batch index, device]; those are derived from the fields, once
per problem and on first use, as cached properties (a frozen dataclass, never patched).

With a cascade, member m sees only a share of the ensemble's rows (:attr:`Problem.shares`). The
derived arrays fold that share in once, so that the cost model counts everything in rows of the
ensemble: an instance covers ``rate / share`` of them per second, spends ``cpu * share`` CPU
seconds on each, and one batch of b samples holds ``b / share`` of them
(:mod:`orchestrator.planning.cost_model` says why this is the whole change).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from orchestrator.errors import SpecError
from orchestrator.planning.data_path import combiner_cpu
from orchestrator.planning.hardware import Device
from orchestrator.planning.profile import Profile

__all__ = ["Problem", "problem"]

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
    # (M,) with a cascade, the share of the ensemble's rows that reach each member, in (0, 1]
    # (1 for the first tier); None: every member sees every row
    shares: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.shares is not None:
            shares = np.asarray(self.shares, dtype=float)
            if shares.shape != (len(self.members),):
                raise ValueError(f"shares: {shares.shape}, expected ({len(self.members)},)")
            if not ((shares > 0) & (shares <= 1)).all():
                raise ValueError(f"shares must be in (0, 1], got {shares.tolist()}")

    # What the cost model gathers from, derived from the fields above. Each (M, B, D) array is
    # a contiguous copy, so that indexing by [members, batch indices] is one gather.

    @cached_property
    def share_values(self) -> np.ndarray:
        """(M,) :attr:`shares`, all 1.0 without a cascade."""
        if self.shares is None:
            return np.ones(len(self.members))
        return np.asarray(self.shares, dtype=float)

    @cached_property
    def rate_by_batch(self) -> np.ndarray:
        """(M, B, D) rows of the ensemble one instance covers per second: :attr:`rate` over the
        member's share (it serves s * T samples/s of an ensemble serving T rows/s)."""
        rows = self.rate / self.share_values[:, None, None]
        return np.ascontiguousarray(rows.transpose(0, 2, 1))

    @cached_property
    def memory_by_batch(self) -> np.ndarray:
        """(M, B, D) :attr:`memory`, with "cannot run" made finite (more than any device has)
        so that 0 instances of it need 0 bytes."""
        finite = np.where(np.isfinite(self.memory), self.memory, _UNRUNNABLE)
        return np.ascontiguousarray(finite.transpose(0, 2, 1))

    @cached_property
    def batch_size_values(self) -> np.ndarray:
        """(B,) :attr:`batch_sizes` as floats."""
        return np.array(self.batch_sizes, dtype=float)

    @cached_property
    def batch_rows(self) -> np.ndarray:
        """(M, B) rows of the ensemble it takes to fill one batch of each member: its batch
        size over its share (a member only a few rows reach fills its batches slowly)."""
        return self.batch_size_values[None, :] / self.share_values[:, None]

    @cached_property
    def call_rate_by_batch(self) -> np.ndarray:
        """(M, B, D) rows of the ensemble one call's round trip covers per second:
        :attr:`call_rate` (or :attr:`rate` where the profile did not measure it) over the
        member's share."""
        call = self.rate if self.call_rate is None else self.call_rate
        rows = call / self.share_values[:, None, None]
        return np.ascontiguousarray(rows.transpose(0, 2, 1))

    @cached_property
    def service_by_batch(self) -> np.ndarray:
        """(M, B, D) seconds one call takes (its batch size over its call rate); inf where it
        cannot run."""
        call = self.rate if self.call_rate is None else self.call_rate
        with np.errstate(divide="ignore"):
            service = np.where(call > 0, self.batch_size_values / call, np.inf)
        return np.ascontiguousarray(service.transpose(0, 2, 1))

    @cached_property
    def cpu_by_batch(self) -> np.ndarray:
        """(M, B, D) CPU seconds per row of the ensemble: :attr:`cpu` (0 where the profile did
        not measure it) times the member's share."""
        cpu = np.zeros_like(self.rate) if self.cpu is None else self.cpu
        rows = cpu * self.share_values[:, None, None]
        return np.ascontiguousarray(rows.transpose(0, 2, 1))

    @cached_property
    def host_cpu_by_device(self) -> np.ndarray:
        """(D,) :attr:`host_cpu` on :attr:`host_device`, 0 on the others."""
        host = np.zeros(len(self.devices))
        if self.host_device >= 0:
            host[self.host_device] = self.host_cpu
        return host

    @cached_property
    def counts_cpu(self) -> bool:
        """Whether any CPU cost was measured: else the cost model skips the CPU constraint."""
        return bool(self.cpu_by_batch.any() or self.host_cpu_by_device.any())


def _later_tiers_batch_what_reaches_them(
    rates: Sequence[np.ndarray],
    memory: np.ndarray,
    sizes: Sequence[int],
    max_batch_size: int,
    shares: Sequence[float],
) -> None:
    """A member a share s of the rows reaches (a cascade's later tier) gets, per batch of the
    combiner (at most ``max_batch_size`` rows), only the rows of it that reach it: about
    s x max_batch_size. It is never called with more, so on each device, batch sizes beyond the
    first one measured there that holds them cannot run (their rate would be a batch it never
    sees): ``rates`` (each (M, D, B): the rate, the call rate, the CPU) get 0 there, and
    ``memory`` inf."""
    rate = rates[0]
    for i, share in enumerate(shares):
        if share >= 1:
            continue
        rows = math.ceil(max_batch_size * share)
        for j in range(rate.shape[1]):
            holding = [k for k, b in enumerate(sizes) if b >= rows and rate[i, j, k] > 0]
            if holding:
                for r in rates:
                    r[i, j, holding[0] + 1 :] = 0.0
                memory[i, j, holding[0] + 1 :] = np.inf


def problem(
    members: Sequence[str],
    profile: Profile,
    devices: Sequence[Device],
    max_batch_size: int,
    profile_file: str | Path = "profile",
    latency_target_ms: float | None = None,
    borrow_curves: bool = False,
    clients_on_host: bool = False,
    shares: Sequence[float] | None = None,
) -> Problem:
    """The arrays for these members on these devices; a device with no curve for a member
    cannot hold it (``borrow_curves``: it runs the member's curve of another device, scaled by
    its ``speed``). Where the profile measured them, an instance is busy for its service time
    (not the call's round trip), and the CPU that Triton spends per call and the combiner per
    request (``clients_on_host``: and the clients) count against the first CPU device.
    ``shares``: with a cascade, the share of the rows that reach each member (in the order of
    ``members``; ValueError outside (0, 1])."""
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
    here = combiner_cpu(devices)  # the CPU the combiner runs on, if the devices list it
    host = profile.host if here is not None else None
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
    if shares is not None:
        _later_tiers_batch_what_reaches_them(
            (rate, call_rate, cpu), memory, sizes, max_batch_size, shares
        )
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
            lanes[here] *= host.busy_share
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
        host_device=-1 if here is None else here,
        host_latency=host_latency,
        sequential_call=sequential_call,
        rows_per_request=rows,
        shares=None if shares is None else np.array(shares, dtype=float),
    )
