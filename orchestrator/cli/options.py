"""What the ``chorus`` commands share: the console they report on (stderr: stdout is for what a
command prints as its result), the arguments and options several of them take, and what those
resolve to: the work folder, the profile (given, cached or measured now), the cascade (the
ensemble file's, completed by the calibration) and the plan.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Annotated, NamedTuple

import typer
from rich.console import Console

from combiner import CascadeRoute
from orchestrator.errors import SpecError
from orchestrator.planning.cascade import load_calibration, resolve_cascade
from orchestrator.planning.climb import Budget
from orchestrator.planning.hardware import Device, discover, load_hardware
from orchestrator.planning.plan import TIME_LIMIT_S, Plan, plan_ensemble
from orchestrator.planning.profile import Profile, load_profile, save_profile
from orchestrator.planning.spec import Ensemble

__all__ = [
    "BorrowOpt",
    "CalibrationOpt",
    "Cascading",
    "ConsoleThread",
    "EnsembleArg",
    "HardwareOpt",
    "ProfileOpt",
    "WorkdirOpt",
    "already_stopping",
    "console",
    "finite",
    "make_plan",
    "resolve_cascade_options",
    "resolve_profile",
    "resolve_workdir",
]

console = Console(stderr=True)


def finite(low: float, high: float) -> Callable[[str], float]:
    """The parser of a float option from ``low`` to ``high``: NaN and the infinities are
    refused by name before the range. Click's range lets NaN through (every comparison with it
    is false), typer's called a NaN past the maximum, and an infinite effort had ended in a
    traceback."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise typer.BadParameter(f"not a number: {text!r}") from None
        if not math.isfinite(value):
            raise typer.BadParameter(f"a finite number from {low:g} to {high:g}, not {text}")
        if not low <= value <= high:
            raise typer.BadParameter(f"from {low:g} to {high:g}, not {text}")
        return value

    return parse


def already_stopping() -> None:
    """Say that a signal came while stopping, and is ignored: through the console thread where
    one runs (a console nobody reads must not hold the stop up), else straight to stderr (safe
    inside a signal handler, whatever the console is printing)."""
    line = "already stopping what was started, in order: this signal is ignored\n"
    if _threads:
        _threads[-1].put(2, line)
        return
    with contextlib.suppress(OSError):  # stderr closed, or a pipe whose reader is gone
        os.write(2, line.encode())


class ConsoleThread:
    """The console of a command that must never wait for it (``chorus up``): what it prints
    (rich's console, and :meth:`put`) is queued for a thread of its own, which writes it
    straight to the descriptor, so a console nobody reads (a terminal paused with Ctrl-S, a
    stuck pipe) holds up that thread alone, never the supervision, a signal's handler or a
    stop; past ``BACKLOG`` writes waiting, more are dropped. On leaving, the queue has
    ``wait_s`` to drain; a console still stuck then is given up (stdout and stderr pointed at
    /dev/null), so that the command ends, and what it says last is dropped."""

    BACKLOG = 1024

    def __init__(self, wait_s: float = 2.0) -> None:
        self.wait_s = wait_s
        self._queue: queue.SimpleQueue[tuple[int, str] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name="console", daemon=True)
        self._file: IO[str] | None = None

    def put(self, fd: int, text: str) -> None:
        """Queue ``text`` for descriptor ``fd`` (1 or 2). Safe in a signal handler: a
        SimpleQueue's put may interrupt another in the same thread."""
        if self._queue.qsize() < self.BACKLOG:
            self._queue.put((fd, text))

    def __enter__(self) -> ConsoleThread:
        for stream in (sys.stdout, sys.stderr):  # what was printed before comes first
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        self._thread.start()
        self._file = console.file
        console.file = _Queued(self, 2, self._file)  # type: ignore[assignment]
        _threads.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            console.file = self._file
        self._queue.put(None)
        self._thread.join(self.wait_s)
        if self._thread.is_alive():  # stuck: what comes after is dropped, not waited for
            null = os.open(os.devnull, os.O_WRONLY)
            for fd in (1, 2):
                os.dup2(null, fd)
            os.close(null)
        _threads.remove(self)  # last: a signal during the wait is still said through it

    def _write(self) -> None:
        while (item := self._queue.get()) is not None:
            fd, text = item
            data = text.encode(errors="replace")
            with contextlib.suppress(OSError):  # (no reader: EPIPE, or EIO once hung up)
                while data:
                    data = data[os.write(fd, data) :]


_threads: list[ConsoleThread] = []  # the console thread in use, if any


