"""Work that outlives the request that started it: a call on Triton is never cancelled.

The bundled Triton (2.51) can crash when a gRPC call is cancelled as it completes (server
issues #7368, #8034). So no call on Triton belongs to a client's request: it belongs to an
:class:`Owner` that keeps it until it ends. A request only *waits* for such a task (through
``asyncio.shield``), and a request that gives up (its deadline, its client gone) stops its own
wait and nothing else. The owner awaits what is left when the process stops (:meth:`drain`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["Owner"]

log = logging.getLogger("chorus.combiner")
T = TypeVar("T")


class Owner:
    """Keeps a strong reference to each task it spawns until the task ends (a grpc.aio call
    that is garbage-collected unfinished is cancelled). A task handles its own errors."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)

    def __len__(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every task to end; whether they all did."""
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        if pending:
            log.warning(
                "%d %s task(s) still running after %.1f s", len(pending), self.name, timeout
            )
        return not pending

    async def cancel(self) -> None:
        """Cancel what is left: only when the process stops, after :meth:`drain`."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
