"""The ``chorus`` command line (``python -m orchestrator`` does the same).

Exit codes: 0 success; 2 invalid input (the message names the file, the field and the problem);
3 the ensemble cannot fit the hardware; 1 anything else that went wrong.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from combiner import PortInUse, claim_ports
from orchestrator.deploying.render import (
    Backend,
    describe_changes,
    fanout_name,
    pick_backend,
    render_plan,
)
from orchestrator.deploying.up import Deployment
from orchestrator.errors import ChorusError, SpecError
from orchestrator.planning.hardware import Device, discover, load_hardware
from orchestrator.planning.plan import Plan, load_plan, plan_ensemble, plan_table
from orchestrator.planning.profile import Profile, load_profile, save_profile
from orchestrator.planning.spec import Ensemble, load_ensemble

__all__ = ["app", "main"]

app = typer.Typer(
    name="chorus",
    help="Serve ensembles of deep neural networks on NVIDIA Triton Inference Server.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

EnsembleArg = Annotated[Path, typer.Argument(help="the ensemble file (ensemble.yaml)")]
HardwareOpt = Annotated[
    Path | None,
    typer.Option("--hardware", help="plan for the machine(s) this file describes, not this one"),
]
ProfileOpt = Annotated[
    Path | None,
    typer.Option("--profile", help="profile file to plan from [default: measure, or the cache]"),
]
WorkdirOpt = Annotated[
    Path | None,
    typer.Option(help="where repositories, logs and the profile cache go [default: .chorus/NAME]"),
]


def _workdir(ensemble: Ensemble, workdir: Path | None) -> Path:
    return (workdir or Path(".chorus") / ensemble.name).resolve()


def _devices(hardware: Path | None) -> tuple[Device, ...]:
    return load_hardware(hardware) if hardware else discover()


def _profile(ensemble: Ensemble, profile: Path | None, workdir: Path) -> tuple[Profile, Path]:
    """The given profile; else the cached one if it covers every member; else measure now."""
    if profile is not None:
        return load_profile(profile), profile
    cache = workdir / "profile.json"
    if cache.is_file():
        cached = load_profile(cache)
        if set(cached.members) >= {m.name for m in ensemble.members}:
            console.print(f"using the cached profile {cache} ('chorus profile' measures again)")
            return cached, cache
    from orchestrator.measuring.measure import measure_profile

    console.print("no profile yet: measuring every member on this machine's Triton")
    measured = measure_profile(ensemble, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    save_profile(measured, cache)
    return measured, cache


def _plan(
    ensemble: Ensemble,
    hardware: Path | None,
    profile: Path | None,
    workdir: Path,
    effort: float = 1.0,
    borrow_curves: bool = False,
) -> Plan:
    devices = _devices(hardware)
    measured, source = _profile(ensemble, profile, workdir)
    names = [m.name for m in ensemble.members]
    if not borrow_curves:
        for device_id, members in measured.uncovered(names, devices).items():
            left = "left empty" if len(members) == len(names) else "not placed there"
            console.print(
                f"[yellow]{device_id}: {source} has no curve for {', '.join(members)} on it "
                f"({left}).[/yellow] Measure it with 'chorus profile' on that host, or pass "
                "--borrow-curves to run another device's curve scaled by the hardware "
                "file's 'speed'."
            )
    return plan_ensemble(
        ensemble.name,
        names,
        ensemble.max_batch_size,
        measured,
        devices,
        source,
        latency_target_ms=ensemble.latency_target_ms,
        effort=effort,
        borrow_curves=borrow_curves,
    )


BorrowOpt = Annotated[
    bool,
    typer.Option(
        "--borrow-curves",
        help="plan devices the profile has no curve for with another device's curve, "
        "scaled by the hardware file's 'speed'",
    ),
]


@app.command()
def up(
    ensemble_file: EnsembleArg,
    host: Annotated[str, typer.Option(help="address the ensemble endpoint listens on")] = (
        "127.0.0.1"
    ),
    grpc_port: Annotated[int, typer.Option(help="gRPC (KServe v2) port of the ensemble")] = 8100,
    http_port: Annotated[
        int | None, typer.Option(help="HTTP/REST (KServe v2) port of the ensemble")
    ] = 8101,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus /metrics of the combiner")
    ] = 8102,
    workers: Annotated[int, typer.Option(min=1, help="combiner processes sharing the port")] = 1,
    workdir: WorkdirOpt = None,
    plan_file: Annotated[
        Path | None, typer.Option("--plan", help="serve this plan (from 'chorus plan -o')")
    ] = None,
    profile: ProfileOpt = None,
    allow_client_shm: Annotated[
        bool,
        typer.Option(help="let clients on this host register their own shared-memory regions"),
    ] = False,
    token_file: Annotated[
        Path | None,
        typer.Option(help="require 'Authorization: Bearer <the file's first line>'"),
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="serve TLS with this certificate")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="... and this private key")] = None,
    drain_timeout: Annotated[
        float, typer.Option(min=0, help="on stop, seconds to answer the requests in flight")
    ] = 30.0,
) -> None:
    """Serve the ensemble (Triton + combiner) until Ctrl-C or SIGTERM, then stop both.

    Triton or the combiner that dies is restarted (the ensemble answers UNAVAILABLE
    meanwhile); only a crash loop (5 restarts in a minute) ends the command, with exit code 1.
    """
    ensemble = load_ensemble(ensemble_file)
    _check_files(token_file=token_file, tls_cert=tls_cert, tls_key=tls_key)
    if (tls_cert is None) != (tls_key is None):
        raise SpecError("--tls-cert/--tls-key", "", "TLS needs both a certificate and a key")
    try:  # before any long step: the combiner's supervisor refuses them too, later
        claim_ports(host, [p for p in (grpc_port, http_port, metrics_port) if p], hold=False)
    except PortInUse as e:
        raise SpecError("--grpc-port/--http-port/--metrics-port", "", str(e.strerror)) from None
    workdir = _workdir(ensemble, workdir)
    plan = load_plan(plan_file) if plan_file else _plan(ensemble, None, profile, workdir)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    deployment = Deployment(
        ensemble,
        workdir,
        host=host,
        grpc_port=grpc_port,
        http_port=http_port,
        plan=plan,
        workers=workers,
        metrics_port=metrics_port,
        allow_client_shm=allow_client_shm,
        token_file=token_file,
        tls_cert=tls_cert,
        tls_key=tls_key,
        drain_timeout_s=drain_timeout,
    )
    try:
        with console.status(f"starting Triton and the combiner for {ensemble.name!r}..."):
            endpoints = deployment.start()
        scheme = "https" if tls_cert else "http"
        print(
            f"ensemble {ensemble.name!r} ({len(ensemble.members)} members) serving on "
            f"{endpoints.ensemble} (gRPC, KServe v2)"
            + (
                f" and {scheme}://{endpoints.ensemble_http} (HTTP/REST)"
                if endpoints.ensemble_http
                else ""
            )
            + "\n"
            f"Triton (members) on {endpoints.triton_grpc}, its APIs behind a key only Chorus "
            f"holds; logs in {workdir}\n"
            + (f"metrics on http://{host}:{metrics_port}/metrics\n" if metrics_port else "")
            + "Ctrl-C to stop",
            flush=True,
        )
        deployment.supervise(stop, lambda line: console.print(line))
        console.print(f"stopping: answering the requests in flight (up to {drain_timeout:g} s)...")
        stopping = time.monotonic()
    finally:
        deployment.stop()
    console.print(
        f"stopped in {time.monotonic() - stopping:.1f} s: the combiner answered what it had "
        "accepted, and Triton is down"
    )


def _check_files(**paths: Path | None) -> None:
    for option, path in paths.items():
        if path is not None and not path.is_file():
            raise SpecError(path, "", f"no such file (given as --{option.replace('_', '-')})")


@app.command()
def profile(
    ensemble_file: EnsembleArg,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="[default: WORKDIR/profile.json]")
    ] = None,
    workdir: WorkdirOpt = None,
    seconds: Annotated[float, typer.Option(help="measuring time per batch size")] = 0.3,
) -> None:
    """Measure each member on a real Triton: memory per instance, latency, busy time and
    Triton's CPU per batch size; then what a request costs beyond its members, through the
    combiner."""
    from orchestrator.measuring.measure import measure_profile

    ensemble = load_ensemble(ensemble_file)
    workdir = _workdir(ensemble, workdir)
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


@app.command()
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
        typer.Option(min=0, help="search effort: 1 plans 12 members x 16 GPUs in under 1 s"),
    ] = 1.0,
    borrow_curves: BorrowOpt = False,
    workdir: WorkdirOpt = None,
) -> None:
    """Place the members (worst-fit, then the search): the allocation matrix, its throughput
    (samples/s) and each member's predicted latency."""
    ensemble = load_ensemble(ensemble_file, read_models=profile is None)
    result = _plan(ensemble, hardware, profile, _workdir(ensemble, workdir), effort, borrow_curves)
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