class _Queued:
    """rich's console file while a :class:`ConsoleThread` runs: writes are queued."""

    encoding = "utf-8"

    def __init__(self, thread: ConsoleThread, fd: int, was: IO[str]) -> None:
        self._thread, self._fd, self._was = thread, fd, was

    def write(self, text: str) -> int:
        self._thread.put(self._fd, text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        with contextlib.suppress(OSError, ValueError):
            return self._was.isatty()
        return False

    def fileno(self) -> int:
        return self._fd


EnsembleArg = Annotated[Path, typer.Argument(help="the ensemble file (ensemble.yaml)")]
HardwareOpt = Annotated[
    Path | None,
    typer.Option("--hardware", help="plan for the machine(s) this file describes, not this one"),
]
ProfileOpt = Annotated[
    Path | None,
    typer.Option("--profile", help="profile file to plan from \\[default: measure, or the cache]"),
]
WorkdirOpt = Annotated[
    Path | None,
    typer.Option(
        help="where repositories, logs and the profile cache go \\[default: .chorus/NAME]"
    ),
]
BorrowOpt = Annotated[
    bool,
    typer.Option(
        "--borrow-curves",
        help="plan devices the profile has no curve for with another device's curve, "
        "scaled by the hardware file's 'speed'",
    ),
]


CalibrationOpt = Annotated[
    Path | None,
    typer.Option(
        "--calibration",
        help="the cascade's calibration (from 'chorus calibrate') "
        "\\[default: WORKDIR/calibration.json, if there is one]",
    ),
]


def resolve_workdir(ensemble: Ensemble, workdir: Path | None) -> Path:
    """The --workdir given, else ``.chorus/NAME``; absolute."""
    return (workdir or Path(".chorus") / ensemble.name).resolve()


def _devices(hardware: Path | None) -> tuple[Device, ...]:
    return load_hardware(hardware) if hardware else discover()


def resolve_profile(
    ensemble: Ensemble, profile: Path | None, workdir: Path
) -> tuple[Profile, Path]:
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


class Cascading(NamedTuple):
    """The cascade a command serves: the combiner's route (None: every member, every row),
    each member's share of the rows for the planner (None: all of them), and the calibration
    file they came from (None: none was read)."""

    route: CascadeRoute | None
    shares: dict[str, float] | None
    calibration: Path | None


def check_calibration_option(ensemble: Ensemble, calibration: Path | None) -> None:
    """A --calibration given for an ensemble without a cascade is a mistake (it was ignored,
    even a file that is not there: the operator meant some other ensemble or file)."""
    if ensemble.cascade is None and calibration is not None:
        raise SpecError(
            "--calibration",
            "",
            f"ensemble {ensemble.name!r} has no combine.cascade section, so there is nothing "
            "to calibrate; drop --calibration or add the section",
        )


def resolve_cascade_options(
    ensemble: Ensemble, calibration: Path | None, workdir: Path
) -> Cascading:
    """The ensemble file's ``combine.cascade`` completed by the calibration: the one given,
    else ``WORKDIR/calibration.json`` if there is one (an ensemble without a cascade reads
    none)."""
    check_calibration_option(ensemble, calibration)
    if ensemble.cascade is None:
        return Cascading(None, None, None)
    if calibration is None and (workdir / "calibration.json").is_file():
        calibration = workdir / "calibration.json"
    found = load_calibration(calibration) if calibration is not None else None
    if found is not None:
        console.print(
            f"using the calibration {calibration} ('chorus calibrate' makes it again)",
            markup=False,
        )
    route, shares = resolve_cascade(
        ensemble,
        found,
        calibration or "the calibration",
        say=lambda line: console.print(line, markup=False),
    )
    return Cascading(route, shares, calibration)


def make_plan(
    ensemble: Ensemble,
    hardware: Path | None,
    profile: Path | None,
    workdir: Path,
    effort: float = 1.0,
    borrow_curves: bool = False,
    shares: Mapping[str, float] | None = None,
    shares_file: Path | None = None,
    time_limit_s: float | None = TIME_LIMIT_S,
    evaluations: int | None = None,
) -> Plan:
    """The plan for the hardware file's devices (else this machine's) from :func:`resolve_profile`;
    devices the profile has no curve for are named, unless their curves are borrowed.
    ``shares``: each member's share of the rows (a cascade's, from the calibration
    ``shares_file``; None: every row reaches every member)."""
    devices = _devices(hardware)
    measured, source = resolve_profile(ensemble, profile, workdir)
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
        shares=shares,
        shares_file=shares_file or "shares",
        time_limit_s=time_limit_s,
        evaluations=evaluations,
        on_progress=_planning_progress,
        on_limit=_planning_limit,
    )


def _planning_limit(budget: Budget) -> None:
    """The search was cut short: say so, and how to search longer."""
    limits = []
    if budget.seconds is not None:
        limits.append(f"{budget.seconds:g} s")
    if budget.evaluations is not None:
        limits.append(f"{budget.evaluations:,} evaluations")
    console.print(
        f"[yellow]the search (or a part of it) stopped at its budget ({', '.join(limits)}): "
        "the plan is the best it found by then[/yellow]; 'chorus plan --time-limit S' "
        "searches longer (and 'chorus up --plan FILE' serves what it writes)"
    )


def _planning_progress(seconds: float, best: float) -> None:
    """A line a second while the search goes on (after its first second)."""
    console.print(f"planning: {seconds:.0f} s, the best plan so far {best:,.1f} samples/s")
