"""Call every member, within a deadline, and say which made it.

``fan_out`` runs one call per member, all at once (or one after another: the paper's baseline),
and waits at most ``timeout`` seconds. It returns the answers of the members that made it and,
for each that did not, why: it failed on Triton (its error), or it had not answered in time.
Calls still running at the deadline are cancelled, so a late answer is never read, never
mixed into another request, and holds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from .upstream import MemberError

__all__ = ["fan_out"]

T = TypeVar("T")


async def fan_out(
    calls: Sequence[tuple[str, Callable[[], Awaitable[T]]]],
    timeout: float | None,
    sequential: bool = False,
) -> tuple[dict[str, T], dict[str, str]]:
    """Run the named calls; return (answers by member, reasons by member that did not make it)."""
    answers: dict[str, T] = {}
    missing: dict[str, str] = {}

    async def run(name: str, call: Callable[[], Awaitable[T]]) -> None:
        try:
            answers[name] = await call()
        except MemberError as e:
            missing[name] = f"{e.code.name}: {e.details}"

    async def in_order() -> None:
        for name, call in calls:
            await run(name, call)

    if sequential:
        tasks = [asyncio.ensure_future(in_order())]
    else:
        tasks = [asyncio.ensure_future(run(name, call)) for name, call in calls]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in done:
        task.result()  # an unexpected error surfaces here, not as a lost task
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    late = f"no answer within {timeout * 1000:.0f} ms" if timeout is not None else "no answer"
    for name, _ in calls:
        if name not in answers and name not in missing:
            missing[name] = late
    return answers, missing
