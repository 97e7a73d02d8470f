"""One copy of the input: system shared-memory regions registered with a Triton on this host.

Each batch's input bytes are written once into a region of a pool, and every member's request
points at them (offset and size) instead of carrying them. Regions are reused across batches
and a larger one is made when a batch does not fit. They are named ``chorus_<pid>_<n>`` (the
POSIX key is ``/chorus_<pid>_<n>``), so that those of a process that died without cleaning up
(``kill -9``) can be told apart: :func:`reclaim_stale` unregisters them from Triton and unlinks
them at the next start. A clean stop unregisters and unlinks every region of the pool.

Clients on this host may put their own inputs and outputs in shared memory too
(:class:`ClientRegions`): the combiner maps their regions and reads and writes them in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2

from .errors import RequestError
from .upstream import Upstream

__all__ = ["ClientRegion", "ClientRegions", "Region", "ShmPool", "reclaim_stale"]

log = logging.getLogger("chorus.combiner.shm")
_PREFIX = "chorus_"
_NAME = re.compile(r"^chorus_(\d+)_\d+$")
_MIN_SIZE = 1 << 16


@dataclass
class Region:
    name: str
    size: int
    handle: shm.SharedMemoryRegion

    def write(self, tensors: list[tuple[bytes | memoryview, ...]]) -> list[int]:
        """Write each tensor (given in pieces, e.g. one per batched request) one after another
        from offset 0, each byte once; returns the offset of each tensor."""
        offsets, offset = [], 0
        arrays = []
        for pieces in tensors:
            offsets.append(offset)
            for piece in pieces:
                arrays.append(np.frombuffer(piece, dtype=np.uint8))
                offset += len(piece)
        shm.set_shared_memory_region(self.handle, arrays)
        return offsets

    def read(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A view of what a member wrote at ``offset``; valid until the region is reused."""
        array: np.ndarray = shm.get_contents_as_numpy(self.handle, dtype, shape, offset)
        return array


class ShmPool:
    """Regions of this process, registered with Triton, lent out one batch at a time."""

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream
        self._free: list[Region] = []
        self._all: list[Region] = []
        self._count = 0
        self._lock = asyncio.Lock()

    async def acquire(self, size: int) -> Region:
        async with self._lock:
            fitting = [r for r in self._free if r.size >= size]
            if fitting:
                region = min(fitting, key=lambda r: r.size)
                self._free.remove(region)
                return region
            region_size = max(_MIN_SIZE, 1 << (size - 1).bit_length())
            name = f"{_PREFIX}{os.getpid()}_{self._count}"
            self._count += 1
            handle = shm.create_shared_memory_region(name, "/" + name, region_size)
            region = Region(name, region_size, handle)
            try:
                await self._upstream.register_shm(name, "/" + name, region_size)
            except BaseException:
                shm.destroy_shared_memory_region(handle)
                raise
            self._all.append(region)
            return region

    def release(self, region: Region) -> None:
        self._free.append(region)

    async def close(self) -> None:
        """Unregister every region from Triton and unlink it."""
        for region in self._all:
            try:
                await self._upstream.unregister_shm(region.name)
            except Exception as e:  # Triton may be gone already: still unlink
                log.warning("could not unregister %s from Triton: %s", region.name, e)
            shm.destroy_shared_memory_region(region.handle)
        self._all.clear()
        self._free.clear()


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def reclaim_stale(upstream: Upstream, shm_dir: Path = Path("/dev/shm")) -> list[str]:
    """Unregister from Triton and unlink the regions of Chorus processes that are gone."""
    reclaimed = []
    status: service_pb2.SystemSharedMemoryStatusResponse = await upstream.shm_status()
    for name in status.regions:
        match = _NAME.match(name)
        if match and not _alive(int(match.group(1))):
            await upstream.unregister_shm(name)
            reclaimed.append(name)
    for path in shm_dir.glob(f"{_PREFIX}*"):
        match = _NAME.match(path.name)
        if match and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            if path.name not in reclaimed:
                reclaimed.append(path.name)
    if reclaimed:
        log.info("reclaimed shared memory left by stopped processes: %s", ", ".join(reclaimed))
    return reclaimed


@dataclass
class ClientRegion:
    """A system shared-memory region a client made and registered with the combiner."""

    name: str
    key: str
    offset: int
    byte_size: int
    memory: mmap.mmap

    def view(self, offset: int, size: int, what: str) -> memoryview:
        """``size`` bytes at ``offset`` (from the registered start), without copying."""
        if offset < 0 or size < 0 or offset + size > self.byte_size:
            raise _invalid(
                f"{what}: {size} bytes at offset {offset} do not fit shared-memory region "
                f"{self.name!r} of {self.byte_size} bytes"
            )
        start = self.offset + offset
        return memoryview(self.memory)[start : start + size]


class ClientRegions:
    """The regions clients registered with this combiner process (KServe's system
    shared-memory extension). Each is mapped once here; a request's input in one is read in
    place, and an output asked there is written there, neither through the request."""

    def __init__(self, shm_dir: Path = Path("/dev/shm")) -> None:
        self._dir = shm_dir
        self._regions: dict[str, ClientRegion] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise _invalid("a shared-memory region needs a name")
        if name in self._regions:
            raise RequestError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"shared-memory region {name!r} is already registered; unregister it first",
            )
        path = self._dir / key.lstrip("/")
        if "/" in key.lstrip("/") or not key.lstrip("/"):
            raise _invalid(f"shared-memory key {key!r} is not a POSIX shared-memory name")
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise _invalid(f"no shared-memory region with key {key!r} on this host") from None
        try:
            size = os.fstat(fd).st_size
            if offset < 0 or byte_size <= 0 or offset + byte_size > size:
                raise _invalid(
                    f"region {name!r}: offset {offset} + byte_size {byte_size} exceed the "
                    f"{size} bytes of {key!r}"
                )
            memory = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._regions[name] = ClientRegion(name, key, offset, byte_size, memory)

    def unregister(self, name: str | None = None) -> None:
        """Forget one region (``name``) or all; unknown names are fine, as on Triton."""
        for region_name in [name] if name else list(self._regions):
            region = self._regions.pop(region_name, None)
            if region is not None:
                with contextlib.suppress(BufferError):  # a request still reads it: GC closes
                    region.memory.close()

    def get(self, name: str) -> ClientRegion:
        region = self._regions.get(name)
        if region is None:
            raise _invalid(
                f"unknown shared-memory region {name!r}; register it with this endpoint first"
            )
        return region

    def status(self, name: str | None = None) -> list[ClientRegion]:
        if name:
            return [self.get(name)]
        return list(self._regions.values())


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)
