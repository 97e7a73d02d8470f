"""``chorus calibrate``: choose an ensemble's cascade (its tiers and threshold) on validation
inputs, and write it to the calibration file that ``chorus plan`` and ``chorus up`` read.

The members answer the inputs on a real Triton (:mod:`orchestrator.measuring.calibrate`); their
costs come from the profile (given, cached or measured now, as for ``chorus plan``); the
candidates are simulated and chosen by :mod:`orchestrator.planning.cascade`. The inputs and
labels are checked against the ensemble before anything starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from tritonclient.utils import triton_to_np_dtype

from combiner import load_rule
from orchestrator.cli.options import (
    EnsembleArg,
    ProfileOpt,
    WorkdirOpt,
    console,
    resolve_profile,
    resolve_workdir,
)
from orchestrator.errors import SpecError
from orchestrator.planning.cascade import (
    Candidate,
    Combining,
    calibration,
    candidates,
    choose,
    ensemble_accuracy,
    frontier,
    member_costs,
    save_calibration,
)
from orchestrator.planning.hardware import discover
from orchestrator.planning.spec import Cascade, Ensemble, Tensor, load_ensemble

__all__ = ["calibrate", "read_inputs", "read_labels"]

SHOWN = 10  # candidates in the table, besides the chosen one


def calibrate(
    ensemble_file: EnsembleArg,
    inputs: Annotated[
        Path,
        typer.Option(
            "--inputs",
            help="validation inputs: an .npy of rows for the ensemble's input, or an .npz "
            "with one array per input name",
        ),
    ],
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="the true class of each row (.npy of integers): judge cascades by accuracy",
        ),
    ] = None,
    fidelity: Annotated[
        float,
        typer.Option(
            help="the share of rows whose answer must be the full ensemble's (with labels: "
            "the accuracy lost at most 1 - this)"
        ),
    ] = 0.995,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="\\[default: WORKDIR/calibration.json]"),
    ] = None,
    profile: ProfileOpt = None,
    workdir: WorkdirOpt = None,
) -> None:
    """Choose the cascade's tiers and threshold: the cheapest whose answers match the full
    ensemble's on --fidelity of the validation rows. Exits 1 when none does (the file then
    says to serve the full ensemble)."""
    if not 0 < fidelity <= 1:
        raise SpecError("--fidelity", "", f"must be in (0, 1], got {fidelity:g}")
    ensemble = load_ensemble(ensemble_file)
    cascade = _cascade_of(ensemble)
    rows = read_inputs(ensemble, inputs)
    count = len(next(iter(rows.values())))
    if count < _FEW_ROWS:
        console.print(
            f"[yellow]only {count} validation rows: a share of them is a coarse measure (one "
            f"row is {1 / count:.1%}); a few hundred give a calibration to rely on[/yellow]"
        )
    truth = None if labels is None else read_labels(ensemble, labels, count, cascade.output)
    workdir = resolve_workdir(ensemble, workdir)
    measured, _ = resolve_profile(ensemble, profile, workdir)
    names = [m.name for m in ensemble.members]
    costs = member_costs(measured, names, discover())

    from orchestrator.measuring.calibrate import member_outputs

    outputs = member_outputs(ensemble, rows, cascade.output, workdir / "calibrate")
    if labels is not None and truth is not None:
        _check_label_shape(labels, truth, outputs[names[0]])
    combining = Combining(
        rule=load_rule(ensemble.rule, [str(ensemble.file.parent)]),
        weights={m.name: m.weight for m in ensemble.members},
        softmax=ensemble.softmax,
        exit=cascade.exit,
    )
    found = candidates(outputs, costs, combining, cascade.tiers, cascade.threshold, truth)
    full = None if truth is None else ensemble_accuracy(outputs, combining, truth)
    chosen = choose(found, fidelity, full)
    Console().print(_table(ensemble, found, chosen, full is not None))
    output = output or workdir / "calibration.json"
    save_calibration(calibration(ensemble, chosen, found, fidelity, count, full), output)
    if chosen is None:
        console.print(_none_met(found, fidelity, full, output), style="bold red", markup=False)
        raise typer.Exit(1)
    console.print(
        f"chosen: {_tiers(chosen)} at {cascade.exit} >= {chosen.threshold:.4g}: "
        f"{chosen.answered[0]:.1%} of the rows answered by the first tier, fidelity "
        f"{chosen.fidelity:.2%}, cost {chosen.cost:.1%} of the full ensemble's; wrote {output}",
        markup=False,
    )


_FEW_ROWS = 100  # fewer validation rows than this: a warning


def _none_met(found: list[Candidate], fidelity: float, full: float | None, output: Path) -> str:
    """What to say when no cascade meets the target: how near the best came."""
    if full is None:
        best = max((c.fidelity for c in found), default=0.0)
        short = f"no cascade reaches the fidelity {fidelity:g}: the best reaches {best:.2%}"
    else:
        best = max((c.accuracy or 0.0 for c in found), default=0.0)
        short = (
            f"no cascade keeps its accuracy within {1 - fidelity:.2%} of the full ensemble's "
            f"({full:.2%}): the best reaches {best:.2%}"
        )
    return (
        f"{short}. The full ensemble is kept: wrote {output} with tiers null. Lower "
        "--fidelity, or set other tiers."
    )


def _cascade_of(ensemble: Ensemble) -> Cascade:
    if ensemble.cascade is None:
        raise SpecError(
            ensemble.file,
            "combine.cascade",
            "the ensemble has no cascade to calibrate: add one under 'combine:', e.g.\n"
            "  cascade:\n    exit: agreement    # or confidence\n"
            "(its tiers and threshold are then chosen here)",
        )
    return ensemble.cascade


def read_inputs(ensemble: Ensemble, path: Path) -> dict[str, np.ndarray]:
    """The validation rows, input name -> ``(rows, ...)``: an ``.npy`` for an ensemble of one
    input, else an ``.npz`` holding one array per input name; each checked against the
    ensemble's input (its dtype exactly: a silent cast could change the answers)."""
    arrays = _load(path)
    names = [t.name for t in ensemble.inputs]
    if isinstance(arrays, np.ndarray):
        if len(names) != 1:
            raise SpecError(
                path,
                "",
                f"the ensemble has {len(names)} inputs ({', '.join(names)}): give them as an "
                f".npz with one array per input name (numpy.savez(file, {names[0]}=...))",
            )
        arrays = {names[0]: arrays}
    missing = [n for n in names if n not in arrays]
    extra = [n for n in arrays if n not in names]
    if missing or extra:
        raise SpecError(
            path,
            "",
            f"holds arrays {', '.join(arrays) or 'none'}; the ensemble's inputs are "
            f"{', '.join(names)}",
        )
    checked = {t.name: _check_input(path, t, arrays[t.name]) for t in ensemble.inputs}
    counts = {name: len(a) for name, a in checked.items()}
    if len(set(counts.values())) != 1:
        raise SpecError(path, "", f"the inputs have different numbers of rows: {counts}")
    return checked