@app.command("regenerate-configs")
def regenerate_configs(
    ensemble_file: EnsembleArg,
    repo: Annotated[Path, typer.Option(help="the model repository to rewrite")],
    hardware: HardwareOpt = None,
    profile: ProfileOpt = None,
    workdir: WorkdirOpt = None,
    backend: Annotated[
        Backend | None,
        typer.Option(help="Triton backend to render for [default: what the local server has]"),
    ] = None,
    borrow_curves: BorrowOpt = False,
    triton: Annotated[
        list[str] | None,
        typer.Option(
            help="NODE=HOST:PORT (or HOST:PORT for one node): the gRPC address of a node's "
            "Triton; if it is running, it loads the changed members there (repeat per node)",
        ),
    ] = None,
    key_file: Annotated[
        Path | None,
        typer.Option(help="the key to the Tritons' restricted APIs (made if missing)"),
    ] = None,
    combiner_config_file: Annotated[
        Path | None,
        typer.Option(
            "--combiner-config",
            help="write the combiner's config here (needs --triton for every node); a running "
            "combiner picks it up",
        ),
    ] = None,
    shared_memory: Annotated[
        bool,
        typer.Option(help="the combiner shares the (first) node's host and IPC namespace"),
    ] = False,
    plan_output: Annotated[Path | None, typer.Option(help="write the new plan here")] = None,
) -> None:
    """Re-detect the hardware, plan again, rewrite the configs; print what changed. With the
    running Tritons' addresses, they switch to the new configs in place."""
    from orchestrator.deploying.deploy import new_key, switch
    from orchestrator.deploying.launch import find_tritonserver
    from orchestrator.deploying.up import combiner_config

    ensemble = load_ensemble(ensemble_file)
    workdir = _workdir(ensemble, workdir)
    result = _plan(ensemble, hardware, profile, workdir, borrow_curves=borrow_curves)
    tritons = _node_addresses(triton or [], result)
    key = new_key(key_file) if key_file else None
    if combiner_config_file is not None and not tritons:
        raise SpecError("--triton", "", "--combiner-config needs every node's address")
    changes = describe_changes(repo, result)
    backend = backend or pick_backend(find_tritonserver().backends)
    written = render_plan(ensemble, result, repo, backend)
    if plan_output is not None:
        plan_output.write_text(result.to_json())
    for line in changes:
        print(line)
    print(f"{repo}: {len(written)} file(s) rewritten" if written else f"{repo}: unchanged")
    served = None
    if combiner_config_file is not None:
        config = combiner_config(
            ensemble,
            tritons,
            result,
            shared_memory=shared_memory,
            key_file=key_file.resolve() if key_file else None,
            fanout_model=(repo / fanout_name(ensemble)).is_dir(),
        )
        served = (combiner_config_file, config)
    running = {n: url for n, url in tritons.items() if _live(url)}
    if len(running) < len(tritons):
        down = ", ".join(f"{n} ({tritons[n]})" for n in tritons if n not in running)
        print(f"not running: {down}; it loads the new configs when it starts")
    done = switch(repo, result, written, running, key, served, lambda x: print(x, flush=True))
    if running:
        print(f"reloaded: {', '.join(done)}" if done else "nothing to reload")


