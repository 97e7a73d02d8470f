"""The plan: the allocation matrix as the orchestrator hands it on (JSON, a table, configs).

Its JSON (``chorus plan --json``) is the contract of design.md: fields may be added, not renamed.
A plan for a cascade adds ``shares`` (the share of the rows that reach each member) and
``full_ensemble_throughput`` (what the plan for every member on every row predicts, to compare);
plans without them read as before.
"""

from __future__ import annotations

import json
import math
import numbers
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator
from rich.table import Table

from orchestrator.errors import InfeasibleError, SpecError, from_validation
from orchestrator.planning.allocate import (
    Problem,
    SearchResult,
    evaluate,
    greedy,
    member_latency,
    problem,
    sequential_throughput,
)
from orchestrator.planning.climb import Budget
from orchestrator.planning.data_path import (
    MAX_WORKERS,
    UNMEASURED,
    UNSIZED,
    DataPath,
    data_path,
)
from orchestrator.planning.files import read_json
from orchestrator.planning.hardware import Device, NodeName
from orchestrator.planning.profile import Host, Profile

__all__ = [
    "Plan",
    "load_plan",
    "make_plan",
    "one_instance_each",
    "plan_ensemble",
    "plan_table",
    "predict",
    "predict_sequential",
    "with_data_path",
]


@dataclass(frozen=True)
class Plan:
    """The allocation matrix, the contract between the orchestrator and Triton's configs."""

    ensemble: str
    devices: tuple[Device, ...]
    planned_memory_bytes: Mapping[str, int]  # device id -> bytes
    members: tuple[str, ...]
    instances: Mapping[str, Mapping[str, int]]  # member -> device id -> count (> 0)
    max_batch_size: Mapping[str, int]
    predicted_throughput: float  # samples (rows of the ensemble) per second
    # seconds a sample may spend in each member: fill one batch + its service time (ms)
    predicted_latency_ms: Mapping[str, float] = field(default_factory=dict)
    latency_target_ms: float | None = None
    # with a cascade: the share of the rows that reach each member (empty: every row reaches
    # every member), and the throughput of the plan made for the full ensemble (every share 1)
    shares: Mapping[str, float] = field(default_factory=dict)
    full_ensemble_throughput: float | None = None
    # the data path (:mod:`orchestrator.planning.data_path`): the combiner processes the plan
    # needs, what one carries (samples/s; None: not measured), the cores left to them on their
    # node (None: not known), and what the members alone would serve (predicted_throughput is
    # the lower of that and what the processes carry)
    combiner_workers: int = 1
    combiner_per_process: float | None = None
    combiner_cores: int | None = None
    members_throughput: float | None = None
    combiner_rows: int = 1  # rows per request of the measure behind combiner_per_process
    combiner_sized: bool = True  # False: read from a plan made before Chorus sized the combiner

    def data_path(self) -> DataPath:
        members = self.members_throughput
        return DataPath(
            self.combiner_workers,
            self.predicted_throughput if members is None else members,
            self.combiner_per_process,
            self.combiner_cores,
            self.combiner_rows,
            UNMEASURED if self.combiner_sized else UNSIZED,
        )

    def member_shares(self) -> list[float] | None:
        """Each member's share in the order of :attr:`members`, as :func:`problem` takes them;
        None without a cascade."""
        return [self.shares.get(m, 1.0) for m in self.members] if self.shares else None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "ensemble": self.ensemble,
            "devices": [
                {
                    "id": d.id,
                    "node": d.node,
                    "kind": d.kind,
                    "index": d.index,
                    "name": d.name,
                    "memory_bytes": d.memory_bytes,
                    "planned_memory_bytes": self.planned_memory_bytes.get(d.id, 0),
                    "speed": d.speed,
                    "lanes": d.lanes,
                    "cores": d.cores,
                }
                for d in self.devices
            ],
            "members": list(self.members),
            "instances": {m: dict(self.instances[m]) for m in self.members},
            "max_batch_size": dict(self.max_batch_size),
            "predicted_throughput": round(self.predicted_throughput, 3),
            "predicted_latency_ms": {m: round(v, 3) for m, v in self.predicted_latency_ms.items()},
            "latency_target_ms": self.latency_target_ms,
            "combiner_workers": self.combiner_workers,
            "combiner_per_process": _rounded(self.combiner_per_process),
            "combiner_cores": self.combiner_cores,
            "combiner_rows_per_request": self.combiner_rows,
            "members_throughput": _rounded(self.members_throughput),
        }
        if self.shares:
            data["shares"] = {m: self.shares[m] for m in self.members if m in self.shares}
            data["full_ensemble_throughput"] = _rounded(self.full_ensemble_throughput)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def nodes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(d.node for d in self.devices))


