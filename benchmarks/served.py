"""Served for real: the digits ensemble under several allocations on this machine's Triton.

    python -m benchmarks.served [--seconds 3] [--batch 64] [--concurrency 4] [--rounds 5]

For each allocation, the cost model's predicted throughput and the throughput measured through
the combiner at the same closed-loop client load, side by side in one run:

* Chorus's plan (worst-fit + the search on the measured profile), members called
  concurrently;
* the paper's baseline: one instance per member spread by worst-fit, each at the batch size
  best for it among those that fit beside the others (orchestrator.planning.allocate.worst_fit), run
  two ways, each predicted with its own execution model: sequential (members one after
  another, one client at a time, as the paper's: predicted 1 / sum_m(1 / T_m)) and concurrent
  (predicted by the cost model Chorus plans with);
* two more allocations, to check the cost model: one instance each at batch 8, and two
  instances each at batch 64.

Each is predicted twice: by the cost model with what chorus profile measures (busy time,
Triton's CPU per call, what serving adds per request and per call, the cores it keeps busy:
the clients run on this machine and count), and by the latency-only model (each call's round
trip as the instance's busy time, nothing else on the cores), side by side. Every case is
served and measured once per round, rounds interleaved, each round predicted from a profile
measured just before it (this machine's speed drifts); the medians are compared.

Also 1 / sum_m(1 / peak_m), where peak_m is member m's throughput measured alone on the whole
machine (under its own plan): the members run one at a time, each at its peak; and the plan's
throughput as a fraction of it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from benchmarks.report import publish
from orchestrator.deploying.up import Deployment
from orchestrator.examples.digits.train import HERE, load_split, train_members
from orchestrator.measuring.bench import Load, ensemble_load, member_load
from orchestrator.measuring.measure import measure_profile
from orchestrator.planning.allocate import SearchResult, problem, worst_fit
from orchestrator.planning.hardware import discover
from orchestrator.planning.plan import (
    Plan,
    make_plan,
    one_instance_each,
    plan_ensemble,
    predict,
    predict_sequential,
)
from orchestrator.planning.profile import Curve, Profile
from orchestrator.planning.spec import Ensemble, load_ensemble


def serve_and_load(ensemble: Ensemble, plan: Plan, work: Path, x, args, fan_out, clients):
    with Deployment(ensemble, work, plan=plan, fan_out=fan_out) as endpoints:
        return ensemble_load(endpoints.ensemble, x, args.batch, clients, args.seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=64, help="rows per client request")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds of every case, interleaved; the median"
    )
    parser.add_argument(
        "--profile-seconds", type=float, default=0.5, help="chorus profile's time per point"
    )
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

    def measure(r: int) -> Profile:
        path = root / f"profile-{r}"
        return measure_profile(ensemble, path, seconds_per_point=args.profile_seconds)

    profile = measure(0)  # the plan and the baseline: from the first round's profile
    planned = plan_ensemble(ensemble.name, names, ensemble.max_batch_size, profile, devices)
    p = problem(names, profile, devices, ensemble.max_batch_size, clients_on_host=True)
    n0, b0 = worst_fit(p)
    baseline = make_plan(ensemble.name, p, SearchResult(n0, b0, 0.0, 0))
    single = one_instance_each(ensemble.name, names, devices, ensemble.max_batch_size)
    (cpu,) = {d for per in single.instances.values() for d in per}
    at8 = replace(single, max_batch_size=dict.fromkeys(names, 8))
    twice = replace(single, instances={m: {cpu: 2} for m in names})
    c = args.concurrency
    cases = [  # label, plan, fan-out, clients
        ("Chorus plan", planned, "concurrent", c),
        ("baseline, sequential", baseline, "sequential", 1),
        ("baseline, concurrent", baseline, "concurrent", c),
        ("1 each, batch 8", at8, "concurrent", c),
        ("2 each, batch 64", twice, "concurrent", c),
    ]

    def predictions(profile: Profile) -> list[tuple[float, float]]:
        """Per case: the cost model's prediction, the latency-only model's."""
        # the model as it was before chorus profile measured busy time, CPU and the combiner
        basic = Profile(
            {
                m: {
                    k: Curve(c.memory_bytes, c.memory_per_sample_bytes, c.latency_ms)
                    for k, c in cs.items()
                }
                for m, cs in profile.members.items()
            }
        )
        return [
            (predict_sequential(plan, profile), predict_sequential(plan, basic))
            if fan_out == "sequential"
            else (predict(plan, profile, True), predict(plan, basic))
            for _, plan, fan_out, _ in cases
        ]

    # the first deployment of a run measured 2-20% below the same allocation served later in
    # the run, in 6 runs of 6: one is served first and its measurement dropped
    serve_and_load(ensemble, planned, root / "warm-up", x, args, "concurrent", c)
    # every case once per round, rounds interleaved: a slow stretch of the machine (the same
    # allocation measured 25,408 and 16,768 samples/s within one run) hits every case alike;
    # and each round predicted from a profile measured just before it: the machine's speed
    # drifts by as much over a run (one allocation measured 12,523 samples/s, and 19,755
    # half an hour later)
    loads: dict[int, list[Load]] = {i: [] for i in range(len(cases))}
    guesses: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(cases))}
    hosts = []
    for r in range(args.rounds):
        measured = profile if r == 0 else measure(r)
        hosts.append(measured.host)
        for i, guess in enumerate(predictions(measured)):
            guesses[i].append(guess)
        for i, (label, plan, fan_out, clients) in enumerate(cases):
            work = root / f"case{i}-round{r}"
            load = serve_and_load(ensemble, plan, work, x, args, fan_out, clients)
            loads[i].append(load)
            print(
                f"round {r + 1}, {label}: {load.samples_per_s:,.0f} samples/s, predicted "
                f"{guesses[i][-1][0]:,.0f}",
                flush=True,
            )
    rows: list[tuple[str, Plan, str, int, list[float], float, Load, list[Load]]] = []
    for i, (label, plan, fan_out, clients) in enumerate(cases):
        ranked = sorted(loads[i], key=lambda load: load.samples_per_s)
        predicted = sorted(g[0] for g in guesses[i])
        before = statistics.median(g[1] for g in guesses[i])
        rows.append(
            (label, plan, fan_out, clients, predicted, before, ranked[len(ranked) // 2], ranked)
        )

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

    plan_load = rows[0][6].samples_per_s
    sequential_load = rows[1][6].samples_per_s
    concurrent_load = rows[2][6].samples_per_s
    lines = [
        "# Served: the digits ensemble under Chorus's plan, the baseline, and the cost model",
        "",
        f"`python -m benchmarks.served --seconds {args.seconds} --batch {args.batch} "
        f"--concurrency {args.concurrency} --rounds {args.rounds} --profile-seconds "
        f"{args.profile_seconds}` on this machine: "
        f"{devices[-1].cores} CPU cores ({devices[-1].name}), no GPU, the bundled Triton 2.51 "
        "(Python backend running onnxruntime, 1 intra-op thread per instance). Closed loop: "
        f"{args.concurrency} clients, {args.batch} rows per request, {args.seconds} s each, "
        "all through the combiner (the sequential baseline: one client, so that one member "
        "runs at a time, as its prediction assumes), after a warm-up deployment whose "
        f"measurement is dropped. Every case is measured in {args.rounds} interleaved rounds, "
        "each on a fresh deployment; *measured* is the median round, the range beside it "
        "all rounds. Throughputs in samples (rows) per second.",
        "",
        "| allocation | instances (mlp, mlp_bagged, cnn, wide_cnn) | batch sizes | fan-out | "
        "clients | predicted (median) | rounds | measured (median) | rounds | error | "
        "latency-only model: predicted, error | p50 ms | p99 ms |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    errors = []
    for label, plan, fan_out, clients, guessed, before, load, ranked in rows:
        counts = ", ".join(str(sum(plan.instances[m].values())) for m in names)
        sizes = ", ".join(str(plan.max_batch_size[m]) for m in names)
        predicted = statistics.median(guessed)
        error = (predicted - load.samples_per_s) / load.samples_per_s
        errors.append(error)
        old = (before - load.samples_per_s) / load.samples_per_s
        lines.append(
            f"| {label} | {counts} | {sizes} | {fan_out} | {clients} | {predicted:,.0f} | "
            f"{guessed[0]:,.0f}-{guessed[-1]:,.0f} | "
            f"{load.samples_per_s:,.0f} | {ranked[0].samples_per_s:,.0f}-"
            f"{ranked[-1].samples_per_s:,.0f} | {error:+.0%} | {before:,.0f}, {old:+.0%} | "
            f"{load.p50_ms:.1f} | {load.p99_ms:.1f} |"
        )
    measured_hosts = [h for h in hosts if h is not None]

    def spread(field: str, unit: str = " ms", sign: str = "") -> str:
        values = sorted(getattr(h, field) or 0.0 for h in measured_hosts)
        low, high = f"{values[0]:{sign}.2f}", f"{values[-1]:{sign}.2f}"
        return f"{low}{unit}" if low == high else f"{low} to {high}{unit}"

    lines += [
        "",
        f"Cost model error: {min(errors):+.0%} to {max(errors):+.0%} (goal: within ±25%). "
        "Each round predicted from a profile measured just before it (*predicted* is the "
        "median of the rounds' predictions, the range beside it all of them): each member's "
        "busy time and Triton's CPU per batch size"
        + (
            "; and what serving costs beyond the members' calls, measured through the "
            f"combiner under load, per request of {measured_hosts[0].rows} rows (the range over "
            f"the rounds' profiles): the machine's CPU {spread('combiner_cpu_ms')}, the "
            f"client's {spread('client_cpu_ms')} (the clients run here, so they count), "
            f"{spread('call_cpu_ms', sign='+')} per member call (a call when serving, against "
            "Triton's CPU for one call measured alone), "
            f"{spread('latency_ms')} of added latency ({spread('sequential_call_ms')} per member "
            "call when they are called one after another), and the share of the "
            f"{devices[-1].cores} cores that serving kept busy: {spread('busy_share', unit='')}"
            if measured_hosts
            else ""
        )
        + ". The latency-only model is the same profile without these (each call's round trip "
        "taken as the instance's busy time, nothing else on the cores).",
        "",
        f"**Chorus plan / baseline: {plan_load / sequential_load:.2f}x against the sequential "
        f"baseline, {plan_load / concurrent_load:.2f}x against the concurrent one** (measured "
        "side by side).",
        "",
        "Each member alone on the whole machine (its own plan, called directly on Triton at "
        "the same concurrency, batches of its planned size), measured: "
        + ", ".join(f"{m} {p.samples_per_s:,.0f}" for m, p in peaks.items())
        + f". The members one at a time, each at that peak, 1 / sum(1 / peak): "
        f"**{limit:,.0f}** samples/s; the plan reaches **{plan_load / limit:.0%}** of it (above "
        "100%: run concurrently, the members overlap their calls' waits on the two cores).",
        "",
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
