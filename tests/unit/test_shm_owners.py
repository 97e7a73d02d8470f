"""Whose pool region is it: a region's name carries its owner's token, and the owner is alive
while it holds its lock file; a pid alone says nothing once the combiner restarts in a fresh
PID namespace (a container), where the new worker gets the dead one's pid. Real files in a
folder standing for /dev/shm, real processes holding real locks."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from tritonclient.grpc import service_pb2

from combiner.triton.shm import POOL_NAME, PoolOwner, reclaim_stale, unlink_stale

NO_SUCH_PID = 2**22 + 12345  # above pid_max's default: no such process

HOLD_A_LOCK = """
import sys
from pathlib import Path
from combiner.triton.shm import PoolOwner

owner = PoolOwner(Path(sys.argv[1]))
print(owner.prefix, flush=True)
sys.stdin.read()  # until killed
"""


def region(folder: Path, name: str) -> str:
    (folder / name).write_bytes(bytes(4096))
    return name


def test_a_region_named_for_this_pid_but_another_owner_is_stale(tmp_path):
    """What a restarted container finds: its own pid in a dead worker's region names."""
    mine = PoolOwner(tmp_path)
    try:
        other = f"chorus_{os.getpid()}_{secrets.token_hex(8)}_0"
        assert POOL_NAME.match(other) and POOL_NAME.match(mine.prefix + "0")
        region(tmp_path, other)
        region(tmp_path, mine.prefix + "0")
        assert unlink_stale(tmp_path) == [other]
        assert (tmp_path / (mine.prefix + "0")).is_file()  # this process's own: kept
    finally:
        mine.release()


def test_an_owner_that_died_is_stale_and_a_live_one_is_not_whatever_its_pid_says(tmp_path):
    """A live owner whose pid this process cannot see (another PID namespace: here, a pid
    that does not exist) keeps its regions; once it is killed, they and its lock file go."""
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_A_LOCK, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    ) as owner:
        assert owner.stdout is not None
        prefix = owner.stdout.readline().strip()
        token = POOL_NAME.match(prefix + "0").group(2)  # type: ignore[union-attr]
        unseen = region(tmp_path, f"chorus_{NO_SUCH_PID}_{token}_0")
        region(tmp_path, prefix + "0")
        assert unlink_stale(tmp_path) == []
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert sorted(unlink_stale(tmp_path)) == sorted([unseen, prefix + "0"])
        assert list(tmp_path.iterdir()) == []  # its lock file went with them


def test_a_released_owner_leaves_no_lock_file_and_its_names_are_then_stale(tmp_path):
    owner = PoolOwner(tmp_path)
    name = region(tmp_path, owner.prefix + "0")
    assert unlink_stale(tmp_path) == []
    owner.release()
    assert unlink_stale(tmp_path) == [name]
    assert list(tmp_path.iterdir()) == []


class _Triton:
    """Triton's shared-memory registrations, as reclaim_stale sees them through Upstream."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)

    async def shm_status(self) -> service_pb2.SystemSharedMemoryStatusResponse:
        status = service_pb2.SystemSharedMemoryStatusResponse()
        for name in self.names:
            status.regions[name].name = name
        return status

    async def unregister_shm(self, name: str) -> None:
        self.names.remove(name)


def test_triton_registrations_of_a_dead_owner_with_a_live_pid_are_unregistered(tmp_path):
    """The ALREADY_EXISTS of a restarted container: the dead worker's registrations go, this
    process's and a client's stay."""
    mine = PoolOwner(tmp_path)
    try:
        dead = f"chorus_{os.getpid()}_{secrets.token_hex(8)}_0"
        triton = _Triton([dead, mine.prefix + "0", "chorus_client_a"])
        reclaimed = asyncio.run(reclaim_stale(triton, tmp_path))  # type: ignore[arg-type]
        assert reclaimed == [dead]
        assert triton.names == [mine.prefix + "0", "chorus_client_a"]
    finally:
        mine.release()
