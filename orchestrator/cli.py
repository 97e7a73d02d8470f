"""The ``chorus`` command line (``python -m orchestrator`` does the same).

Exit codes: 0 success; 2 invalid input (the message names the file, the field and the problem);
3 the ensemble cannot fit the hardware; 1 anything else that went wrong.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from .errors import ChorusError
from .spec import load_ensemble
from .up import Deployment

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


@app.command()
def up(
    ensemble_file: EnsembleArg,
    host: Annotated[str, typer.Option(help="address the ensemble endpoint listens on")] = (
        "127.0.0.1"
    ),
    grpc_port: Annotated[int, typer.Option(help="gRPC (KServe v2) port of the ensemble")] = 8100,
    workdir: Annotated[
        Path | None,
        typer.Option(help="where the model repository and logs go [default: .chorus/NAME]"),
    ] = None,
) -> None:
    """Serve the ensemble (Triton + combiner) until Ctrl-C or SIGTERM, then stop both."""
    ensemble = load_ensemble(ensemble_file)
    workdir = workdir or Path(".chorus") / ensemble.name
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    deployment = Deployment(ensemble, workdir.resolve(), host=host, grpc_port=grpc_port)
    try:
        with console.status(f"starting Triton and the combiner for {ensemble.name!r}..."):
            endpoints = deployment.start()
        print(
            f"ensemble {ensemble.name!r} ({len(ensemble.members)} members) serving on "
            f"{endpoints.ensemble} (gRPC, KServe v2)\n"
            f"Triton (members) on {endpoints.triton_grpc}; logs in {workdir}\n"
            "Ctrl-C to stop",
            flush=True,
        )
        while not stop.wait(0.5):
            for process in deployment.processes():
                if process is not None and (code := process.exited()) is not None:
                    raise process.failure(f"exited unexpectedly with code {code}")
        console.print("stopping...")
    finally:
        deployment.stop()


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="where the model repository and logs go")] = Path(
        ".chorus/demo"
    ),
    epochs: Annotated[int, typer.Option(help="training epochs per member")] = 20,
) -> None:
    """Train 4 DNNs on digits, serve them on a real Triton, report accuracy and throughput."""
    from examples.digits.demo import run

    run(workdir.resolve(), epochs=epochs, console=console)


def main() -> None:
    try:
        app()  # click reports usage errors itself, with exit code 2
    except ChorusError as e:
        console.print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True)
        raise SystemExit(e.exit_code) from None
