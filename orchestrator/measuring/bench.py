"""Closed-loop load: ``concurrency`` clients, each sending its next request when the last one
is answered, for a fixed time. Used by the demo, ``chorus tune`` and the benchmarks.

Inputs are drawn from a given array, row-window by row-window, so every request carries real
data; the throughput is counted in samples (rows) per second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import triton_to_np_dtype

from combiner.sdk import AsyncEnsembleClient
from orchestrator.planning.spec import Tensor

__all__ = ["Load", "closed_loop", "ensemble_load", "member_load", "random_rows"]

T = TypeVar("T")


def random_rows(tensor: Tensor, rows: int, seed: int = 0) -> np.ndarray:
    """``rows`` rows of uniform random input for ``tensor`` (variable dimensions as 1)."""
    shape = (rows, *(d if d > 0 else 1 for d in tensor.shape))
    return np.random.default_rng(seed).random(shape).astype(triton_to_np_dtype(tensor.dtype))


@dataclass(frozen=True)
class Load:
    batch: int
    concurrency: int
    seconds: float
    requests: int
    samples_per_s: float
    p50_ms: float
    p99_ms: float


async def closed_loop(
    call: Callable[[np.ndarray], Awaitable[object]],
    x: np.ndarray,
    batch: int,
    concurrency: int,
    seconds: float,
    warmup_s: float = 0.3,
) -> Load:
    """Drive ``call`` (one request of ``batch`` rows of ``x``) from ``concurrency`` workers."""
    latencies: list[float] = []
    windows = max(1, len(x) - batch + 1)
    start_at = time.perf_counter() + warmup_s
    end_at = start_at + seconds

    async def worker(k: int) -> None:
        i = k * batch
        while True:
            now = time.perf_counter()
            if now >= end_at:
                return
            rows = x[i % windows : i % windows + batch]
            await call(rows)
            if now >= start_at:
                latencies.append((time.perf_counter() - now) * 1000.0)
            i += batch * concurrency

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (0.0, 0.0)
    return Load(
        batch,
        concurrency,
        seconds,
        len(latencies),
        len(latencies) * batch / seconds,
        float(p50),
        float(p99),
    )


def _run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, but an interrupt (Ctrl-C, SIGTERM: the CLI raises KeyboardInterrupt in
    whatever runs) is not also a traceback: the task it was raised in ends with it, and asyncio
    logged that task's exception as never retrieved."""

    async def quietly() -> T:
        asyncio.get_running_loop().set_exception_handler(_unless_interrupt)
        return await main

    return asyncio.run(quietly())


def _unless_interrupt(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    if not isinstance(context.get("exception"), KeyboardInterrupt):
        loop.default_exception_handler(context)


def ensemble_load(url: str, x: np.ndarray, batch: int, concurrency: int, seconds: float) -> Load:
    """Closed-loop load on an ensemble endpoint, through the client SDK."""

    async def go() -> Load:
        async with AsyncEnsembleClient(url) as client:
            await client.metadata()
            return await closed_loop(client.predict, x, batch, concurrency, seconds)

    return _run(go())


def member_load(
    url: str,
    model: str,
    input_name: str,
    x: np.ndarray,
    batch: int,
    concurrency: int,
    seconds: float,
    headers: Mapping[str, str] | None = None,
) -> Load:
    """Closed-loop load on one model on Triton, directly (``headers``: Chorus's key to its
    restricted APIs)."""

    async def go() -> Load:
        client = aioclient.InferenceServerClient(url)
        try:

            async def call(rows: np.ndarray) -> object:
                tensor = aioclient.InferInput(input_name, list(rows.shape), "FP32")
                tensor.set_data_from_numpy(np.ascontiguousarray(rows))
                return await client.infer(model, [tensor], headers=dict(headers or {}))

            return await closed_loop(call, x, batch, concurrency, seconds)
        finally:
            await client.close()

    return _run(go())
