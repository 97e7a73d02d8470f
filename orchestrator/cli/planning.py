"""The ``chorus`` commands that measure and plan: ``profile`` (each member measured on a real
Triton), ``plan`` (the members placed from a profile), ``tune`` (the search, measured on the live
Triton) and ``render`` (a plan written out as model repositories or Kubernetes manifests, without
serving it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from combiner import DAY_MS
from orchestrator.cli.options import (
    BorrowOpt,
    CalibrationOpt,
    EnsembleArg,
    HardwareOpt,
    ProfileOpt,
    WorkdirOpt,
    console,
    finite,
    make_plan,
    resolve_cascade_options,
    resolve_profile,
    resolve_workdir,
)
from orchestrator.deploying.render import Backend, pick_backend, render_plan
from orchestrator.errors import SpecError
from orchestrator.planning.hardware import discover
from orchestrator.planning.plan import TIME_LIMIT_S, load_plan, plan_ensemble, plan_table
from orchestrator.planning.profile import save_profile
from orchestrator.planning.spec import load_ensemble

__all__ = ["plan", "profile", "render", "tune"]


def profile(
    ensemble_file: EnsembleArg,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="\\[default: WORKDIR/profile.json]")
    ] = None,
    workdir: WorkdirOpt = None,
    seconds: Annotated[
        float,
        typer.Option(parser=finite(0.01, 3600), help="measuring time per batch size (0.01-3600 s)"),
    ] = 0.3,
) -> None:
    """Measure each member on a real Triton: memory per instance, latency, busy time and
    Triton's CPU per batch size; then what a request costs beyond its members, through the
    combiner."""
    from orchestrator.measuring.measure import measure_profile

    ensemble = load_ensemble(ensemble_file)
    workdir = resolve_workdir(ensemble, workdir)
    measured = measure_profile(ensemble, workdir, seconds_per_point=seconds)
    output = output or workdir / "profile.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    save_profile(measured, output)
    table = Table(title=f"profile of {ensemble.name!r}: latency (ms) per batch size")
    table.add_column("member / device")
    table.add_column("memory (MiB)", justify="right")
    table.add_column("per sample (KiB)", justify="right")
    sizes = sorted(
        {b for cs in measured.members.values() for c in cs.values() for b in c.batch_sizes}
    )
    for b in sizes:
        table.add_column(str(b), justify="right")
    for member, curves in measured.members.items():
        for kind, c in curves.items():
            lat = dict(c.latency_ms)
            table.add_row(
                f"{member} / {kind}",
                f"{c.memory_bytes / 2**20:.1f}",
                f"{c.memory_per_sample_bytes / 2**10:.1f}",
                *(f"{lat[b]:.2f}" if b in lat else "" for b in sizes),
            )
    Console().print(table)
    host = measured.host
    if host is not None:
        bounds = {name: (low, high) for name, low, high in host.bounds}

        def cost(name: str) -> str:
            value = getattr(host, name)
            if value is None:
                return "not measured (see below)"
            low, high = bounds.get(name, (value, value))
            return f"{value:.2f} ms ({low:.2f} to {high:.2f})" if low != high else f"{value:.2f} ms"

        console.print(
            f"serving, per request of {host.rows} rows through the combiner (medians over the "
            f"measuring rounds, their range in brackets): CPU beyond the members' calls "
            f"{cost('combiner_cpu_ms')}, client CPU {cost('client_cpu_ms')}, CPU per member "
            f"call beyond Triton's one at a time {cost('call_cpu_ms')}, added to the slowest "
            f"member's call {cost('latency_ms')}, to each call when called one after another "
            f"{cost('sequential_call_ms')}; share of the cores kept busy: "
            + ("all" if host.busy_share is None else f"{host.busy_share:.0%}")
        )
        for name, reason in host.unmeasured:
            console.print(f"  {name}: {reason}")
    console.print(f"wrote {output}")


def plan(
    ensemble_file: EnsembleArg,
    hardware: HardwareOpt = None,
    profile: ProfileOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write the plan")] = None,
    png: Annotated[
        Path | None, typer.Option("--png", help="draw the allocation matrix to this PNG file")
    ] = None,
    effort: Annotated[
        float,
        typer.Option(
            parser=finite(0, 1000),
            help="search effort (0-1000): 1 plans 12 members x 16 GPUs in a few seconds",
        ),
    ] = 1.0,
    borrow_curves: BorrowOpt = False,
    workdir: WorkdirOpt = None,
    calibration: CalibrationOpt = None,
    time_limit: Annotated[
        float,
        typer.Option(
            parser=finite(0, DAY_MS / 1000),
            help="seconds the search may take (at most 86400): then the best plan found so far "
            "(0: no limit)",
        ),
    ] = TIME_LIMIT_S,
    evaluations: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=1 << 40,
            help="stop after this many allocations scored: with --time-limit 0, the same "
            "plan on any machine",
        ),
    ] = None,
) -> None:
    """Place the members (worst-fit, then the search): the allocation matrix, its throughput
    (samples/s) and each member's predicted latency. With a cascade, each member is sized for
    the share of the rows that reach its tier (from the calibration)."""
    ensemble = load_ensemble(ensemble_file, read_models=profile is None)
    workdir = resolve_workdir(ensemble, workdir)
    cascading = resolve_cascade_options(ensemble, calibration, workdir)
    result = make_plan(
        ensemble,
        hardware,
        profile,
        workdir,
        effort,
        borrow_curves,
        shares=cascading.shares,
        shares_file=cascading.calibration,
        time_limit_s=time_limit or None,
        evaluations=evaluations,
    )
    if output:
        output.write_text(result.to_json())
    if png:
        from orchestrator.planning.picture import draw_plan

        draw_plan(result, png)
        console.print(f"wrote {png}")
    if as_json:
        print(result.to_json(), end="")
        return
    out = Console()
    out.print(plan_table(result))
    out.print(f"predicted throughput: {result.predicted_throughput:,.1f} samples/s")
    out.print(result.data_path().describe())


def tune(
    ensemble_file: EnsembleArg,
    profile: ProfileOpt = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="\\[default: WORKDIR/tuned-plan.json]")
    ] = None,
    budget: Annotated[int, typer.Option(min=1, max=10_000, help="measurements at most")] = 12,
    seconds: Annotated[
        float,
        typer.Option(parser=finite(0.1, 3600), help="load time per measurement (0.1-3600 s)"),
    ] = 2.0,
    batch: Annotated[int, typer.Option(min=1, max=65536, help="rows per client request")] = 16,
    concurrency: Annotated[int, typer.Option(min=1, max=4096, help="concurrent clients")] = 8,
    workdir: WorkdirOpt = None,
) -> None:
    """The greedy search, measured on the live Triton: each candidate applied and loaded."""
    from orchestrator.measuring.tune import tune as run_tune

    ensemble = load_ensemble(ensemble_file)
    workdir = resolve_workdir(ensemble, workdir)
    if ensemble.cascade is not None:
        console.print(
            "tune measures the full ensemble (every member, every row): its plan is the full "
            "ensemble's; 'chorus plan' sizes the members for the cascade"
        )
    measured, source = resolve_profile(ensemble, profile, workdir)
    names = [m.name for m in ensemble.members]
    start = plan_ensemble(
        ensemble.name,
        names,
        ensemble.max_batch_size,
        measured,
        discover(),
        source,
        latency_target_ms=ensemble.latency_target_ms,
    )
    output = output or workdir / "tuned-plan.json"
    checkpoint = workdir / "tune-checkpoint.json"
    try:
        result = run_tune(
            ensemble,
            start,
            measured,
            workdir / "tune",
            checkpoint,
            output,
            budget=budget,
            seconds=seconds,
            batch=batch,
            concurrency=concurrency,
        )
    except KeyboardInterrupt:
        console.print(
            f"interrupted: the best plan measured so far is in {output} (history in {checkpoint})"
        )
        raise typer.Exit(130) from None
    table = Table(title="measurements (samples/s)")
    for col in ("#", "change", "predicted", "measured"):
        table.add_column(col, justify="left" if col == "change" else "right")
    for i, (what, predicted, got) in enumerate(result.history):
        table.add_row(str(i), what, f"{predicted:,.0f}", f"{got:,.0f}")
    out = Console()
    out.print(table)
    out.print(plan_table(result.plan))
    out.print(f"best measured: {result.measured:,.0f} samples/s; plan written to {output}")


def render(
    plan_file: Annotated[Path, typer.Argument(help="the plan (from 'chorus plan -o')")],
    ensemble_file: Annotated[Path, typer.Option("--ensemble", help="the ensemble file")],
    output: Annotated[Path, typer.Option("-o", "--output", help="folder to write into")],
    target: Annotated[
        Literal["repository", "kubernetes"],
        typer.Option(help="a Triton model repository, or Kubernetes manifests"),
    ] = "repository",
    node: Annotated[
        str | None, typer.Option(help="repository: only this node's part, into OUTPUT itself")
    ] = None,
    backend: Annotated[
        Backend | None,
        typer.Option(help="repository: Triton backend \\[default: what the local server has]"),
    ] = None,
    image: Annotated[str, typer.Option(help="kubernetes: the Chorus image")] = "chorus:latest",
    triton_image: Annotated[
        str, typer.Option(help="kubernetes: Triton's image on nodes with GPUs")
    ] = "nvcr.io/nvidia/tritonserver:24.12-py3",
    models_claim: Annotated[
        str,
        typer.Option(help="kubernetes: the PersistentVolumeClaim holding the ensemble's files"),
    ] = "chorus-models",
    ensemble_path: Annotated[
        str, typer.Option(help="kubernetes: the ensemble file's path inside that claim")
    ] = "ensemble.yaml",
    replicas: Annotated[int, typer.Option(min=1, max=1000, help="kubernetes: combiner pods")] = 2,
    namespace: Annotated[str | None, typer.Option(help="kubernetes: namespace")] = None,
    calibration: CalibrationOpt = None,
) -> None:
    """Render a plan without serving it: the model repository (per node), or the Kubernetes
    manifests that serve it (one Triton per node, the combiner behind a Service)."""
    ensemble = load_ensemble(ensemble_file)
    result = load_plan(plan_file)
    if target == "kubernetes":
        from orchestrator.deploying.kubernetes import render_kubernetes

        cascading = resolve_cascade_options(ensemble, calibration, resolve_workdir(ensemble, None))
        files = render_kubernetes(
            ensemble,
            result,
            output,
            image,
            triton_image,
            models_claim,
            ensemble_path,
            replicas,
            namespace,
            cascading.route,
        )
        for path in files:
            print(f"wrote {path}")
        return
    from orchestrator.deploying.launch import find_tritonserver
    from orchestrator.deploying.render import render_node

    if output.exists() and not output.is_dir():
        raise SpecError(output, "", "is not a folder: give a folder to render into")
    backend = backend or pick_backend(find_tritonserver().backends)
    if node is None:
        written = render_plan(ensemble, result, output, backend)
    elif node not in result.nodes():
        raise SpecError(plan_file, "devices", f"no node {node!r} in the plan")
    else:
        written = render_node(ensemble, result, node, output, backend)
    print(f"{output}: {len(written)} file(s) written")
