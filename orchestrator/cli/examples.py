"""The ``chorus`` commands around the digits example: ``demo`` (trained, served and measured end
to end) and ``example`` (its files written, to start from)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli.options import console
from orchestrator.errors import ChorusError
from orchestrator.planning.spec import load_ensemble

__all__ = ["demo", "example"]


def demo(
    workdir: Annotated[Path, typer.Option(help="where the model repository and logs go")] = Path(
        ".chorus/demo"
    ),
    epochs: Annotated[int, typer.Option(min=1, max=10_000, help="training epochs per member")] = 20,
) -> None:
    """Train 4 DNNs on digits, serve them on a real Triton, report accuracy and throughput."""
    from orchestrator.examples.digits.demo import run

    _check_trainers()
    run(workdir.resolve(), epochs=epochs, console=console)


def example(
    out: Annotated[Path, typer.Argument(help="folder for ensemble.yaml and models/")],
) -> None:
    """Write the digits example ensemble and train its 4 members (about a minute on 2 CPU
    cores, with torch); an example already there is left as it is."""
    from orchestrator.examples.digits.train import HERE, write_example

    target = out / "ensemble.yaml"
    names = [m.name for m in load_ensemble(HERE / "ensemble.yaml", read_models=False).members]
    if target.is_file() and all((out / "models" / f"{n}.onnx").is_file() for n in names):
        console.print(f"{target}: already there")
        return
    _check_trainers()
    out.mkdir(parents=True, exist_ok=True)
    with console.status("training the digits example's members..."):
        write_example(out)
    console.print(f"wrote {target} and {len(names)} members in {out / 'models'}")


def _check_trainers() -> None:
    """The example's members are trained here, with torch (and scikit-learn's digits), which
    only the ``demo`` extra installs."""
    import importlib

    lacking = []
    for module in ("torch", "sklearn"):
        try:
            importlib.import_module(module)
        except ImportError:
            lacking.append(module)
    if lacking:
        raise ChorusError(
            f"training the example needs {' and '.join(lacking)}, which this install lacks: "
            "pip install 'chorus-ensembles[demo]'"
        )
