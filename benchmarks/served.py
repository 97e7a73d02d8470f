"""Served for real: the digits ensemble under several allocations on this machine's Triton.

    python -m benchmarks.served [--seconds 3] [--batch 64] [--concurrency 4]

For each allocation, the cost model's predicted throughput and the throughput measured through
the combiner at the same closed-loop client load, side by side in one run:

* Chorus's plan (worst-fit + greedy on the measured profile), members called concurrently;
* the paper's baseline: one instance per member, each at its own best batch size, members
  called one after another per batch;
* two more allocations, to check the cost model: one instance each at batch 8, and two
  instances each at batch 64.

Also the ensemble's physical limit here, 1 / sum_m(1 / peak_m), where peak_m is member m's
throughput measured alone on the whole machine (under its own plan), and the plan's throughput
as a fraction of it.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

from benchmarks.report import publish
from examples.digits.train import HERE, load_split, train_members
from orchestrator.bench import Load, ensemble_load, member_load
from orchestrator.hardware import discover
from orchestrator.measure import measure_profile
from orchestrator.plan import Plan, one_instance_each, plan_ensemble, predict
from orchestrator.profile import Profile
from orchestrator.spec import Ensemble, load_ensemble
from orchestrator.up import Deployment


def serve_and_load(ensemble: Ensemble, plan: Plan, work: Path, x, args, fan_out="concurrent"):
    with Deployment(ensemble, work, plan=plan, fan_out=fan_out) as endpoints:
        return ensemble_load(endpoints.ensemble, x, args.batch, args.concurrency, args.seconds)


def best_batch(profile: Profile, member: str, kind: str = "cpu") -> int:
    curve = profile.members[member][kind]
    return max(curve.latency_ms, key=lambda p: p[0] / p[1])[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=64, help="rows per client request")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/served.md"))
    args = parser.parse_args()

    split = load_split()
    if not all(
        (HERE / "models" / f"{m}.onnx").is_file() for m in ("mlp", "mlp_bagged", "cnn", "wide_cnn")
    ):
        train_members(HERE / "models", split)
    ensemble = load_ensemble(HERE / "ensemble.yaml")
    names = [m.name for m in ensemble.members]
    devices = discover()
    x = split.x_test
    root = Path(tempfile.mkdtemp(prefix="chorus-bench-"))
    profile = measure_profile(ensemble, root / "profile", seconds_per_point=0.2)

    planned = plan_ensemble(ensemble.name, names, ensemble.max_batch_size, profile, devices)
    single = one_instance_each(ensemble.name, names, devices, ensemble.max_batch_size)
    (cpu,) = {d for per in single.instances.values() for d in per}
    baseline = replace(single, max_batch_size={m: best_batch(profile, m) for m in names})
    at8 = replace(single, max_batch_size=dict.fromkeys(names, 8))
    twice = replace(single, instances={m: {cpu: 2} for m in names})
    cases = [
        ("Chorus plan", planned, "concurrent"),
        ("baseline (paper)", baseline, "sequential"),
        ("1 each, batch 8", at8, "concurrent"),
        ("2 each, batch 64", twice, "concurrent"),
    ]
    rows: list[tuple[str, Plan, float, Load]] = []
    for i, (label, plan, fan_out) in enumerate(cases):
        load = serve_and_load(ensemble, plan, root / f"case{i}", x, args, fan_out)
        rows.append((label, plan, predict(plan, profile), load))
        print(f"{label}: {load.samples_per_s:,.0f} samples/s", flush=True)

    peaks = {}
    for m in ensemble.members:  # each member alone, called directly on Triton
        alone = replace(ensemble, members=(m,), name=f"{ensemble.name}-{m.name}")
        plan = plan_ensemble(alone.name, [m.name], ensemble.max_batch_size, profile, devices)
        with Deployment(alone, root / f"alone-{m.name}", plan=plan) as endpoints:
            ((_, input_name),) = m.input_map
            peaks[m.name] = member_load(
                endpoints.triton_grpc,
                m.name,
                input_name,
                x,
                plan.max_batch_size[m.name],
                args.concurrency,
                args.seconds,
                endpoints.triton_headers,
            )
        print(f"{m.name} alone: {peaks[m.name].samples_per_s:,.0f} samples/s", flush=True)
    limit = 1.0 / sum(1.0 / p.samples_per_s for p in peaks.values())

    plan_load = rows[0][3].samples_per_s
    base_load = rows[1][3].samples_per_s
    lines = [
        "# Served: the digits ensemble under Chorus's plan, the baseline, and the cost model",
        "",
        f"`python -m benchmarks.served --seconds {args.seconds} --batch {args.batch} "
        f"--concurrency {args.concurrency}` on this machine: "
        f"{devices[-1].cores} CPU cores ({devices[-1].name}), no GPU, the bundled Triton 2.51 "
        "(Python backend running onnxruntime, 1 intra-op thread per instance). Closed loop: "
        f"{args.concurrency} clients, {args.batch} rows per request, {args.seconds} s each, "
        "all through the combiner. Throughputs in samples (rows) per second.",
        "",
        "| allocation | instances (mlp, mlp_bagged, cnn, wide_cnn) | batch sizes | fan-out | "
        "predicted | measured | error | p50 ms | p99 ms |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, plan, predicted, load in rows:
        counts = ", ".join(str(sum(plan.instances[m].values())) for m in names)
        sizes = ", ".join(str(plan.max_batch_size[m]) for m in names)
        fan = "sequential" if label.startswith("baseline") else "concurrent"
        error = (predicted - load.samples_per_s) / load.samples_per_s
        lines.append(
            f"| {label} | {counts} | {sizes} | {fan} | {predicted:,.0f} | "
            f"{load.samples_per_s:,.0f} | {error:+.0%} | {load.p50_ms:.1f} | "
            f"{load.p99_ms:.1f} |"
        )
    lines += [
        "",
        f"**Chorus plan / baseline: {plan_load / base_load:.2f}x** (measured side by side).",
        "",
        "Each member alone on the whole machine (its own plan, called directly on Triton at "
        "the same concurrency, batches of its planned size), measured: "
        + ", ".join(f"{m} {p.samples_per_s:,.0f}" for m, p in peaks.items())
        + f". Physical limit of the ensemble, 1 / sum(1 / peak): **{limit:,.0f}** samples/s; "
        f"the plan reaches **{plan_load / limit:.0%}** of it.",
        "",
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