def _node_addresses(given: list[str], plan: Plan) -> dict[str, str]:
    """--triton values as node -> address; a bare address names the plan's only node."""
    out = {}
    for item in given:
        node, sep, address = item.rpartition("=")
        if not sep:
            if len(plan.nodes()) != 1:
                raise SpecError("--triton", "", f"{item!r}: the plan has several nodes, say NODE=")
            node = plan.nodes()[0]
        elif node not in plan.nodes():
            raise SpecError(
                "--triton",
                "",
                f"{item!r}: the plan has no node {node!r} ({', '.join(plan.nodes())})",
            )
        out[node] = address
    return out


def _live(address: str) -> bool:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        with grpcclient.InferenceServerClient(address) as client:
            return bool(client.is_server_live(client_timeout=2.0))
    except InferenceServerException:
        return False


@app.command()
def node(
    repo: Annotated[Path, typer.Argument(help="the node's rendered repository")],
    key_file: Annotated[Path, typer.Option(help="the key to its restricted APIs")],
    host: Annotated[str, typer.Option(help="address Triton listens on")] = "127.0.0.1",
    grpc_port: Annotated[int, typer.Option()] = 8001,
    http_port: Annotated[int, typer.Option()] = 8000,
    workdir: Annotated[Path, typer.Option(help="where the Python backend's files go")] = Path(
        "/tmp/chorus-node"
    ),
) -> None:
    """Serve one node's part of a plan: become its tritonserver (every model in the
    repository loaded, explicit model control, every API but health behind the key). The
    same command for a compose service and a pod; the container restarts it."""
    from orchestrator.deploying.deploy import serve_node

    serve_node(repo.resolve(), workdir.resolve(), key_file, host, grpc_port, http_port)


