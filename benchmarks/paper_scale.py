"""The planner at the paper's scale: 12 CNNs on 4 and 16 V100s, one CNN on 16 (on paper).

    python -m benchmarks.paper_scale [--reference-seeds 8] [--reference-effort 20]

Profiles from NVIDIA's published V100 latency tables (sources and extrapolation in
benchmarks/scenarios.py). For each scenario: Chorus's plan (the default search, effort 1)
against the paper's baseline, predicted with the cost model both ways it can run:

* sequential, as the paper's baseline: one member at a time on each batch, so the ensemble's
  throughput is 1 / sum_m(1 / T_m);
* concurrent: all members at once, Chorus's own execution, through the same cost model as the
  plan.

The baseline is one instance of each member, spread over the devices largest first onto the
device with the most free memory (worst-fit), each at the batch size that gives it the most
throughput among those that fit its device next to the others (it never oversubscribes a
device). The paper does not say how its baseline chose batch sizes; this is the strongest
reading of "one instance each".

The search is checked against two references: the best allocation known (the best of the
default search and ``--reference-seeds`` searches at ``--reference-effort`` times its budget,
other seeds), and a proven upper bound on the optimum: a mixed-integer program (HiGHS, through
scipy) that relaxes the cost model (each instance may be busy a different fraction of the
time, where the model keeps a member's instances equally busy), so its optimum is at least the
model's; the solver's dual bound after ``--bound-seconds`` is reported. On random cases small
enough to enumerate, the exact optimum is in benchmarks/planner.py. Also: the predicted latency
of each member (time to fill a batch at the plan's throughput, plus the batch's service time),
and a picture of plan vs baselines.

Cascades (issue 18; tiers and shares in benchmarks/scenarios.py): the same twelve CNNs in two
tiers, the second seeing only a share of the rows. Each is planned for its shares (every
member sized for the rows that reach it) and compared, in rows of the ensemble per second,
with the plan made for the full ensemble: serving every row to every member, and serving the
same cascade on that plan (what the cascade gains with no change to the planner). The cascade
plan is checked against the same two references, both weighing each member by its share.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.report import publish
from benchmarks.scenarios import (
    CASCADES,
    FIRST_TIER,
    SCENARIOS,
    SECOND_TIER,
    SHARE_SWEEP,
    GiB,
    Scenario,
    two_tiers,
    v100_profile,
)
from orchestrator.planning.allocate import (
    Problem,
    SearchResult,
    evaluate,
    greedy,
    member_latency,
    problem,
    sequential_throughput,
    worst_fit,
)


def upper_bound(p: Problem, seconds: float) -> float:
    """A proven upper bound on the cost model's best throughput: the dual bound of a MILP.

    Variables per member m, device d, batch size k: instances n (integer), samples/s served y,
    and per (m, k) a choice z (binary); maximise T subject to: one batch size per member,
    n <= (instances that fit) * z, memory per device, y <= n * rate, sum_dk y >= share * T per
    member (its share of the rows, 1 without a cascade), sum_mk y / rate <= lanes per device.
    Any allocation of the cost model, with its y (each instance busy share * T / T_m of the
    time), satisfies these, so the optimum bounds it from above.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    members, devices, sizes = p.rate.shape
    runnable = p.rate > 0
    most = np.where(
        runnable, np.floor(p.capacity[None, :, None] / np.where(runnable, p.memory, 1.0)), 0
    )
    cells = members * devices * sizes
    y0, z0, t = cells, 2 * cells, 2 * cells + members * sizes
    rows = members + 2 * cells + members + 2 * devices
    a = lil_matrix((rows, t + 1))
    low, high = np.full(rows, -np.inf), np.zeros(rows)
    r = 0
    for m in range(members):
        a[r, z0 + m * sizes : z0 + (m + 1) * sizes] = 1
        low[r] = high[r] = 1
        r += 1
    for m in range(members):
        for d in range(devices):
            for k in range(sizes):
                i = (m * devices + d) * sizes + k
                a[r, i], a[r, z0 + m * sizes + k] = 1, -most[m, d, k]
                a[r + cells, y0 + i], a[r + cells, i] = 1, -p.rate[m, d, k]
                r += 1
    r += cells
    for m in range(members):
        a[r, t] = p.share_values[m]
        a[r, y0 + m * devices * sizes : y0 + (m + 1) * devices * sizes] = -1
        r += 1
    for d in range(devices):
        for m in range(members):
            for k in range(sizes):
                i = (m * devices + d) * sizes + k
                if runnable[m, d, k]:
                    a[r, i] = p.memory[m, d, k]
                    a[r + devices, y0 + i] = 1 / p.rate[m, d, k]
        high[r], high[r + devices] = p.capacity[d], p.lanes[d]
        r += 1
    objective = np.zeros(t + 1)
    objective[t] = -1
    integral = np.zeros(t + 1)
    integral[:cells] = integral[z0:t] = 1
    upper = np.full(t + 1, np.inf)
    upper[:cells], upper[z0:t] = most.ravel(), 1
    result = milp(
        objective,
        constraints=LinearConstraint(a.tocsr(), low, high),
        integrality=integral,
        bounds=Bounds(np.zeros(t + 1), upper),
        options={"time_limit": seconds, "disp": False},
    )
    return float(-result.mip_dual_bound)