# the planner's default time budget: it answers with the best plan found by then
TIME_LIMIT_S = 3.0


def plan_ensemble(
    ensemble: str,
    members: Sequence[str],
    max_batch_size: int,
    profile: Profile,
    devices: Sequence[Device],
    profile_file: str | Path = "profile",
    latency_target_ms: float | None = None,
    effort: float = 1.0,
    borrow_curves: bool = False,
    shares: Mapping[str, float] | None = None,
    shares_file: str | Path = "shares",
    time_limit_s: float | None = TIME_LIMIT_S,
    evaluations: int | None = None,
    on_progress: Callable[[float, float], None] | None = None,
    on_limit: Callable[[Budget], None] | None = None,
) -> Plan:
    """Worst-fit, then the search: the plan for these members on these devices. With a
    latency target, no member's predicted fill + service time exceeds it; InfeasibleError
    names the member that cannot meet it at all.

    ``shares`` (a cascade's calibration): member -> share of the ensemble's rows that reach
    it, in (0, 1]; members not named get 1. Each member is sized for its share, and the plan
    also records what the plan for the full ensemble (every share 1) would predict, planned
    the same way, to compare. SpecError (naming ``shares_file``) for an unknown member or a
    share outside (0, 1].

    The search stops after ``time_limit_s`` seconds (None: when it is done) or ``evaluations``
    allocations scored (the same plan on any machine), with the best plan found by then;
    ``on_progress(seconds, best throughput)`` hears it once a second meanwhile, and
    ``on_limit(budget)`` when the budget (or its share for a part of the search) ran out
    before the search was done."""
    share_list = _shares(members, shares, shares_file)

    def problem_for(shares: list[float] | None) -> Problem:
        return problem(
            members,
            profile,
            devices,
            max_batch_size,
            profile_file,
            latency_target_ms,
            borrow_curves,
            shares=shares,
        )

    p = problem_for(share_list)
    if _too_slow(p):  # no search helps a member slower than the target at its quickest call
        raise InfeasibleError(_target_message(p))
    budget = Budget(evaluations, time_limit_s, on_progress)
    result = greedy(p, effort=effort, budget=budget)
    if result.throughput <= 0 and p.latency_target is not None:
        if budget.cut:
            raise InfeasibleError(
                "the search's budget ran out before it found a plan that meets the latency "
                f"target of {p.latency_target * 1000:g} ms: give it more (--time-limit, "
                "--evaluations)"
            )
        raise InfeasibleError(_target_message(p))
    if budget.cut and on_limit is not None:
        on_limit(budget)
    planned = with_data_path(make_plan(ensemble, p, result), profile.host)
    if share_list is None:
        return planned
    if all(s == 1.0 for s in share_list):
        full = planned.predicted_throughput  # the same problem: the same plan
    else:  # planned anew (shares also bound the batches a later tier gets), its data path too
        whole = problem_for(None)
        found = greedy(whole, effort=effort, budget=Budget(evaluations, time_limit_s))
        full = with_data_path(make_plan(ensemble, whole, found), profile.host).predicted_throughput
    return replace(planned, full_ensemble_throughput=full)


