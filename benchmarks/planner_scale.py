"""The planner at its users' scale (issue 20): ``chorus plan`` timed as a process, 12 to 100
members on 16 to 64 V100s, against upper bounds on what the cost model allows.

    python -m benchmarks.planner_scale [--cases 12x16,12x32,...] [--repeats 3] [--timeout 120]
        [--rev REV[,REV...]] [--out benchmarks/results/planner_scale.md]

The cases (``MxD``: M members on D GPUs). Member i takes the published V100 curve of
``TWELVE[i % 12]`` (benchmarks/scenarios.py), its latencies scaled by one factor and its memory
(per instance and per sample) by another, both log-uniform in [0.5, 2] and drawn from a
generator seeded by (``--seed``, i): the first members of every case are the same, whatever the
case. It is named ``<curve>_<i>``. The devices are nodes of 4 V100-SXM2-16GB (a hardware file);
the profile is a ``profile.json`` as ``orchestrator/planning/profile.py`` reads it, keyed
``gpu``; the ensemble file names the members with model paths that do not exist (``chorus plan
--profile`` does not open them) and ``serving.max_batch_size`` (``--max-batch-size``, 256 as in
the paper-scale scenarios). All three go to a temporary folder.

Each case runs the real process, ``python -m orchestrator plan ENSEMBLE --profile P --hardware H
--json --workdir W`` (what ``chorus plan`` runs), ``--repeats`` times, each killed after
``--timeout`` s (a case whose run is killed is not run again). Wall time and the CPU time of the
process (user + system, ``getrusage(RUSAGE_CHILDREN)`` around it) are medians over the repeats;
both include the interpreter's start and the imports. With ``--rev REV`` the code timed is
``git archive REV``, unpacked in the temporary folder (uncommitted changes left out; several
revisions, comma-separated, each timed on every case, one row each); otherwise it is this
checkout as it is. The plan's JSON is parsed and checked: the memory each device
holds, recomputed from the profile (``memory_bytes + batch x memory_per_sample_bytes`` per
instance, at the member's planned batch size), is within the device's; and the cost model,
evaluated in this process on the plan's instances and batch sizes, gives the throughput the
plan predicts.

References, all computed here from the same profile and hardware files (through
``orchestrator.planning.problem``):

* the ceiling: ``D / sum_m 1 / peak_m``, ``peak_m`` a member's best samples/s on one device
  over the batch sizes up to the largest allowed (memory ignored: a batch size whose instance
  does not fit a device counts too). Every device busy all the time, each member at its best
  batch size: no allocation of the cost model does better.
* the memory-aware LP bound (:func:`lp_bound`), a linear program solved by HiGHS
  (``scipy.optimize.linprog``).
* where small enough (``--milp-cells``), the MILP of ``benchmarks/paper_scale.py``
  (``upper_bound``): its dual bound after at most ``--milp-seconds``. It has integer instances
  and one batch size per member, so it can be tighter than the LP; cut short by its time
  limit it may be looser. Both are upper bounds; the table gives the plan over each.
  Its best integer solution in that time, evaluated by the cost model, is an allocation the
  planner could have returned (a lower bound on the optimum; "none" where it had only T = 0).
* the batch-knapsack bound (:func:`knapsack_bound`): one batch size per member, chosen so that
  one instance of each fits in all the devices' memory together, with the least work in all;
  solved exactly (a small MILP). Where memory binds it is tighter than the LP, which lets a
  member hold its memory at a small batch size and run at a large one.

The table's *best bound* is the least of the three: each bounds the cost model's optimum, so
the least does too, and the plan is measured against it.

The LP. Variables per member m, device d and batch size k where one instance of m at k fits d
alone: ``t[m,d,k]``, the instances' busy time (in lanes: instance-seconds per second), and
``u[m,d,k]``, the instances (continuous); and T. Maximise T subject to::

    sum_{d,k} rate[m,d,k] * t[m,d,k] >= T          every member serves T samples/s
    sum_{m,k} t[m,d,k]                <= lanes[d]  no device busier than its lanes
    t[m,d,k]                          <= u[m,d,k]  an instance is busy at most all the time
    sum_{d,k} u[m,d,k]                >= 1         every member has an instance
    sum_{m,k} memory[m,d,k] * u[m,d,k] <= capacity[d]   the instances fit each device

Why it bounds the cost model's optimum: take any allocation the cost model accepts, instances
``N[m,d]`` at batch index ``b[m]``, with throughput T. Its instances of m serve ``r[m,d] =
rate[m,d,b[m]]`` each when busy, so ``T_m = sum_d N[m,d] r[m,d] >= T`` and each is busy ``T /
T_m <= 1`` of the time. Set ``t[m,d,b[m]] = N[m,d] T / T_m``, ``u[m,d,b[m]] = N[m,d]`` and every
other cell 0. Then ``sum rate * t = T`` (the first line); ``sum_m N[m,d] T / T_m <= lanes[d]`` is
the cost model's device constraint itself (the second); ``T / T_m <= 1`` (the third); ``T_m > 0``
needs an instance (the fourth); the fifth is the cost model's memory constraint. So every
allocation is a feasible point of the LP with the same T, and the LP's optimum is at least the
cost model's best T, whatever the search. What it relaxes: instances are fractional (a member
needs only one whole instance's memory in all, not one on each device it uses), and a member
may mix batch sizes. Without the memory line (the last) it is the ceiling on identical devices;
the memory is what makes it lower. The memory is counted per device; on identical devices
that is no tighter than counting it over all the devices' memory at once (averaging a solution
over the devices' permutations keeps it feasible), so the LP is the issue's "memory-aware LP
bound". What the LP leaves out (a latency target, CPU devices' CPU costs) only raises it; these
cases have neither.

The batch-knapsack bound. Choose one batch index ``b[m]`` per member (where one instance at it
fits some device) to minimise the work ``W = sum_m 1 / R[m, b[m]]``, ``R[m, k] = max_d
rate[m,d,k]``, subject to ``sum_m memory_min[m, b[m]] <= sum_d capacity[d]``, ``memory_min`` the
least over the devices; the bound is ``sum_d lanes[d] / W*`` (W* the MILP's dual bound on the
least work, so it holds when the solver stops early too). Why: in any accepted allocation,
member m's instances are busy ``sum_d N[m,d] T / T_m`` lanes in all, and ``T_m = sum_d N[m,d]
r[m,d] <= R[m, b[m]] sum_d N[m,d]``, so they take at least ``T / R[m, b[m]]`` lanes; summed over
the members that is at most ``sum_d lanes[d]``, so ``T <= sum_d lanes[d] / W(b)``. Each member
has at least one instance, of at least ``memory_min[m, b[m]]``, and the instances fit the
devices, so ``b`` meets the memory line; hence ``W(b) >= W*``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from unittest import mock

import numpy as np
import yaml

from benchmarks.report import publish
from benchmarks.scenarios import TWELVE, GiB, v100_profile
from orchestrator.planning.allocate import Problem, evaluate, problem
from orchestrator.planning.hardware import _cpu_model, load_hardware
from orchestrator.planning.profile import Curve, Profile, load_profile

REPO = Path(__file__).resolve().parent.parent
CASES = "12x16,12x32,12x64,25x16,50x16,100x16,100x64"
PER_NODE = 4
GPU = "Tesla V100-SXM2-16GB"
GPU_GB = 16
SCALE = (0.5, 2.0)  # log-uniform range of each member's latency and memory factors


def members(count: int, seed: int) -> dict[str, Curve]:
    """``count`` members: the published V100 curves in turn, each scaled (latency by one
    log-uniform factor in :data:`SCALE`, memory by another), seeded by (seed, index)."""
    base = v100_profile().members
    out = {}
    low, high = np.log(SCALE[0]), np.log(SCALE[1])
    for i in range(count):
        source = TWELVE[i % len(TWELVE)]
        latency, memory = np.exp(np.random.default_rng([seed, i]).uniform(low, high, size=2))
        c = base[source]["gpu"]
        out[f"{source}_{i:03d}"] = Curve(
            int(c.memory_bytes * memory),
            int(c.memory_per_sample_bytes * memory),
            tuple((b, ms * latency) for b, ms in c.latency_ms),
        )
    return out


@dataclass(frozen=True)
class Case:
    name: str
    ensemble: Path
    profile: Path
    hardware: Path
    workdir: Path


def write_case(root: Path, count: int, gpus: int, seed: int, max_batch: int) -> Case:
    """The ensemble, profile and hardware files of one case, in ``root/MxD``."""
    name = f"{count}x{gpus}"
    folder = root / name
    folder.mkdir(parents=True)
    curves = members(count, seed)
    profile = folder / "profile.json"
    profile.write_text(Profile({m: {"gpu": c} for m, c in curves.items()}).to_json())
    nodes = [
        {
            "name": f"node{n}",
            "devices": [
                {"kind": "gpu", "index": j, "name": GPU, "memory_gb": GPU_GB}
                for j in range(min(PER_NODE, gpus - n * PER_NODE))
            ],
        }
        for n in range((gpus + PER_NODE - 1) // PER_NODE)
    ]
    hardware = folder / "hardware.yaml"
    hardware.write_text(yaml.safe_dump({"nodes": nodes}, sort_keys=False))
    ensemble = folder / "ensemble.yaml"
    ensemble.write_text(
        yaml.safe_dump(
            {
                "name": f"scale-{name}",
                "members": [{"name": m, "path": f"models/{m}.onnx"} for m in curves],
                "serving": {"max_batch_size": max_batch},
            },
            sort_keys=False,
        )
    )
    return Case(name, ensemble, profile, hardware, folder / "work")


@dataclass(frozen=True)
class Timed:
    wall: list[float]
    cpu: list[float]
    killed: bool
    plan: dict | None
    error: str | None


def time_plan(case: Case, tree: Path, repeats: int, timeout: float) -> Timed:
    """``python -m orchestrator plan`` on the case, run from ``tree``, ``repeats`` times (not
    again once killed); the plan of the last run."""
    command = [
        sys.executable,
        "-m",
        "orchestrator",
        "plan",
        str(case.ensemble),
        "--profile",
        str(case.profile),
        "--hardware",
        str(case.hardware),
        "--json",
        "--workdir",
        str(case.workdir),
    ]
    walls, cpus, plan, error = [], [], None, None
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        try:
            done = subprocess.run(
                command, cwd=tree, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:  # run() kills the process and reaps it
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            walls.append(time.perf_counter() - start)
            cpus.append(_cpu(after) - _cpu(before))
            return Timed(walls, cpus, True, None, None)
        walls.append(time.perf_counter() - start)
        cpus.append(_cpu(resource.getrusage(resource.RUSAGE_CHILDREN)) - _cpu(before))
        if done.returncode != 0:
            error = f"exit {done.returncode}: {done.stderr.strip()[-500:]}"
            return Timed(walls, cpus, False, None, error)
        plan = json.loads(done.stdout)
    return Timed(walls, cpus, False, plan, error)


def _cpu(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def load_problem(case: Case, max_batch: int) -> tuple[Problem, Profile]:
    """The planning problem the CLI builds from the case's files."""
    profile = load_profile(case.profile)
    devices = load_hardware(case.hardware)
    names = list(profile.members)
    return problem(names, profile, devices, max_batch, case.profile), profile


