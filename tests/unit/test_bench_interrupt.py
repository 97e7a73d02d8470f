"""An interrupt during a measurement (Ctrl-C in ``chorus up``'s profiling) ends it with the
interrupt alone: asyncio had also logged the task it was raised in, as a traceback."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from orchestrator.measuring import bench


def test_an_interrupt_in_a_load_is_not_also_a_task_exception_in_the_log(caplog):
    async def load() -> None:
        async def worker() -> None:
            await asyncio.sleep(0)
            raise KeyboardInterrupt  # as the CLI's signal handler raises it, in a task

        await asyncio.gather(worker(), asyncio.sleep(5))

    with caplog.at_level(logging.ERROR, logger="asyncio"), pytest.raises(KeyboardInterrupt):
        bench._run(load())
    gc.collect()
    assert "never retrieved" not in caplog.text
    assert "KeyboardInterrupt" not in caplog.text
