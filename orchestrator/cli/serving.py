"""The ``chorus`` commands that serve: ``up`` (Triton and the combiner on this host, until
stopped), ``regenerate-configs`` (plan again and switch the running Tritons to it) and ``node``
(one node's tritonserver, in a container)."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from combiner import DAY_MS, PortInUse, claim_ports
from orchestrator.cli.options import (
    BorrowOpt,
    CalibrationOpt,
    ConsoleThread,
    EnsembleArg,
    HardwareOpt,
    ProfileOpt,
    WorkdirOpt,
    already_stopping,
    check_calibration_option,
    console,
    finite,
    make_plan,
    resolve_cascade_options,
    resolve_workdir,
)
from orchestrator.deploying.render import (
    Backend,
    describe_changes,
    fanout_name,
    pick_backend,
    render_plan,
)
from orchestrator.deploying.up import Deployment, Endpoints
from orchestrator.deploying.workdir import owning
from orchestrator.errors import ChorusError, SpecError
from orchestrator.planning.plan import Plan, load_plan
from orchestrator.planning.spec import load_ensemble

__all__ = ["node", "regenerate_configs", "up"]


def _workers_option(value: str) -> str:
    if value != "auto" and not (value.isascii() and value.isdigit() and 1 <= int(value) <= 256):
        raise typer.BadParameter(f"'auto' or a whole number from 1 to 256, not {value!r}")
    return value


def up(
    ensemble_file: EnsembleArg,
    host: Annotated[str, typer.Option(help="address the ensemble endpoint listens on")] = (
        "127.0.0.1"
    ),
    grpc_port: Annotated[
        int, typer.Option(min=1, max=65535, help="gRPC (KServe v2) port of the ensemble")
    ] = 8100,
    http_port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="HTTP/REST (KServe v2) port of the ensemble"),
    ] = 8101,
    metrics_port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Prometheus /metrics of the combiner (0: none)"),
    ] = 8102,
    workers: Annotated[
        str,
        typer.Option(
            help="combiner processes sharing the port; auto: as many as the plan needs to carry "
            "its throughput (from the profile's host costs), within the cores Triton leaves",
            callback=_workers_option,
        ),
    ] = "auto",
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
        float,
        typer.Option(
            parser=finite(0, DAY_MS / 1000),
            help="on stop, seconds to answer the requests in flight (at most 86400)",
        ),
    ] = 30.0,
    calibration: CalibrationOpt = None,
) -> None:
    """Serve the ensemble (Triton + combiner) until Ctrl-C or SIGTERM, then stop both.

    Triton or the combiner that dies is restarted (the ensemble answers UNAVAILABLE
    meanwhile); only a crash loop (5 restarts in a minute) ends the command, with exit code 1.
    """
    with ConsoleThread() as out:  # from here on, nothing waits for the console
        ensemble = load_ensemble(ensemble_file)
        _check_files(token_file=token_file, tls_cert=tls_cert, tls_key=tls_key)
        check_calibration_option(ensemble, calibration)
        if (tls_cert is None) != (tls_key is None):
            raise SpecError("--tls-cert/--tls-key", "", "TLS needs both a certificate and a key")
        try:  # before any long step: the combiner's supervisor refuses them too, later
            claim_ports(host, [p for p in (grpc_port, http_port, metrics_port) if p], hold=False)
        except PortInUse as e:
            raise SpecError("--grpc-port/--http-port/--metrics-port", "", str(e.strerror)) from None
        except OSError as e:  # a name that does not resolve, an address not this host's
            raise SpecError("--host", "", f"cannot listen on {host!r}: {e.strerror}") from None
        workdir = resolve_workdir(ensemble, workdir)
        with owning(workdir):  # before it profiles or writes there: one deployment a folder
            cascading = resolve_cascade_options(ensemble, calibration, workdir)
            plan = (
                load_plan(plan_file)
                if plan_file
                else make_plan(
                    ensemble,
                    None,
                    profile,
                    workdir,
                    shares=cascading.shares,
                    shares_file=cascading.calibration,
                )
            )
            deployment = Deployment(
                ensemble,
                workdir,
                host=host,
                grpc_port=grpc_port,
                http_port=http_port,
                plan=plan,
                workers=None if workers == "auto" else int(workers),
                metrics_port=metrics_port or None,  # (0: no metrics endpoint)
                allow_client_shm=allow_client_shm,
                token_file=token_file,
                tls_cert=tls_cert,
                tls_key=tls_key,
                drain_timeout_s=drain_timeout,
                cascade=cascading.route,
            )

            def banner(endpoints: Endpoints) -> str:
                http = endpoints.ensemble_http
                scheme = "https" if tls_cert else "http"
                return (
                    f"ensemble {ensemble.name!r} ({len(ensemble.members)} members) serving on "
                    f"{endpoints.ensemble} (gRPC, KServe v2)"
                    + (f" and {scheme}://{http} (HTTP/REST)" if http else "")
                    + "\n"
                    f"Triton (members) on {endpoints.triton_grpc}, its APIs behind a key only "
                    f"Chorus holds; logs in {workdir} (restarts: events.log)\n"
                    + (f"metrics on http://{host}:{metrics_port}/metrics\n" if metrics_port else "")
                    + (
                        f"{plan.data_path().describe()}\n"
                        if workers == "auto"
                        else f"combiner: {workers} process(es) (--workers; auto would start "
                        f"{plan.combiner_workers})\n"
                    )
                    + "Ctrl-C to stop"
                )

            events = _Events(workdir / "events.log", out)
            try:
                _serve(deployment, events, banner, drain_timeout)
            finally:
                events.close()


def _serve(
    deployment: Deployment,
    events: _Events,
    banner: Callable[[Endpoints], str],
    drain_timeout: float,
) -> None:
    """Start the deployment, serve it until a signal (then drain) or a crash loop, stop it;
    each step in events.log."""
    ensemble = deployment.ensemble
    events.note(f"starting {ensemble.name!r} (chorus up, pid {os.getpid()})")
    try:
        try:
            with console.status(f"starting Triton and the combiner for {ensemble.name!r}..."):
                endpoints = deployment.start()  # a signal meanwhile stops it: 130, 143, 129
            stop = threading.Event()  # from here on a signal drains: exit 0

            def drain(signum: int, frame: FrameType | None) -> None:
                if stop.is_set():
                    already_stopping()
                stop.set()

            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # (SIGINT or SIGHUP ignored:
                    signal.signal(sig, drain)  # kept, as under nohup)
            events.show(banner(endpoints))
            events.note(f"serving on {endpoints.ensemble}")
            deployment.supervise(stop, events.say)
            events.say(f"stopping: answering the requests in flight (up to {drain_timeout:g} s)...")
            stopping = time.monotonic()
        finally:
            deployment.stop()
        events.say(
            f"stopped in {time.monotonic() - stopping:.1f} s: the combiner answered what it had "
            "accepted, and Triton is down"
        )
    except ChorusError as e:  # a failed start, or a crash loop: main() prints it
        events.note(f"error: {e}")
        raise
    except KeyboardInterrupt:  # a signal before serving: what had started is stopped
        events.note("stopped by a signal before serving")
        raise


class _Events:
    """What ``chorus up`` reports from its start: in WORKDIR/events.log (appended, each line
    with the time), written first, then on the console through its thread (which never holds
    the supervision or a stop up). The file stays where the console's reader is gone (``|
    head``, a closed terminal). One that is not a regular file (a FIFO, a device) or cannot be
    written is not used, with a word on the console."""

    def __init__(self, file: Path, out: ConsoleThread) -> None:
        self.file = file
        self._out = out
        self._fd: int | None = None
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            # O_NONBLOCK: a FIFO without a reader is ENXIO at once, not a wait for one
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(file, flags, 0o600)  # (a failure's log tail may go there)
        except OSError as e:
            self._unusable(e.strerror or str(e))
            return
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            os.close(fd)
            self._unusable("not a regular file")
            return
        with contextlib.suppress(OSError):  # (one an earlier version made 0644)
            os.fchmod(fd, 0o600)
        self._fd = fd
        size = status.st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a line cut short (a full disk)
            self._write(b"\n")

    def say(self, line: str) -> None:
        """In the file, then on stderr."""
        self.note(line)
        self._out.put(2, line + "\n")

    def show(self, text: str) -> None:
        """On stdout alone (the banner that says where the ensemble serves)."""
        self._out.put(1, text + "\n")

    def note(self, line: str) -> None:
        """In the file alone."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._write("".join(f"{stamp} {part}\n" for part in line.splitlines() or [""]).encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            return
        try:
            while data:  # a short write (a disk filling up) goes on, or fails below
                data = data[os.write(self._fd, data) :]
        except OSError as e:  # a full disk: served on, and said once
            self.close()
            self._unusable(e.strerror or str(e))

    def _unusable(self, why: str) -> None:
        line = f"warning: cannot write {self.file} ({why}): events go to the console only\n"
        self._out.put(2, line)


