"""Where a batch lives in shared memory: :func:`place` writes its input once into a region of
the pool of this host's Triton (each byte once, however many members read it), and makes room
after it for the outputs that pay to come back that way; :class:`Placed` says where each is.

Which outputs those are, and their bytes per row, is the calls' business
(:func:`combiner.stages.messages.placed_outputs`); the requests point at the offsets here.
"""

from __future__ import annotations

from dataclasses import dataclass

from combiner import metrics
from combiner.stages.batching import Rows
from combiner.triton.shm import Region, ShmPool

__all__ = ["Placed", "place"]


@dataclass(frozen=True)
class Placed:
    """Where a batch lives in a shared-memory region: each input's offset, and each model
    output placed there, by (model, output): (offset, bytes per row)."""

    region: Region
    inputs: dict[str, int]
    outputs: dict[tuple[str, str], tuple[int, int]]


async def place(
    pool: ShmPool, rows: Rows, outputs: dict[tuple[str, str], int], least: int | None
) -> Placed:
    """Write the batch's input into a region of ``pool``, and make room there for ``outputs``
    ((model, output) -> bytes per row) when they take at least ``least`` bytes (none when
    ``least`` is None)."""
    names = list(rows.pieces)
    size = sum(rows.nbytes(n) for n in names)
    out_size = rows.batch * sum(outputs.values())
    if least is None or out_size < least:
        outputs, out_size = {}, 0
    region = await pool.acquire(_aligned(size) + out_size)
    try:
        offsets = region.write([rows.pieces[n] for n in names])  # each byte once
    except BaseException:
        pool.release(region)
        raise
    at = _aligned(size)
    where = {}
    for key, row in outputs.items():
        where[key] = (at, row)
        at += rows.batch * row
    metrics.SHARED_BYTES.labels("input").inc(size)
    if out_size:
        metrics.SHARED_BYTES.labels("output").inc(out_size)
    return Placed(region, dict(zip(names, offsets, strict=True)), where)


def _aligned(size: int) -> int:
    return (size + 63) // 64 * 64
