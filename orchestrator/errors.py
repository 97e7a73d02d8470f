"""The orchestrator's exceptions: one tree, each class with the exit code the CLI uses.

ChorusError                 exit 1: anything the orchestrator could not do
├── SpecError               exit 2: an input file is invalid (names file, field, problem)
├── InfeasibleError         exit 3: the ensemble cannot fit the hardware
└── LaunchError             exit 1: tritonserver or the combiner did not start or died
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

__all__ = ["ChorusError", "InfeasibleError", "LaunchError", "SpecError"]


class ChorusError(Exception):
    """Base of every error the orchestrator raises on purpose."""

    exit_code = 1


class SpecError(ChorusError):
    """An ensemble, hardware or profile file is invalid.

    The message names the file, the field (as a dotted path, e.g. ``members[1].path``) and what
    is wrong; further problems found in the same file follow on their own lines.
    """

    exit_code = 2

    def __init__(
        self,
        file: Path | str,
        field: str,
        problem: str,
        more: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.file = str(file)
        self.field = field
        self.problem = problem
        lines = [_line(self.file, field, problem)]
        lines += [_line(self.file, f, p) for f, p in more]
        super().__init__("\n".join(lines))


def _line(file: str, field: str, problem: str) -> str:
    return f"{file}: {field}: {problem}" if field else f"{file}: {problem}"


def from_validation(file: Path, error: ValidationError) -> SpecError:
    """The SpecError for a pydantic error: every problem, each with its dotted field."""
    problems = []
    for err in error.errors():
        field = _loc(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; see docs for the allowed keys)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif msg.startswith("Value error, "):
            msg = msg.removeprefix("Value error, ")
        problems.append((field, msg))
    (field, msg), *more = problems
    return SpecError(file, field, msg, more)


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class InfeasibleError(ChorusError):
    """A member needs more memory than any device has free."""

    exit_code = 3


class LaunchError(ChorusError):
    """A process Chorus starts (tritonserver, the combiner) failed; carries its log tail."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        self.log_tail = log_tail
        text = message if not log_tail else f"{message}\n--- last lines of the log ---\n{log_tail}"
        super().__init__(text)
