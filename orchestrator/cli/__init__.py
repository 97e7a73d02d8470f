"""The ``chorus`` command line (``python -m orchestrator`` does the same): the typer app, its
commands in the order ``--help`` lists them, and :func:`main`, which reports Chorus's errors.

The commands live with their kind: :mod:`orchestrator.cli.serving` (up, regenerate-configs,
node), :mod:`orchestrator.cli.planning` (profile, plan, tune, render),
:mod:`orchestrator.cli.cascade` (calibrate) and :mod:`orchestrator.cli.examples` (demo,
example); what several of them share (the console, options, the work folder, the profile, the
calibration and the plan) is :mod:`orchestrator.cli.options`.

Exit codes: 0 success; 2 invalid input (the message names the file, the field and the problem);
3 the ensemble cannot fit the hardware; 1 anything else that went wrong (output that cannot be
written included); 130, 143 and 129 a command stopped by Ctrl-C, SIGTERM or SIGHUP before its
end (each stops what it had started, in order; a second signal meanwhile is ignored, with a
word). ``chorus up`` once serving drains on any of them and exits 0. What the commands write is
a report: a reader that goes away (``| head -1``, a closed terminal) loses the rest of it, and
the command goes on as it would have.
"""

from __future__ import annotations

import contextlib
import errno
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
    """SIGTERM or SIGHUP (the terminal closed), raised where the main thread is: a command
    unwinds as on Ctrl-C, so the Tritons and combiners it started are stopped in order (by
    default Python would end at once, and a Triton killed with it can leave its Python
    backend's stubs behind)."""


_stopping: list[int] = []  # the signal that began the unwinding


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """The first SIGINT, SIGTERM or SIGHUP unwinds the command; any later one is ignored, since the
    unwinding stops processes and a second interruption would cut that short (Ctrl-C, then
    the SIGTERM of a `docker stop`)."""
    if not _stopping:
        _stopping.append(signum)
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated
    already_stopping()


class _Unread:
    """A standard stream whose reader may go away (``chorus up 2>&1 | head -1``, the terminal
    of a closed session): the first write that finds no reader (EPIPE; EIO on a terminal that
    hung up) points its descriptor at /dev/null, so that this and every later write is dropped
    instead of raising where it was written. Rich answers a broken pipe with SystemExit(1) and
    click an escaping EPIPE with exit 1: either had stopped a deployment at its next line of
    output (a restart it reports, or its stop). Any other failure of stdout (a full disk under
    ``--json > plan.json``) is an error, exit 1: the output is not what the command made; of
    stderr, which holds only the report, it is dropped too (a full disk under ``2> log`` must
    not stop a plan or a deployment)."""

    def __init__(self, stream: TextIO, name: str) -> None:
        self._stream = stream
        self._name = name
        try:
            self._tty = os.isatty(stream.fileno())
        except (OSError, ValueError):
            self._tty = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            self._failed(e)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            self._failed(e)

    def _failed(self, e: OSError) -> None:
        gone = e.errno == errno.EPIPE or (e.errno == errno.EIO and self._tty)
        if not gone and self._name == "stdout":
            raise ChorusError(f"cannot write to {self._name}: {e.strerror or e}") from None
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        with contextlib.suppress(OSError):  # what the buffer still holds goes there too
            self._stream.flush()

    def __getattr__(self, name: str) -> object:  # isatty, fileno, encoding, ...: the stream's
        return getattr(self._stream, name)


def _streams() -> None:
    """Standard descriptors that were closed at start (``chorus up >&-``) are pointed at
    /dev/null, as a daemon's are: else the next file opened would take descriptor 1 or 2 and
    get what is written there; then stdout and stderr are wrapped as :class:`_Unread`."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdout is None:  # (Python leaves a stream None where its descriptor was closed)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the process's own stdout
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    sys.stdout = _Unread(sys.stdout, "stdout")  # type: ignore[assignment]
    sys.stderr = _Unread(sys.stderr, "stderr")  # type: ignore[assignment]


def main() -> None:
    _streams()
    signal.signal(signal.SIGTERM, _interrupt)  # `chorus up`, once serving, takes all over
    for sig in (signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # (kept where ignored: nohup, `cmd &`)
            signal.signal(sig, _interrupt)
    try:
        try:
            app()  # click reports usage errors itself, with exit code 2
        finally:  # here, not at exit: a failed write is an error with a word, not exit 120
            sys.stdout.flush()
            sys.stderr.flush()
    except ChorusError as e:
        console.print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True)
        raise SystemExit(e.exit_code) from None
    except OSError as e:
        if e.errno not in _THE_HOSTS or e.filename is None:  # (without a path: a bug's)
            raise
        where = " ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        said = f"{e.strerror}" + (f": {where}" if where else "")
        console.print(Text.assemble(("error: ", "bold red"), said), soft_wrap=True)
        raise SystemExit(1) from None
    except SystemExit as e:
        if _stopping and _stopping[0] != signal.SIGINT and e.code == _INTERRUPTED:
            name = signal.Signals(_stopping[0]).name
            console.print(f"stopped by {name} (what the command had started is stopped)")
            raise SystemExit(128 + _stopping[0]) from None
        raise


# what the host refused (its disk, its permissions): the message is the whole story
_THE_HOSTS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
_INTERRUPTED = 130  # typer's exit code for an interrupt (128 + SIGINT)