def ceiling(p: Problem) -> float:
    """``D / sum_m 1 / peak_m``: every device busy all the time, each member at its best
    samples/s per device (memory ignored). For identical devices of 1 lane, as here."""
    peak = p.rate.max(axis=(1, 2))  # (M,)
    return float(len(p.devices) / (1.0 / peak).sum())


def lp_bound(p: Problem) -> float:
    """The memory-aware LP bound (the module's docstring): an upper bound on the cost model's
    throughput for any allocation."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    rate = p.rate / p.share_values[:, None, None]  # rows of the ensemble (1 without a cascade)
    fits = (p.rate > 0) & (p.memory <= p.capacity[None, :, None])
    m_idx, d_idx, k_idx = np.nonzero(fits)
    cells = len(m_idx)
    members, devices = len(p.members), len(p.devices)
    cell_rate = rate[m_idx, d_idx, k_idx]
    cell_memory = p.memory[m_idx, d_idx, k_idx]
    # columns: t (cells), u (cells), T
    t_col, u_col, big_t = np.arange(cells), cells + np.arange(cells), 2 * cells
    rows, cols, vals, high = [], [], [], []
    r = 0
    # T - sum rate * t <= 0, per member
    rows += [m_idx, np.arange(members)]
    cols += [t_col, np.full(members, big_t)]
    vals += [-cell_rate, np.ones(members)]
    high.append(np.zeros(members))
    r += members
    # sum t <= lanes, per device
    rows.append(r + d_idx)
    cols.append(t_col)
    vals.append(np.ones(cells))
    high.append(p.lanes.astype(float))
    r += devices
    # t - u <= 0, per cell
    rows += [r + np.arange(cells)] * 2
    cols += [t_col, u_col]
    vals += [np.ones(cells), -np.ones(cells)]
    high.append(np.zeros(cells))
    r += cells
    # -sum u <= -1, per member
    rows.append(r + m_idx)
    cols.append(u_col)
    vals.append(-np.ones(cells))
    high.append(-np.ones(members))
    r += members
    # sum memory * u <= capacity, per device
    rows.append(r + d_idx)
    cols.append(u_col)
    vals.append(cell_memory / GiB)  # in GiB, for the solver's scaling
    high.append(p.capacity / GiB)
    r += devices
    a = coo_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(r, 2 * cells + 1),
    ).tocsr()
    objective = np.zeros(2 * cells + 1)
    objective[big_t] = -1.0
    result = linprog(objective, A_ub=a, b_ub=np.concatenate(high), bounds=(0, None), method="highs")
    if result.status != 0:
        raise RuntimeError(f"LP: {result.message}")
    return float(-result.fun)


def knapsack_bound(p: Problem, seconds: float = 20.0) -> float:
    """The batch-knapsack bound (the module's docstring)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    rate = (p.rate / p.share_values[:, None, None]).max(axis=1)  # (M, B): the best device's
    memory = np.where(np.isfinite(p.memory), p.memory, np.inf).min(axis=1)  # (M, B)
    m_idx, k_idx = np.nonzero((rate > 0) & (memory <= p.capacity.max()))
    cells = len(m_idx)
    one_each = coo_matrix(
        (np.ones(cells), (m_idx, np.arange(cells))), shape=(len(p.members), cells)
    )
    fits = coo_matrix(
        (memory[m_idx, k_idx] / GiB, (np.zeros(cells, dtype=int), np.arange(cells))),
        shape=(1, cells),
    )
    result = milp(
        1.0 / rate[m_idx, k_idx],
        constraints=[
            LinearConstraint(one_each, 1, 1),
            LinearConstraint(fits, -np.inf, p.capacity.sum() / GiB),
        ],
        integrality=np.ones(cells),
        bounds=Bounds(0, 1),
        options={"time_limit": seconds},
    )
    if result.status == 2:  # infeasible: no batch size of some member fits, nothing serves
        return 0.0
    least = getattr(result, "mip_dual_bound", None)
    if least is None or not np.isfinite(least):
        if result.status != 0:
            raise RuntimeError(f"batch knapsack: {result.message}")
        least = result.fun
    return float(p.lanes.sum() / least)


def milp_bound(p: Problem, seconds: float) -> tuple[float | None, float | None]:
    """benchmarks/paper_scale.py's MILP: its dual bound after at most ``seconds``, and the
    cost model's throughput for the best integer solution it found (instances and one batch
    size per member: an allocation the cost model accepts, so a lower bound on its optimum;
    None where it found none)."""
    import scipy.optimize

    from benchmarks.paper_scale import upper_bound

    solved = {}
    solve = scipy.optimize.milp

    def keep(*args, **kwargs):  # upper_bound returns only the bound: keep the solution too
        solved["result"] = solve(*args, **kwargs)
        return solved["result"]

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # HiGHS prints debugging lines from C++ even with disp off
    os.dup2(null, 2)
    try:
        with mock.patch.object(scipy.optimize, "milp", keep):
            bound = upper_bound(p, seconds)
    except (TypeError, ValueError):  # no dual bound within the time limit
        bound = None
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (null, *saved):
            os.close(fd)
    x = solved["result"].x if "result" in solved else None
    if x is None:
        return bound, None
    members, devices, sizes = p.rate.shape
    cells = members * devices * sizes  # upper_bound's layout: n, then y, then z, then T
    n = np.rint(x[:cells]).reshape(members, devices, sizes)
    batch = x[2 * cells : 2 * cells + members * sizes].reshape(members, sizes).argmax(axis=1)
    instances = n[np.arange(members), :, batch]  # (M, D)
    return bound, float(evaluate(p, instances[None], batch[None]).throughput[0])


def check_plan(plan: dict, p: Problem, profile: Profile) -> dict:
    """The plan's memory per device recomputed from the profile, and its throughput
    re-evaluated by the cost model here."""
    ids = [d.id for d in p.devices]
    capacity = {d.id: d.memory_bytes for d in p.devices}
    used = dict.fromkeys(ids, 0)
    n = np.zeros((len(p.members), len(ids)))
    b = np.zeros(len(p.members), dtype=int)
    for i, m in enumerate(p.members):
        batch = plan["max_batch_size"][m]
        b[i] = p.batch_sizes.index(batch)
        curve = profile.members[m]["gpu"]
        for device, count in plan["instances"][m].items():
            used[device] += count * curve.memory(batch)
            n[i, ids.index(device)] = count
    again = float(evaluate(p, n[None], b[None]).throughput[0])
    predicted = plan["predicted_throughput"]
    rate = p.rate[np.arange(len(p.members)), :, b]  # (M, D) at each member's batch size
    busy = (n * predicted / (n * rate).sum(axis=1, keepdims=True)).sum(axis=0) / p.lanes
    return {
        "memory_ok": all(used[d] <= capacity[d] for d in ids),
        "fullest": max(used[d] / capacity[d] for d in ids),
        "memory_share": sum(used.values()) / sum(capacity.values()),
        "busy": float(busy.mean()),
        "listed_memory_agrees": all(
            dev["planned_memory_bytes"] == used[dev["id"]] for dev in plan["devices"]
        ),
        "throughput_agrees": abs(again - predicted) <= 1e-3 + 1e-6 * predicted,
        "instances": int(n.sum()),
        "batch_sizes": sorted({int(p.batch_sizes[k]) for k in b}),
    }


def export(rev: str, into: Path) -> tuple[Path, str]:
    """``git archive REV`` unpacked into ``into`` (read-only on the repository)."""
    short = _git("rev-parse", "--short", rev).strip() or rev
    into.mkdir(parents=True, exist_ok=True)
    archive = into / "tree.tar"
    with archive.open("wb") as f:
        subprocess.run(["git", "archive", "--format=tar", rev], cwd=REPO, stdout=f, check=True)
    tree = into / "tree"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    archive.unlink()
    found = subprocess.run(
        [sys.executable, "-c", "import orchestrator, combiner; print(orchestrator.__file__)"],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(found).is_relative_to(tree):  # an installed copy would win over the export
        raise SystemExit(f"python -m orchestrator in {tree} imports {found}, not the export")
    return tree, short


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "--no-optional-locks", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.rstrip()


def _ratio(value: float | None, bound: float | None) -> str:
    return "—" if value is None or not bound else f"{value / bound:.3f}"


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


@dataclass(frozen=True)
class Run:
    """One version of the code on one case."""

    code: str  # the commit, as the table names it
    timed: Timed
    check: dict | None  # check_plan's, where the process gave a plan

    @property
    def plan(self) -> float | None:
        return self.timed.plan["predicted_throughput"] if self.timed.plan else None


@dataclass(frozen=True)
class Result:
    count: int
    gpus: int
    runs: list[Run]
    ceiling: float
    lp: float
    lp_s: float
    milp: float | None  # None: not run, or no dual bound in time
    milp_s: float | None
    incumbent: float | None  # the cost model's throughput for the MILP's best solution
    knapsack: float
    knapsack_s: float

    @property
    def best_bound(self) -> float:
        return min(b for b in (self.lp, self.milp, self.knapsack) if b is not None)


def run_case(case: Case, trees: list[tuple[str, Path]], args: argparse.Namespace) -> Result:
    count, gpus = (int(x) for x in case.name.split("x"))
    p, profile = load_problem(case, args.max_batch_size)
    runs = []
    for code, tree in trees:
        timed = time_plan(case, tree, args.repeats, args.timeout)
        check = check_plan(timed.plan, p, profile) if timed.plan else None
        runs.append(Run(code, timed, check))
        state = "killed" if timed.killed else timed.error or "ok"
        print(
            f"{case.name} at {code}: wall {median(timed.wall):.2f} s, cpu "
            f"{median(timed.cpu):.2f} s ({state}); plan {_number(runs[-1].plan)}",
            file=sys.stderr,
            flush=True,
        )
    t0 = time.perf_counter()
    lp = lp_bound(p)
    lp_s = time.perf_counter() - t0
    milp, milp_s, incumbent = None, None, None
    if p.rate.size <= args.milp_cells:
        t0 = time.perf_counter()
        milp, incumbent = milp_bound(p, args.milp_seconds)
        milp_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    knapsack = knapsack_bound(p, args.milp_seconds)
    knapsack_s = time.perf_counter() - t0
    r = Result(
        count, gpus, runs, ceiling(p), lp, lp_s, milp, milp_s, incumbent, knapsack, knapsack_s
    )
    print(
        f"{case.name}: ceiling {r.ceiling:,.0f}, LP {lp:,.0f} ({lp_s:.1f} s), batch knapsack "
        f"{knapsack:,.0f} ({knapsack_s:.1f} s), MILP {_number(milp)}, its allocation "
        f"{_incumbent(r)}" + (f" ({milp_s:.1f} s)" if milp_s is not None else ""),
        file=sys.stderr,
        flush=True,
    )
    return r


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=CASES, help="MxD,...: M members on D GPUs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0, help="s per run of the CLI")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--milp-seconds", type=float, default=20.0)
    parser.add_argument(
        "--milp-cells",
        type=int,
        default=15000,
        help="run the MILP where members x GPUs x batch sizes is at most this (0: never)",
    )
    parser.add_argument(
        "--rev",
        help="time `git archive REV` instead of this checkout as it is; REV,REV,...: each in "
        "turn on every case",
    )
    parser.add_argument("--keep", type=Path, help="write the cases here and keep them")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/planner_scale.md"))
    args = parser.parse_args()
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]

    started = time.perf_counter()
    root = args.keep or Path(tempfile.mkdtemp(prefix="planner_scale-"))
    root.mkdir(parents=True, exist_ok=True)
    trees: list[tuple[str, Path]] = []
    if args.rev:
        for rev in args.rev.split(","):
            tree, commit = export(rev, root / f"tree-{len(trees)}")
            trees.append((commit, tree))
        code = ", ".join(
            f"`git archive {rev}` = {commit}"
            for rev, (commit, _) in zip(args.rev.split(","), trees, strict=True)
        )
        code += " (no uncommitted changes)"
    else:
        commit = _git("rev-parse", "--short", "HEAD").strip() or "unknown"
        dirty = _git("status", "--porcelain", "--", "orchestrator", "combiner")
        code = f"this checkout at {commit}" + (
            " with uncommitted changes to " + ", ".join(ln[3:] for ln in dirty.splitlines())
            if dirty
            else ""
        )
        trees.append((commit + ("+" if dirty else ""), REPO))
    results = []
    try:
        for count, gpus in cases:
            case = write_case(root, count, gpus, args.seed, args.max_batch_size)
            results.append(run_case(case, trees, args))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    publish(report(results, args, code, time.perf_counter() - started), args.out)


