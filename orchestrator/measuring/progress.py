"""What a profile is doing while it runs, on stderr: no wait of more than a moment without a
word. A profile takes minutes and much of it is waiting (a Triton starting, a model loading, a
deployment serving a window of load), so every step says what it waits for and for how long.

On a terminal it is a rich progress display, as ``chorus tune`` shows: a line per step under
way, with a spinner, the step, a bar of the steps of its phase and the time elapsed, redrawn
ten times a second and gone when the profile ends. Elsewhere (a log, a pipe, a container) it is
a line per step, stamped with the profile's elapsed time, and another every few seconds while
the step still runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

__all__ = ["Phase", "ProfileProgress"]


class _Count(MofNCompleteColumn):
    """Steps done of the phase's; nothing for a single step."""

    def render(self, task: Task) -> Text:
        return Text("") if task.total is None else super().render(task)


class ProfileProgress:
    """The progress of one profile; a context manager around all of it. ``show`` False says
    nothing (tests); ``heartbeat_s``: how long a step runs before a line says it still does,
    where there is no terminal."""

    def __init__(
        self, show: bool = True, console: Console | None = None, heartbeat_s: float = 2.5
    ) -> None:
        self.console = console or Console(stderr=True)
        self.live = show and self.console.is_terminal and not self.console.is_dumb_terminal
        self.lines = show and not self.live
        self.heartbeat_s = heartbeat_s
        self._rich = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            _Count(),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.live,
            transient=True,
        )
        self._start = time.monotonic()
        self._lock = threading.Lock()
        self._doing: list[tuple[str, float]] = []  # steps under way, innermost last
        self._said = self._start  # when the last line was written
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> ProfileProgress:
        self._start = self._said = time.monotonic()
        self._rich.start()
        if self.lines:
            self._beat = threading.Thread(target=self._heartbeat, name="progress", daemon=True)
            self._beat.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        self._rich.stop()

    @contextmanager
    def doing(self, description: str) -> Iterator[None]:
        """One step on its own: its line lasts while it runs."""
        task = self._rich.add_task(description, total=None)
        try:
            with self._under_way(description):
                yield
        finally:
            self._rich.remove_task(task)

    @contextmanager
    def phase(self, description: str, steps: int) -> Iterator[Phase]:
        """A phase of ``steps`` steps, each run under :meth:`Phase.step`: one line, its bar."""
        task = self._rich.add_task(description, total=steps)
        try:
            yield Phase(self._rich, task, description, steps, self._under_way)
        finally:
            self._rich.remove_task(task)

    @contextmanager
    def _under_way(self, line: str) -> Iterator[None]:
        """A step that runs meanwhile: said where there is no terminal, and said again while
        it lasts."""
        with self._lock:
            self._doing.append((line, time.monotonic()))
            self._say(line)
        try:
            yield
        finally:
            with self._lock:
                self._doing.pop()

    def _say(self, text: str) -> None:
        """A line, where there is no terminal (the lock held)."""
        self._said = time.monotonic()
        if self.lines:
            stamp = f"[{self._said - self._start:6.1f} s]"
            self.console.print(f"{stamp} {text}", markup=False, highlight=False, soft_wrap=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(0.25, self.heartbeat_s / 5)):
            with self._lock:
                now = time.monotonic()
                if self._doing and now - self._said >= self.heartbeat_s:
                    line, since = self._doing[-1]
                    self._say(f"{line}: {now - since:.1f} s so far")


class Phase:
    """The steps of one phase (:meth:`ProfileProgress.phase`)."""

    def __init__(
        self,
        display: Progress,
        task: TaskID,
        name: str,
        steps: int,
        under_way: Callable[[str], AbstractContextManager[None]],
    ) -> None:
        self._display = display
        self._task = task
        self._name = name
        self._steps = steps
        self._under_way = under_way
        self._done = 0

    @contextmanager
    def step(self, description: str) -> Iterator[None]:
        """One step of the phase, counted done when it ends."""
        self._display.update(self._task, description=f"{self._name}: {description}")
        try:
            with self._under_way(f"{self._name}: {description} ({self._done + 1}/{self._steps})"):
                yield
        finally:
            self._done += 1
            self._display.advance(self._task)
