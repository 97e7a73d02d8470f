"""The ``chorus`` command line (``python -m orchestrator`` does the same): the typer app, its
commands in the order ``--help`` lists them, and :func:`main`, which reports Chorus's errors.

The commands live with their kind: :mod:`orchestrator.cli.serving` (up, regenerate-configs,
node), :mod:`orchestrator.cli.planning` (profile, plan, tune, render),
:mod:`orchestrator.cli.cascade` (calibrate) and :mod:`orchestrator.cli.examples` (demo,
example); what several of them share (the console, options, the work folder, the profile, the
calibration and the plan) is :mod:`orchestrator.cli.options`.

Exit codes: 0 success; 2 invalid input (the message names the file, the field and the problem);
3 the ensemble cannot fit the hardware; 1 anything else that went wrong; 130 and 143 a command
stopped by Ctrl-C or SIGTERM before its end (both stop what it had started, in order; a second
signal meanwhile is ignored, with a word). ``chorus up`` once serving drains on either and exits
0. What the commands write is a report: a reader that goes away (``| head -1``) loses the rest
of it, and the command goes on as it would have.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from types import FrameType
from typing import TextIO

import typer
from rich.text import Text

from orchestrator.cli import cascade, examples, planning, serving
from orchestrator.cli.options import already_stopping, console
from orchestrator.errors import ChorusError

__all__ = ["app", "main"]

app = typer.Typer(
    name="chorus",
    help="Serve ensembles of deep neural networks on NVIDIA Triton Inference Server.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# every command registered here, in the order --help lists them
app.command()(serving.up)
app.command()(planning.profile)
app.command()(planning.plan)
app.command()(cascade.calibrate)
app.command("regenerate-configs")(serving.regenerate_configs)
app.command()(serving.node)
app.command()(planning.tune)
app.command()(examples.demo)
app.command()(planning.render)
app.command()(examples.example)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is: a command unwinds as on Ctrl-C, so the
    Tritons and combiners it started are stopped in order (by default Python would end at
    once, and a Triton killed with it can leave its Python backend's stubs behind)."""


_stopping: list[int] = []  # the signal that began the unwinding


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """The first SIGINT or SIGTERM unwinds the command; any later one is ignored, since the
    unwinding stops processes and a second interruption would cut that short (Ctrl-C, then
    the SIGTERM of a `docker stop`)."""
    if not _stopping:
        _stopping.append(signum)
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    already_stopping()


class _Unread:
    """A standard stream whose reader may go away (``chorus up 2>&1 | head -1``, the terminal
    of a closed session): the first write that fails points its descriptor at /dev/null, so
    that this and every later write is dropped instead of raising where it was written. Rich
    answers a broken pipe with SystemExit(1) and click an escaping EPIPE with exit 1: either
    had stopped a deployment at its next line of output (a restart it reports, or its stop)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self._drop()

    def _drop(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        with contextlib.suppress(OSError):  # what the buffer still holds goes there too
            self._stream.flush()

    def __getattr__(self, name: str) -> object:  # isatty, fileno, encoding, ...: the stream's
        return getattr(self._stream, name)


def main() -> None:
    sys.stdout, sys.stderr = _Unread(sys.stdout), _Unread(sys.stderr)  # type: ignore[assignment]
    signal.signal(signal.SIGTERM, _interrupt)  # `chorus up`, once serving, takes both over
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (not where ignored)
        signal.signal(signal.SIGINT, _interrupt)
    try:
        app()  # click reports usage errors itself, with exit code 2
    except ChorusError as e:
        console.print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True)
        raise SystemExit(e.exit_code) from None
    except SystemExit as e:
        if _stopping == [signal.SIGTERM] and e.code == _INTERRUPTED:
            console.print("stopped by SIGTERM (what the command had started is stopped)")
            raise SystemExit(128 + signal.SIGTERM) from None
        raise


_INTERRUPTED = 130  # typer's exit code for an interrupt (128 + SIGINT)