def _load(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise SpecError(path, "", "no such file") from None
    except (ValueError, OSError) as e:
        raise SpecError(path, "", f"not a numpy .npy or .npz file of numbers: {e}") from None
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        return {name: loaded[name] for name in loaded.files}


def _check_input(path: Path, tensor: Tensor, data: np.ndarray) -> np.ndarray:
    want = np.dtype(triton_to_np_dtype(tensor.dtype))
    if data.dtype != want:
        raise SpecError(
            path,
            tensor.name,
            f"is {data.dtype}; the ensemble's input {tensor.name!r} is {tensor.dtype}: save it "
            f"as {want} (array.astype('{want}'))",
        )
    shape = list(tensor.shape)
    rows_of = data.shape[1:]
    if len(rows_of) != len(shape) or any(
        d > 0 and d != g for d, g in zip(shape, rows_of, strict=True)
    ):
        raise SpecError(
            path,
            tensor.name,
            f"holds shape {list(data.shape)}; the ensemble's input {tensor.name!r} takes rows "
            f"of shape {shape} (-1: any), as (rows, {', '.join(map(str, shape))})",
        )
    if len(data) == 0:
        raise SpecError(path, tensor.name, "holds no rows")
    if data.dtype.kind in "fc":  # the endpoint refuses such rows: they say nothing of serving
        bad = np.flatnonzero(~np.isfinite(data.reshape(len(data), -1)).all(axis=1))
        if len(bad):
            shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
            raise SpecError(
                path, tensor.name, f"holds NaN or infinity in {len(bad)} row(s): {shown}"
            )
    return data


def read_labels(ensemble: Ensemble, path: Path, rows: int, output: str) -> np.ndarray:
    """The true class of each validation row (and position, for an output with positions):
    integers, one per row."""
    labels = _load(path)
    if not isinstance(labels, np.ndarray):
        raise SpecError(path, "", "labels are one .npy array of integers, not an .npz")
    if not np.issubdtype(labels.dtype, np.integer):
        raise SpecError(path, "", f"labels are class indices (integers), not {labels.dtype}")
    if len(labels) != rows:
        raise SpecError(path, "", f"holds {len(labels)} labels for {rows} input rows")
    tensor = next(t for t in ensemble.outputs if t.name == output)
    positions, classes = tensor.shape[:-1], tensor.shape[-1]
    if labels.ndim != 1 + len(positions):
        raise SpecError(
            path,
            "",
            f"holds shape {list(labels.shape)}; output {output!r} has shape "
            f"{list(tensor.shape)}: a label per row"
            + (" and position" if positions else "")
            + f", shape (rows{''.join(f', {d}' for d in positions)})",
        )
    if labels.size and (labels.min() < 0 or (classes > 0 and labels.max() >= classes)):
        raise SpecError(
            path,
            "",
            f"labels run from {labels.min()} to {labels.max()}; output {output!r} has "
            f"{classes if classes > 0 else 'its'} classes, numbered from 0",
        )
    return labels


def _check_label_shape(path: Path, labels: np.ndarray, answers: np.ndarray) -> None:
    """The labels' positions against those the members answered (a variable axis)."""
    if labels.shape != answers.shape[:-1]:
        raise SpecError(
            path,
            "",
            f"holds shape {list(labels.shape)}; the members answered "
            f"{list(answers.shape)}: the labels need shape {list(answers.shape[:-1])}",
        )


def _table(
    ensemble: Ensemble, found: list[Candidate], chosen: Candidate | None, with_labels: bool
) -> Table:
    """The candidates worth seeing: those no other beats on both cost and fidelity, around the
    chosen one (else the best), and the chosen one."""
    best = frontier(found)
    at = best.index(chosen) if chosen in best else len(best) - 1
    start = max(0, min(at - SHOWN // 2, len(best) - SHOWN))
    shown = best[start : start + SHOWN]
    if chosen is not None and chosen not in shown:
        shown.append(chosen)
    title = (
        f"cascades of {ensemble.name!r}: {len(found)} simulated, the {len(shown)} "
        "not beaten on both cost and fidelity"
    )
    table = Table(title=title)
    for column in ("", "tiers", "threshold", "answered per tier", "fidelity"):
        table.add_column(column, justify="right" if column in ("threshold", "fidelity") else "left")
    if with_labels:
        table.add_column("accuracy", justify="right")
    table.add_column("cost", justify="right")
    for c in shown:
        accuracy = [f"{c.accuracy:.2%}" if c.accuracy is not None else ""] if with_labels else []
        table.add_row(
            "chosen" if c is chosen else "",
            _tiers(c),
            f"{c.threshold:.4g}",
            " / ".join(f"{share:.1%}" for share in c.answered),
            f"{c.fidelity:.2%}",
            *accuracy,
            f"{c.cost:.1%}",
            style="bold green" if c is chosen else None,
        )
    return table


def _tiers(c: Candidate) -> str:
    """``mlp, mlp_bagged -> cnn, wide_cnn`` (no brackets: rich would read them as markup)."""
    return " -> ".join(", ".join(tier) for tier in c.tiers)