def report(results: list[Result], args: argparse.Namespace, code: str, took: float) -> list[str]:
    command = "python -m benchmarks.planner_scale " + " ".join(sys.argv[1:])
    cores = len(os.sched_getaffinity(0))
    versions = len(results[0].runs) > 1 if results else False
    lines = [
        "# The planner at its users' scale",
        "",
        f"`{command.strip()}`: the code timed is {code}; on {platform.node()}: {cores} CPU "
        f"cores ({_cpu_model()}), {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}; {took:.0f} s in all. Each case: M members, the published "
        "V100 curves of `benchmarks/scenarios.py` in turn, each scaled by a log-uniform factor "
        f"in [0.5, 2] in latency and another in memory (seed {args.seed}), on nodes of "
        f"{PER_NODE} {GPU}, batch sizes up to {args.max_batch_size}. Timed: the whole process "
        "`python -m orchestrator plan ENSEMBLE --profile P --hardware H --json` (what "
        "`chorus plan` runs, with its defaults; the ensemble file's member files do not exist "
        f"and are not read), killed after {args.timeout:g} s, median of {args.repeats} "
        f"run{'s' if args.repeats != 1 else ''}: wall time and the process's CPU time (user + "
        "system), the interpreter's start and imports included. Throughputs in samples/s, "
        "predicted by the cost model.",
        "",
        "| members x GPUs | "
        + ("code | " if versions else "")
        + "wall s | CPU s | plan | ceiling | LP bound | MILP bound | batch-knapsack bound | "
        "plan / ceiling | plan / LP bound | plan / best bound | MILP's allocation | "
        "memory OK (fullest GPU, all) | GPUs busy | instances | batch sizes |",
        "|---|"
        + ("---|" if versions else "")
        + "---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in results:
        for run in r.runs:
            timed, check = run.timed, run.check
            if timed.killed:
                wall = f"> {args.timeout:g} (killed)"
            elif timed.error:
                wall = f"{median(timed.wall):.2f} (failed)"
            else:
                wall = f"{median(timed.wall):.2f}"
            memory = "—"
            if check:
                memory = (
                    f"{'yes' if check['memory_ok'] else 'NO'} ({check['fullest']:.0%}, "
                    f"{check['memory_share']:.0%})"
                )
            lines.append(
                f"| {r.count} x {r.gpus} | "
                + (f"{run.code} | " if versions else "")
                + f"{wall} | {median(timed.cpu):.2f} | {_number(run.plan)} | "
                f"{r.ceiling:,.0f} | {r.lp:,.0f} | {_number(r.milp)} | {r.knapsack:,.0f} | "
                f"{_ratio(run.plan, r.ceiling)} | {_ratio(run.plan, r.lp)} | "
                f"{_ratio(run.plan, r.best_bound)} | {_incumbent(r)} | {memory} | "
                f"{format(check['busy'], '.0%') if check else '—'} | "
                f"{check['instances'] if check else '—'} | "
                f"{', '.join(map(str, check['batch_sizes'])) if check else '—'} |"
            )
    lines += [
        "",
        "*Ceiling*: D / sum_m 1 / peak_m, peak_m a member's best samples/s on one GPU over the "
        "batch sizes (memory ignored). *LP bound*: the ceiling's LP plus memory: fractional "
        "instances, every member at least one, each GPU's instances within its memory (the "
        "formulation, and why it bounds every allocation the cost model accepts, in the "
        "module's docstring). *MILP bound*: `benchmarks/paper_scale.py`'s MILP (integer "
        f"instances, one batch size per member), its dual bound after at most "
        f"{args.milp_seconds:g} s, run where members x GPUs x batch sizes is at most "
        f"{args.milp_cells:,}. *MILP's allocation*: the best integer solution the MILP found in "
        "that time (its instances and batch sizes), evaluated by the cost model: an allocation "
        "the planner could have returned, so a lower bound on the best there is (*none*: it had "
        "found none with T > 0). *Batch-knapsack bound*: one batch size per member, one instance "
        "of each within all the GPUs' memory together, the least work in all (the module's "
        "docstring says why it bounds every allocation too). *Best bound*: the least of the "
        "three. *Memory OK*: "
        "every GPU's instances, recomputed from the profile (memory_bytes + batch x "
        "memory_per_sample_bytes each, at the member's planned batch size), within its 16 GiB; "
        "in brackets the fullest GPU's share, and all GPUs' together. *GPUs busy*: the share of "
        "the time a GPU is busy at the plan's throughput, the mean over the GPUs (each "
        "instance of m busy T / T_m of the time). *Instances*: over all GPUs; *batch sizes*: "
        "those the plan uses.",
        "",
        "Checks of each plan, done here: "
        + "; ".join(_checked(r, run) for r in results for run in r.runs)
        + ". References' time: "
        + "; ".join(
            f"{r.count} x {r.gpus} LP {r.lp_s:.1f} s, batch knapsack {r.knapsack_s:.1f} s"
            + (f", MILP {r.milp_s:.1f} s" if r.milp_s is not None else "")
            for r in results
        )
        + ".",
        "",
    ]
    return lines


def _incumbent(r: Result) -> str:
    if r.milp_s is None:
        return "—"
    if not r.incumbent:  # none, or only T = 0 (no instances: trivially feasible)
        return "none"
    return f"{r.incumbent:,.0f}"


def _checked(r: Result, run: Run) -> str:
    name = f"{r.count} x {r.gpus} at {run.code}"
    if run.check is None:
        return f"{name}: " + ("killed" if run.timed.killed else run.timed.error or "no plan")
    memory = "agrees" if run.check["listed_memory_agrees"] else "DIFFERS"
    again = "agrees" if run.check["throughput_agrees"] else "DIFFERS"
    return f"{name}: the plan's planned memory {memory}, its throughput re-evaluated {again}"


if __name__ == "__main__":
    main()
