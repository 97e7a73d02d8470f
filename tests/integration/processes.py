"""The processes Chorus started, seen from outside (psutil)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import psutil

__all__ = ["alive", "command_name", "descendants", "end_all", "held"]


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def command_name(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return "?"


def held(pid: int) -> list[psutil.Process]:
    """Every live process below ``pid``, held: unlike its pid, which may be given again once it
    ends (sooner where a test chose the next pid), one names that process only."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def end_all(processes: Iterable[psutil.Process]) -> None:
    """SIGKILL (after SIGCONT: it may be stopped) those of ``processes`` still running; psutil
    signals nothing whose pid is another process's by now."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.resume()
            process.kill()