def _check_files(**paths: Path | None) -> None:
    for option, path in paths.items():
        if path is not None and not path.is_file():
            raise SpecError(path, "", f"no such file (given as --{option.replace('_', '-')})")


def regenerate_configs(
    ensemble_file: EnsembleArg,
    repo: Annotated[Path, typer.Option(help="the model repository to rewrite")],
    hardware: HardwareOpt = None,
    profile: ProfileOpt = None,
    workdir: WorkdirOpt = None,
    backend: Annotated[
        Backend | None,
        typer.Option(help="Triton backend to render for \\[default: what the local server has]"),
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
    calibration: CalibrationOpt = None,
) -> None:
    """Re-detect the hardware, plan again, rewrite the configs; print what changed. With the
    running Tritons' addresses, they switch to the new configs in place."""
    from orchestrator.deploying.deploy import new_key, switch
    from orchestrator.deploying.launch import find_tritonserver
    from orchestrator.deploying.up import combiner_config

    ensemble = load_ensemble(ensemble_file)
    workdir = resolve_workdir(ensemble, workdir)
    cascading = resolve_cascade_options(ensemble, calibration, workdir)
    result = make_plan(
        ensemble,
        hardware,
        profile,
        workdir,
        borrow_curves=borrow_curves,
        shares=cascading.shares,
        shares_file=cascading.calibration,
    )
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
            cascade=cascading.route,
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


def node(
    repo: Annotated[Path, typer.Argument(help="the node's rendered repository")],
    key_file: Annotated[Path, typer.Option(help="the key to its restricted APIs")],
    host: Annotated[str, typer.Option(help="address Triton listens on")] = "127.0.0.1",
    grpc_port: Annotated[int, typer.Option(min=1, max=65535)] = 8001,
    http_port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    workdir: Annotated[Path, typer.Option(help="where the Python backend's files go")] = Path(
        "/tmp/chorus-node"
    ),
) -> None:
    """Serve one node's part of a plan: become its tritonserver (every model in the
    repository loaded, explicit model control, every API but health behind the key). The
    same command for a compose service and a pod; the container restarts it."""
    from orchestrator.deploying.deploy import serve_node

    serve_node(repo.resolve(), workdir.resolve(), key_file, host, grpc_port, http_port)