def with_data_path(plan: Plan, host: Host | None) -> Plan:
    """The plan with its combiner processes (:func:`data_path`), its throughput capped at what
    they carry."""
    path = data_path(plan.predicted_throughput, host, plan.devices, plan.instances)
    return replace(
        plan,
        predicted_throughput=path.throughput,
        combiner_workers=path.workers,
        combiner_per_process=path.per_worker,
        combiner_cores=path.cores,
        members_throughput=None if path.per_worker is None else plan.predicted_throughput,
        combiner_rows=path.rows,
        combiner_sized=True,
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _shares(
    members: Sequence[str], shares: Mapping[str, float] | None, source: str | Path
) -> list[float] | None:
    """Each member's share in the order of ``members`` (1 where not named), or None without
    shares; SpecError for a name that is no member or a value that is no share of rows."""
    if shares is None:
        return None
    known = set(members)
    for name, value in shares.items():
        if name not in known:
            raise SpecError(
                source,
                f"shares.{name}",
                f"no member named {name!r} in the ensemble (members: {', '.join(members)})",
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not math.isfinite(value)
            or not 0 < value <= 1
        ):
            raise SpecError(
                source,
                f"shares.{name}",
                f"{value!r} is not a share of rows: it must be a number in (0, 1] (the share "
                "of the ensemble's rows that reach the member; 1 for the first tier)",
            )
    return [float(shares.get(m, 1.0)) for m in members]


def _quickest(p: Problem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each member's least service time for one call anywhere (at its smallest batch size
    measured, on its fastest device; inf where it runs nowhere): seconds (M,), and the batch
    size and device indices where it is."""
    members = len(p.members)
    flat = p.service_by_batch.reshape(members, -1)
    at = flat.argmin(axis=1)
    batch, device = np.unravel_index(at, p.service_by_batch.shape[1:])
    return flat[np.arange(members), at], batch, device


def _too_slow(p: Problem) -> bool:
    """Whether some member takes longer than the latency target for any one call anywhere
    (so no allocation meets it)."""
    if p.latency_target is None:
        return False
    quickest = _quickest(p)[0]
    return bool((np.isfinite(quickest) & (quickest > p.latency_target)).any())


def _target_message(p: Problem) -> str:
    quickest, batch, device = _quickest(p)
    m = int(np.argmax(np.where(np.isfinite(quickest), quickest, -1.0)))
    target = p.latency_target * 1000 if p.latency_target else 0.0
    size = p.batch_sizes[int(batch[m])]
    call = "one sample" if size == 1 else f"a batch of {size}"
    return (
        f"no allocation meets the latency target of {target:g} ms: member "
        f"{p.members[m]!r} takes {quickest[m] * 1000:.1f} ms for {call} on its fastest "
        f"device ({p.devices[int(device[m])].id}), its quickest call"
        if np.isfinite(quickest[m]) and quickest[m] * 1000 > target
        else f"no allocation meets the latency target of {target:g} ms at any throughput "
        "these devices reach (raise the target, or add devices)"
    )


def predict(plan: Plan, profile: Profile, clients_on_host: bool = False) -> float:
    """The cost model's throughput for any plan (samples/s), members run concurrently; 0 if
    it does not fit. ``clients_on_host``: the clients' CPU (measured by chorus profile) counts
    too, as when a benchmark drives the ensemble from the same machine. A cascade's plan is
    predicted with its shares."""
    p, n, b = _arrays(plan, profile, clients_on_host)
    return float(evaluate(p, n[None], b[None]).throughput[0])


def predict_sequential(plan: Plan, profile: Profile) -> float:
    """The cost model's throughput when the members run one after another on each batch."""
    p, n, b = _arrays(plan, profile, False)
    return sequential_throughput(p, n, b)


def _arrays(
    plan: Plan, profile: Profile, clients_on_host: bool
) -> tuple[Problem, np.ndarray, np.ndarray]:
    p = problem(
        plan.members,
        profile,
        plan.devices,
        max(plan.max_batch_size.values()),
        clients_on_host=clients_on_host,
        shares=plan.member_shares(),
    )
    ids = [d.id for d in plan.devices]
    n = np.array([[plan.instances[m].get(i, 0) for i in ids] for m in plan.members])
    b = np.array([p.batch_sizes.index(plan.max_batch_size[m]) for m in plan.members])
    return p, n, b


def one_instance_each(
    ensemble: str, members: Sequence[str], devices: Sequence[Device], max_batch_size: int
) -> Plan:
    """The plan when nothing was measured: one instance of every member at the ensemble's
    maximum batch size, GPUs taken round-robin, else the CPU. Its throughput is not predicted
    (0)."""
    gpus = [d for d in devices if d.kind == "gpu"]
    cpus = [d for d in devices if d.kind == "cpu"]
    targets = gpus or cpus
    return Plan(
        ensemble=ensemble,
        devices=tuple(devices),
        planned_memory_bytes={},
        members=tuple(members),
        instances={m: {targets[i % len(targets)].id: 1} for i, m in enumerate(members)},
        max_batch_size={m: max_batch_size for m in members},
        predicted_throughput=0.0,
    )


def make_plan(
    ensemble: str, p: Problem, result: SearchResult, full_ensemble_throughput: float | None = None
) -> Plan:
    """The plan of a search's result; with a cascade (``p.shares``) it records the shares and
    ``full_ensemble_throughput``, the full ensemble's plan's, beside its own."""
    ids = [d.id for d in p.devices]
    instances = {
        m: {ids[d]: int(result.instances[i, d]) for d in range(len(ids)) if result.instances[i, d]}
        for i, m in enumerate(p.members)
    }
    memory = p.memory.transpose(0, 2, 1)[np.arange(len(p.members)), result.batch]  # (M, D)
    held = result.instances > 0  # where an instance cannot run, its memory is inf
    used = (result.instances * np.where(held, memory, 0.0)).sum(axis=0)
    latency = member_latency(p, result.instances, result.batch, result.throughput)
    return Plan(
        ensemble=ensemble,
        devices=p.devices,
        planned_memory_bytes={ids[d]: int(used[d]) for d in range(len(ids))},
        members=p.members,
        instances=instances,
        max_batch_size={m: p.batch_sizes[result.batch[i]] for i, m in enumerate(p.members)},
        predicted_throughput=result.throughput,
        predicted_latency_ms={
            m: float(latency[i]) * 1000 for i, m in enumerate(p.members) if np.isfinite(latency[i])
        },
        latency_target_ms=None if p.latency_target is None else p.latency_target * 1000,
        shares={}
        if p.shares is None
        else {m: float(p.share_values[i]) for i, m in enumerate(p.members)},
        full_ensemble_throughput=None if p.shares is None else full_ensemble_throughput,
    )


def load_plan(path: str | Path) -> Plan:
    """Read a plan written by ``chorus plan -o`` (or edited by hand): SpecError naming each
    field that is not what ``chorus plan`` writes (a count that is not a whole number, a
    batch size out of Triton's range, a number that is not finite, a member or device the
    plan does not have)."""
    file = Path(path)
    try:
        spec = _PlanFile.model_validate_json(read_json(file))
    except ValidationError as e:
        raise from_validation(file, e) from None
    devices = tuple(
        Device(
            d.node,
            d.kind,
            d.index,
            d.name or d.kind,
            d.memory_bytes,
            d.memory_bytes,
            cores=d.cores,
            speed=d.speed,
            lanes=d.lanes,
        )
        for d in spec.devices
    )
    sized = spec.combiner_workers is not None
    return Plan(
        ensemble=spec.ensemble,
        devices=devices,
        planned_memory_bytes={
            device.id: file.planned_memory_bytes
            for device, file in zip(devices, spec.devices, strict=True)
        },
        members=tuple(spec.members),
        instances={m: {d: n for d, n in spec.instances[m].items() if n} for m in spec.members},
        max_batch_size={m: spec.max_batch_size[m] for m in spec.members},
        predicted_throughput=spec.predicted_throughput,
        predicted_latency_ms=dict(spec.predicted_latency_ms),
        latency_target_ms=spec.latency_target_ms,
        shares=dict(spec.shares),
        full_ensemble_throughput=spec.full_ensemble_throughput,
        combiner_workers=min(spec.combiner_workers or 1, MAX_WORKERS),
        combiner_per_process=spec.combiner_per_process if sized else None,
        combiner_cores=spec.combiner_cores if sized else None,
        members_throughput=spec.members_throughput if sized else None,
        combiner_rows=spec.combiner_rows_per_request or 1,
        combiner_sized=sized,  # a plan from before Chorus sized the combiner keeps one process
    )


class _PlanDevice(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False, strict=True)

    id: str | None = None
    node: NodeName
    kind: Literal["gpu", "cpu"]
    index: int = Field(ge=0)
    name: str | None = None
    memory_bytes: StrictInt = Field(ge=0)
    planned_memory_bytes: StrictInt = Field(0, ge=0)
    speed: float = Field(1.0, gt=0)
    lanes: StrictInt = Field(1, ge=1)
    cores: StrictInt = Field(0, ge=0)

    @model_validator(mode="after")
    def _id_as_written(self) -> _PlanDevice:
        own = f"{self.node}/{self.kind}{self.index}"
        if self.id is not None and self.id != own:
            raise ValueError(f"id {self.id!r} is not its node/kind and index ({own!r})")
        return self


class _PlanFile(BaseModel):
    """A plan's JSON as :meth:`Plan.to_dict` writes it. Keys a later Chorus adds are ignored
    (the contract: fields may be added)."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False, strict=True)

    ensemble: str
    devices: list[_PlanDevice] = Field(min_length=1)
    members: list[str] = Field(min_length=1)
    # member -> device id -> count (an int32 in Triton's config)
    instances: dict[str, dict[str, Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]]]
    max_batch_size: dict[str, Annotated[StrictInt, Field(ge=1, le=65536)]]
    predicted_throughput: float = Field(ge=0)
    predicted_latency_ms: dict[str, Annotated[float, Field(ge=0)]] = {}
    latency_target_ms: float | None = Field(None, gt=0)
    shares: dict[str, Annotated[float, Field(gt=0, le=1)]] = {}
    full_ensemble_throughput: float | None = Field(None, ge=0)
    combiner_workers: StrictInt | None = Field(None, ge=1)  # None: a plan from before it
    combiner_per_process: float | None = Field(None, gt=0)
    combiner_cores: StrictInt | None = Field(None, ge=0)
    combiner_rows_per_request: StrictInt | None = Field(None, ge=1)
    members_throughput: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_plan(self) -> _PlanFile:
        members = set(self.members)
        if len(members) < len(self.members):
            raise ValueError(f"members: a member is named twice ({self.members})")
        listed = Counter(f"{d.node}/{d.kind}{d.index}" for d in self.devices)
        twice = [i for i, n in listed.items() if n > 1]
        if twice:
            more = f" and {len(twice) - 10} more" if len(twice) > 10 else ""
            raise ValueError(f"devices: {', '.join(twice[:10])}{more} listed twice")
        ids = set(listed)
        for name, per_member in (
            ("instances", self.instances),
            ("max_batch_size", self.max_batch_size),
        ):
            if set(per_member) != members:
                raise ValueError(
                    f"{name}: names members {sorted(per_member)}, the plan has {sorted(members)}"
                )
        for m, counts in self.instances.items():
            unknown = sorted(set(counts) - ids)
            if unknown:
                raise ValueError(f"instances.{m}: no device {', '.join(unknown)} in the plan")
            if not any(counts.values()):
                raise ValueError(f"instances.{m}: the member has no instance")
        for name, keyed in (
            ("shares", self.shares),
            ("predicted_latency_ms", self.predicted_latency_ms),
        ):
            unknown = sorted(set(keyed) - members)
            if unknown:
                raise ValueError(f"{name}: no member {', '.join(unknown)} in the plan")
        return self


def plan_table(plan: Plan) -> Table:
    """The allocation matrix as a table: devices by members, batch sizes, memory; with a
    cascade, each member's share of the rows, and under the table the full ensemble's plan's
    throughput beside this one's."""
    table = Table(title=f"allocation matrix of {plan.ensemble!r} (instances)")
    if plan.shares:
        full = plan.full_ensemble_throughput
        table.caption = (
            f"cascade: each member sized for its share of the rows; predicted "
            f"{plan.predicted_throughput:,.1f} samples/s"
            + (
                ""
                if full is None
                else f", against {full:,.1f} for the plan of the full ensemble (every share 1)"
            )
        )
    table.add_column("device")
    for m in plan.members:
        table.add_column(m, justify="right")
    table.add_column("planned / total memory", justify="right")
    # devices next to each other with the same row are one row: 1,024 GPUs had taken 4 s to
    # draw, in a table nobody could read
    runs: list[tuple[list[str], tuple[str, ...]]] = []
    for d in plan.devices:
        counts = tuple(str(plan.instances[m].get(d.id, "")) for m in plan.members)
        used = plan.planned_memory_bytes.get(d.id, 0)
        row = (*counts, f"{used / 2**30:.2f} / {d.memory_bytes / 2**30:.2f} GiB", d.name)
        if runs and runs[-1][1] == row:
            runs[-1][0].append(d.id)
        else:
            runs.append(([d.id], row))
    for ids, (*cells, name) in runs:
        label = (
            f"{ids[0]} ({name})"
            if len(ids) == 1
            else f"{ids[0]} .. {ids[-1]} ({name}, {len(ids)} alike)"
        )
        table.add_row(label, *cells)
    table.add_section()
    table.add_row("batch size", *(str(plan.max_batch_size[m]) for m in plan.members), "")
    if plan.shares:
        table.add_row("share of rows", *(f"{plan.shares.get(m, 1.0):g}" for m in plan.members), "")
    if plan.predicted_latency_ms:
        target = f"target {plan.latency_target_ms:g} ms" if plan.latency_target_ms else ""
        table.add_row(
            "predicted latency ms",
            *(f"{plan.predicted_latency_ms.get(m, float('nan')):,.1f}" for m in plan.members),
            target,
        )
    return table