def scenario_problem(scenario: Scenario) -> Problem:
    shares = scenario.shares
    return problem(
        scenario.members,
        v100_profile(),
        scenario.devices,
        scenario.max_batch_size,
        shares=None if shares is None else [shares.get(m, 1.0) for m in scenario.members],
    )


def run(scenario: Scenario, seeds: int, effort: float, bound_seconds: float) -> dict:
    p = scenario_problem(scenario)
    t0 = time.perf_counter()
    plan = greedy(p)
    planning_s = time.perf_counter() - t0
    n0, b0 = worst_fit(p)
    concurrent = float(evaluate(p, n0[None], b0[None]).throughput[0])
    sequential = sequential_throughput(p, n0, b0)
    t0 = time.perf_counter()
    reference = max(
        (greedy(p, effort=effort, seed=1 + s) for s in range(seeds)), key=lambda r: r.throughput
    )
    reference_s = time.perf_counter() - t0
    if reference.throughput < plan.throughput:
        reference = plan
    t0 = time.perf_counter()
    bound = upper_bound(p, bound_seconds)
    bound_s = time.perf_counter() - t0
    return {
        "bound": bound,
        "bound_s": bound_s,
        "scenario": scenario,
        "problem": p,
        "plan": plan,
        "planning_s": planning_s,
        "baseline": (n0, b0),
        "concurrent": concurrent,
        "sequential": sequential,
        "reference": reference,
        "reference_s": reference_s,
    }


def run_cascade(cascade: Scenario, seeds: int, effort: float, bound_seconds: float) -> dict:
    """:func:`run` for the cascade, and the plan made for the full ensemble (every share 1) on
    the same devices: its throughput serving every row, and serving the cascade; also both at
    the other shares of :data:`SHARE_SWEEP`."""
    r = run(cascade, seeds, effort, bound_seconds)
    full = greedy(scenario_problem(replace(cascade, shares=None)))
    sweep = []
    for share in SHARE_SWEEP:
        p = scenario_problem(two_tiers(cascade, share))
        t0 = time.perf_counter()
        plan = greedy(p)
        sweep.append((share, plan, time.perf_counter() - t0, _served(p, full)))
    return {**r, "full": full, "full_on_cascade": _served(r["problem"], full), "sweep": sweep}


def _served(p: Problem, r: SearchResult) -> float:
    """The throughput of the allocation ``r`` with ``p``'s shares: each member at its planned
    batch size or, for a later tier, at the largest it gets (the rows of a combiner batch that
    reach it; the larger sizes are ones it cannot run in ``p``)."""
    runnable = p.rate.max(axis=1) > 0  # (M, B)
    largest = np.array([np.flatnonzero(row).max() for row in runnable])
    batch = np.minimum(r.batch, largest)
    return float(evaluate(p, r.instances[None], batch[None]).throughput[0])


def _tier_instances(p: Problem, r: SearchResult) -> str:
    counts = [int(r.instances[p.members.index(m)].sum()) for m in FIRST_TIER]
    later = [int(r.instances[p.members.index(m)].sum()) for m in SECOND_TIER]
    return f"{sum(counts)} / {sum(later)}"


