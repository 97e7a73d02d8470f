"""One copy of the input: system shared-memory regions registered with a Triton on this host.

Each batch's input bytes are written once into a region of a pool, and every member's request
points at them (offset and size) instead of carrying them. Regions are reused across batches
and a larger one is made when a batch does not fit. A region goes back to the pool only when
every call that may read or write it has ended (:meth:`ShmPool.hold` / :meth:`ShmPool.release`
count them): a call left to finish past a deadline may still write its outputs there.

They are named ``chorus_<pid>_<token>_<n>`` (the POSIX key is ``/<name>``): ``token`` is the
pool's :class:`PoolOwner`, random, and alive exactly while the lock file
``chorus-owner-<token>.lock`` beside the regions is locked (``flock``), which the kernel ends
when the process dies, however it dies. A pid cannot say that: a combiner restarted in a fresh
PID namespace (a container) gets the dead worker's pid, and a live owner in another namespace
has a pid this one cannot see. The pid stays in the name for the people reading ``/dev/shm``.
The regions of an owner that is gone are stale: :func:`reclaim_stale` unregisters them from
Triton and unlinks them at the next start, skipping (with a warning) what it may not remove;
names of the older form ``chorus_<pid>_<n>`` are stale when no process has that pid. A clean
stop unregisters and unlinks every region of the pool, and its lock file. After Triton restarts,
:meth:`ShmPool.register_missing` registers the pool's regions with it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2

from combiner.triton.upstream import MemberError, Upstream

__all__ = ["POOL_NAME", "PoolOwner", "Region", "ShmPool", "reclaim_stale", "unlink_stale"]

log = logging.getLogger("chorus.combiner.shm")
_PREFIX = "chorus_"
# A combiner's own region, never a client's: pid, owner token (absent in the older form), n.
POOL_NAME = re.compile(r"^chorus_(\d{1,10})_(?:([0-9a-f]{16})_)?\d+$")
_LOCK = "chorus-owner-{token}.lock"  # not chorus_*: no region, and no client's key
_LOCK_NAME = re.compile(r"^chorus-owner-([0-9a-f]{16})\.lock$")
_SHM_DIR = Path("/dev/shm")
_MIN_SIZE = 1 << 16


class PoolOwner:
    """A pool's claim on the names of its regions: a random token, and a lock file named for
    it in the shared-memory folder, created and locked (``flock``) here and held until
    :meth:`release` or the process's death; anyone who shares the folder can tell whether the
    owner lives (:func:`_gone`), whatever PID namespace either runs in."""

    def __init__(self, shm_dir: Path = _SHM_DIR) -> None:
        self.pid = os.getpid()
        while True:
            self.token = secrets.token_hex(8)
            self._path = shm_dir / _LOCK.format(token=self.token)
            fd = os.open(self._path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits out a reclaimer that found it unlocked
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self._path).st_ino == os.fstat(fd).st_ino:
                    break  # still ours: nobody took it for a dead owner's in between
            os.close(fd)
        self._fd = fd
        self.prefix = f"{_PREFIX}{self.pid}_{self.token}_"

    def release(self) -> None:
        """Give up the claim: the lock file goes, and names with this token are stale."""
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        os.close(self._fd)


@dataclass(eq=False)
class Region:
    name: str
    size: int
    handle: shm.SharedMemoryRegion
    holds: int = 0  # calls (and the batch being written) that still use it

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
        """A copy of what a member wrote at ``offset``."""
        view = shm.get_contents_as_numpy(self.handle, dtype, shape, offset)
        return np.array(view)


class ShmPool:
    """Regions of this process, registered with Triton, lent out one batch at a time."""

    def __init__(self, upstream: Upstream, shm_dir: Path = _SHM_DIR) -> None:
        """``shm_dir``: where the owner's lock file goes, the folder of the POSIX
        shared-memory keys (where tritonclient creates the regions)."""
        self._upstream = upstream
        self._shm_dir = shm_dir
        self._owner: PoolOwner | None = None  # made with the first region
        self._free: list[Region] = []
        self._all: list[Region] = []
        self._count = 0
        self._lock = asyncio.Lock()

    async def acquire(self, size: int) -> Region:
        """A region of at least ``size`` bytes, held once by the caller."""
        async with self._lock:
            fitting = [r for r in self._free if r.size >= size]
            if fitting:
                region = min(fitting, key=lambda r: r.size)
                self._free.remove(region)
            else:
                region = await self._create(max(_MIN_SIZE, 1 << (size - 1).bit_length()))
            region.holds = 1
            return region

    async def _create(self, size: int) -> Region:
        if self._owner is None or self._owner.pid != os.getpid():  # (a forked child: its own)
            self._owner = PoolOwner(self._shm_dir)
        name = f"{self._owner.prefix}{self._count}"
        self._count += 1
        handle = shm.create_shared_memory_region(name, "/" + name, size)
        region = Region(name, size, handle)
        try:
            await self._upstream.register_shm(name, "/" + name, size)
        except BaseException:
            shm.destroy_shared_memory_region(handle)
            raise
        self._all.append(region)
        return region

    @staticmethod
    def hold(region: Region) -> None:
        region.holds += 1

    def release(self, region: Region) -> None:
        """One user of the region is done with it; the last one returns it to the pool."""
        region.holds -= 1
        if region.holds == 0 and region in self._all:
            self._free.append(region)

    async def register_missing(self) -> list[str]:
        """Register again the regions Triton does not know (it restarted); returns them."""
        if not self._all:
            return []
        known = set((await self._upstream.shm_status()).regions)
        missing = [r for r in self._all if r.name not in known]
        for region in missing:
            await self._upstream.register_shm(region.name, "/" + region.name, region.size)
        if missing:
            log.info(
                "registered shared memory with Triton again: %s", ", ".join(r.name for r in missing)
            )
        return [r.name for r in missing]

    async def close(self) -> None:
        """Unregister every region from Triton and unlink it. A region that a call still
        running may write to stays registered (Triton would wait for the call, or worse) and is
        only unlinked: Triton keeps its mapping, and the next combiner reclaims the name once
        this process is gone (the pool keeps its owner's lock until then)."""
        left_registered = False
        for region in self._all:
            if region.holds > 0:
                left_registered = True
                log.warning(
                    "%s is still in use by %d call(s) on Triton: unlinked, left registered",
                    region.name,
                    region.holds,
                )
            else:
                try:
                    await self._upstream.unregister_shm(region.name)
                except MemberError as e:  # Triton may be gone already: still unlink
                    log.warning("could not unregister %s from Triton: %s", region.name, e)
            shm.destroy_shared_memory_region(region.handle)
        self._all.clear()
        self._free.clear()
        if self._owner is not None and not left_registered:
            self._owner.release()
            self._owner = None


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _gone(token: str, shm_dir: Path) -> bool:
    """Whether the owner with this token is gone: its lock file is missing, or nobody holds its
    lock. A gone owner's lock file is removed here, under the lock, so that an owner still
    creating it sees that and starts over. What cannot be told (a file this user may not
    open) counts as alive."""
    path = shm_dir / _LOCK.format(token=token)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: its owner holds it
        return False
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:  # another user's, in a sticky /dev/shm
            log.warning("cannot remove the lock file %s of a stopped process (%s)", path, e)
        return True
    finally:
        os.close(fd)


def _stale(name: str, shm_dir: Path) -> bool:
    """Whether ``name`` is a pool region whose owner is gone (for the older form without a
    token: whose pid no process has)."""
    match = POOL_NAME.match(name)
    if match is None:
        return False
    pid, token = match.groups()
    return _gone(token, shm_dir) if token else not _alive(int(pid))


async def reclaim_stale(upstream: Upstream, shm_dir: Path = _SHM_DIR) -> list[str]:
    """Unregister from Triton and unlink the regions of Chorus processes that are gone;
    what cannot be removed (another user's) is skipped with a warning."""
    reclaimed = []
    status: service_pb2.SystemSharedMemoryStatusResponse = await upstream.shm_status()
    for name in status.regions:
        if _stale(name, shm_dir):
            await upstream.unregister_shm(name)
            reclaimed.append(name)
    reclaimed += [name for name in unlink_stale(shm_dir) if name not in reclaimed]
    if reclaimed:
        log.info("reclaimed shared memory left by stopped processes: %s", ", ".join(reclaimed))
    return reclaimed


def unlink_stale(shm_dir: Path = _SHM_DIR) -> list[str]:
    """Unlink the pool regions of Chorus processes that are gone, and the lock files of gone
    owners; skip, with a warning, what cannot be removed. Returns the regions removed."""
    removed = []
    for path in sorted(shm_dir.glob(f"{_PREFIX}*")):
        if _stale(path.name, shm_dir):
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                log.warning("cannot remove stale shared memory %s (%s); skipped", path, e)
                continue
            removed.append(path.name)
    for path in shm_dir.glob("chorus-owner-*.lock"):  # owners gone before making a region
        match = _LOCK_NAME.match(path.name)
        if match:
            _gone(match.group(1), shm_dir)
    return removed