@app.command()
def tune(
    ensemble_file: EnsembleArg,
    profile: ProfileOpt = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="[default: WORKDIR/tuned-plan.json]")
    ] = None,
    budget: Annotated[int, typer.Option(help="measurements at most")] = 12,
    seconds: Annotated[float, typer.Option(help="load time per measurement")] = 2.0,
    batch: Annotated[int, typer.Option(help="rows per client request")] = 16,
    concurrency: Annotated[int, typer.Option(help="concurrent clients")] = 8,
    workdir: WorkdirOpt = None,
) -> None:
    """The greedy search, measured on the live Triton: each candidate applied and loaded."""
    from orchestrator.measuring.tune import tune as run_tune

    ensemble = load_ensemble(ensemble_file)
    workdir = _workdir(ensemble, workdir)
    measured, source = _profile(ensemble, profile, workdir)
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


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="where the model repository and logs go")] = Path(
        ".chorus/demo"
    ),
    epochs: Annotated[int, typer.Option(help="training epochs per member")] = 20,
) -> None:
    """Train 4 DNNs on digits, serve them on a real Triton, report accuracy and throughput."""
    from orchestrator.examples.digits.demo import run

    run(workdir.resolve(), epochs=epochs, console=console)


@app.command()
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
        typer.Option(help="repository: Triton backend [default: what the local server has]"),
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
    replicas: Annotated[int, typer.Option(min=1, help="kubernetes: combiner pods")] = 2,
    namespace: Annotated[str | None, typer.Option(help="kubernetes: namespace")] = None,
) -> None:
    """Render a plan without serving it: the model repository (per node), or the Kubernetes
    manifests that serve it (one Triton per node, the combiner behind a Service)."""
    ensemble = load_ensemble(ensemble_file)
    result = load_plan(plan_file)
    if target == "kubernetes":
        from orchestrator.deploying.kubernetes import render_kubernetes

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
        )
        for path in files:
            print(f"wrote {path}")
        return
    from orchestrator.deploying.launch import find_tritonserver
    from orchestrator.deploying.render import render_node

    backend = backend or pick_backend(find_tritonserver().backends)
    if node is None:
        written = render_plan(ensemble, result, output, backend)
    elif node not in result.nodes():
        raise SpecError(plan_file, "devices", f"no node {node!r} in the plan")
    else:
        written = render_node(ensemble, result, node, output, backend)
    print(f"{output}: {len(written)} file(s) written")


@app.command()
def example(
    out: Annotated[Path, typer.Argument(help="folder for ensemble.yaml and models/")],
) -> None:
    """Write the digits example ensemble and train its 4 members (seconds, on the CPU); an
    example already there is left as it is."""
    from orchestrator.examples.digits.train import HERE, write_example

    target = out / "ensemble.yaml"
    names = [m.name for m in load_ensemble(HERE / "ensemble.yaml", read_models=False).members]
    if target.is_file() and all((out / "models" / f"{n}.onnx").is_file() for n in names):
        console.print(f"{target}: already there")
        return
    out.mkdir(parents=True, exist_ok=True)
    with console.status("training the digits example's members..."):
        write_example(out)
    console.print(f"wrote {target} and {len(names)} members in {out / 'models'}")


def main() -> None:
    try:
        app()  # click reports usage errors itself, with exit code 2
    except ChorusError as e:
        console.print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True)
        raise SystemExit(e.exit_code) from None