def _second_tier_time(p: Problem, r: SearchResult) -> float:
    """The share of the devices' busy time that goes to the second tier, at the plan's
    throughput: each member's instances are busy its share x T / (their capacity) of the time."""
    members = np.arange(len(p.members))
    capacity = (r.instances * p.rate_by_batch[members, r.batch]).sum(axis=1)  # rows/s
    busy = r.throughput * r.instances.sum(axis=1) / capacity
    later = [p.members.index(m) for m in SECOND_TIER]
    return float(busy[later].sum() / busy.sum())


def cascade_lines(results: list[dict], args: argparse.Namespace) -> list[str]:
    share = results[0]["scenario"].shares[SECOND_TIER[0]]
    lines = [
        "## Cascades: each member sized for the rows that reach it",
        "",
        f"Two tiers: the six cheapest members by V100 time per image ({', '.join(FIRST_TIER)}) "
        f"see every row, the other six ({', '.join(SECOND_TIER)}) only the share of rows on "
        f"which the first tier disagrees: {share:g} (an assumption, not a measurement; why in "
        "`benchmarks/scenarios.py`), with a sweep at "
        f"{' and '.join(f'{s:g}' for s in SHARE_SWEEP)}. Throughputs in rows of the ensemble "
        "(images answered) per second, predicted by the cost model: *full plan* is the plan "
        "made without shares, serving every row to every member (the table above) and serving "
        "the cascade; *cascade plan* is made with the shares. Instances: first tier / second "
        "tier, over all devices; GPU time: the share of the devices' busy time that goes to the "
        "second tier (the full plan serving the full ensemble, the cascade plan the cascade).",
        "",
        "| scenario | tier 2 share | full plan, full ensemble | full plan, cascade | "
        "cascade plan | cascade plan / full plan, cascade | instances full plan | "
        "instances cascade plan | tier 2 GPU time, full plan / cascade plan | "
        "search / best known | search / upper bound | planning s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        p, full = r["problem"], r["full"]
        full_problem = replace(p, shares=None)
        base = r["scenario"].name.split(", cascade")[0]
        rows: list[tuple[float, SearchResult, float, float, dict | None]] = [
            (share, r["plan"], r["planning_s"], r["full_on_cascade"], r)
        ]
        rows += [(s, plan, secs, served, None) for s, plan, secs, served in r["sweep"]]
        for s, plan, secs, served, checked in sorted(rows, key=lambda row: row[0]):
            best = f"{plan.throughput / checked['reference'].throughput:.3f}" if checked else "-"
            bound = f"{plan.throughput / checked['bound']:.3f}" if checked else "-"
            lines.append(
                f"| {base} | {s:g} | {full.throughput:,.0f} | {served:,.0f} | "
                f"{plan.throughput:,.0f} | {plan.throughput / served:.2f}x | "
                f"{_tier_instances(p, full)} | {_tier_instances(p, plan)} | "
                f"{_second_tier_time(full_problem, full):.0%} / "
                f"{_second_tier_time(scenario_problem(two_tiers(r['scenario'], s)), plan):.0%} | "
                f"{best} | {bound} | {secs:.2f} |"
            )
    lines += [
        "",
        f"Best known and upper bound as above ({args.reference_seeds} searches at "
        f"`--effort {args.reference_effort:g}`; the MILP after at most {args.bound_seconds:g} s), "
        f"for the share {share:g} only; both weigh each member's load by its share.",
    ]
    for r in results:
        lines += ["", f"### {r['scenario'].name}", "", "The cascade plan:", ""]
        lines += matrix(r["problem"], r["plan"])
    return lines


def matrix(p: Problem, r: SearchResult) -> list[str]:
    """The allocation matrix, one line per member: instances per device, batch size,
    predicted latency; with a cascade, first each member's share of the rows."""
    latency = member_latency(p, r.instances, r.batch, r.throughput)
    cascade = p.shares is not None
    lines = [
        "| member | "
        + ("share of rows | " if cascade else "")
        + "instances per device | batch size | predicted latency ms |",
        "|---|" + ("---:|" if cascade else "") + "---|---:|---:|",
    ]
    for i, m in enumerate(p.members):
        cells = ", ".join(f"{p.devices[d].id} x{int(c)}" for d, c in enumerate(r.instances[i]) if c)
        share = f" {p.share_values[i]:g} |" if cascade else ""
        lines.append(
            f"| {m} |{share} {cells} | {p.batch_sizes[r.batch[i]]} | {latency[i] * 1000:,.0f} |"
        )
    used = (r.instances * p.memory.transpose(0, 2, 1)[np.arange(len(p.members)), r.batch]).sum(0)
    lines += [
        "",
        "Memory planned per device (GiB): "
        + ", ".join(f"{u / GiB:.1f}/{c / GiB:.0f}" for u, c in zip(used, p.capacity, strict=True)),
    ]
    return lines


def draw(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["scenario"].name for r in results]
    x = np.arange(len(results))
    width = 0.27
    fig, ax = plt.subplots(figsize=(10, 4.5))
    series = (
        ("baseline, sequential", [r["sequential"] for r in results]),
        ("baseline, concurrent", [r["concurrent"] for r in results]),
        ("Chorus plan", [r["plan"].throughput for r in results]),
    )
    for i, (label, values) in enumerate(series):
        bars = ax.bar(x + (i - 1) * width, values, width, label=label)
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=7)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("predicted throughput (samples/s, log scale)")
    ax.set_title("Plan vs the paper's baseline (cost model, published V100 latencies)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference-seeds", type=int, default=8)
    parser.add_argument("--reference-effort", type=float, default=20.0)
    parser.add_argument("--bound-seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/paper_scale.md"))
    args = parser.parse_args()

    results = []
    for scenario in SCENARIOS:
        r = run(scenario, args.reference_seeds, args.reference_effort, args.bound_seconds)
        results.append(r)
        print(
            f"{scenario.name}: plan {r['plan'].throughput:,.0f} samples/s in "
            f"{r['planning_s']:.2f} s; best known {r['reference'].throughput:,.0f}; "
            f"bound {r['bound']:,.0f}",
            flush=True,
        )
    cascades = []
    for cascade in CASCADES:
        r = run_cascade(cascade, args.reference_seeds, args.reference_effort, args.bound_seconds)
        cascades.append(r)
        print(
            f"{cascade.name}: cascade plan {r['plan'].throughput:,.0f} rows/s in "
            f"{r['planning_s']:.2f} s; full plan {r['full'].throughput:,.0f}, serving the "
            f"cascade {r['full_on_cascade']:,.0f}; best known {r['reference'].throughput:,.0f}; "
            f"bound {r['bound']:,.0f}",
            flush=True,
        )
    png = args.out.with_suffix(".png")
    draw(results, png)

    lines = [
        "# The planner at the paper's scale",
        "",
        f"`python -m benchmarks.paper_scale --reference-seeds {args.reference_seeds} "
        f"--reference-effort {args.reference_effort:g} --bound-seconds {args.bound_seconds:g}`. "
        "Predicted by the cost model from "
        "NVIDIA's published V100 FP32 latencies (five CNNs measured, seven scaled by FLOPs; "
        "sources, memory assumptions and extrapolation in `benchmarks/scenarios.py`). No GPU "
        "was used: these are the planner's predictions, in samples (images) per second.",
        "",
        "| scenario | plan | baseline sequential | baseline concurrent | plan / sequential | "
        "plan / concurrent | search / best known | search / upper bound | planning s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        plan = r["plan"].throughput
        lines.append(
            f"| {r['scenario'].name} | {plan:,.0f} | {r['sequential']:,.0f} | "
            f"{r['concurrent']:,.0f} | {plan / r['sequential']:.2f}x | "
            f"{plan / r['concurrent']:.2f}x | {plan / r['reference'].throughput:.3f} | "
            f"{plan / r['bound']:.3f} | {r['planning_s']:.2f} |"
        )
    lines += [
        "",
        f"![plan vs baselines]({png.name})",
        "",
        f"Best known: the best of the default search and {args.reference_seeds} searches at "
        f"`--effort {args.reference_effort:g}` with other seeds "
        f"({max(r['reference_s'] for r in results):.0f} s at most). Upper bound: the MILP's dual "
        f"bound after at most {args.bound_seconds:g} s (see the module's docstring).",
    ]
    for r in results:
        p = r["problem"]
        lines += ["", f"## {r['scenario'].name}", "", "Chorus's plan:", ""]
        lines += matrix(p, r["plan"])
        n0, b0 = r["baseline"]
        baseline = SearchResult(n0, b0, r["concurrent"], 0)
        lines += ["", "The baseline (latency at its concurrent throughput):", ""]
        lines += matrix(p, baseline)
    lines += ["", *cascade_lines(cascades, args)]
    lines.append("")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
