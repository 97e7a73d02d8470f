"""A combiner container that restarts: its new worker runs in a fresh PID namespace and gets
the dead worker's pid. The pool regions the dead one left registered with the real Triton are
reclaimed, and the new worker's own register (no ALREADY_EXISTS); from outside the namespace,
where neither pid is visible, they are told apart the same way."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from combiner.triton.shm import reclaim_stale
from combiner.triton.upstream import Upstream
from orchestrator.deploying.launch import TritonServer
from tests.integration.test_shm import triton_regions

SHM = Path("/dev/shm")
ROOT = Path(__file__).parents[2]

# Reclaims what dead workers left, takes a region, and dies by SIGKILL, leaving it behind.
WORKER = """
import asyncio, os, signal, sys
from combiner.triton.shm import ShmPool, reclaim_stale
from combiner.triton.upstream import Upstream

async def main() -> None:
    upstream = Upstream(sys.argv[1], sys.argv[2])
    reclaimed = await reclaim_stale(upstream)
    region = await ShmPool(upstream).acquire(1024)
    print(os.getpid(), region.name, ",".join(reclaimed), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""

# A container's PID namespace: sh is its pid 1, the worker its pid 2, each time.
CONTAINER = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]


class Run(NamedTuple):
    pid: int
    region: str
    reclaimed: list[str]


@pytest.fixture
def triton(tmp_path: Path) -> Iterator[TritonServer]:
    if shutil.which("unshare") is None or subprocess.run([*CONTAINER, "true"]).returncode:
        pytest.skip("this host gives no unprivileged PID namespace (unshare --user --pid)")
    (tmp_path / "repo").mkdir()
    server = TritonServer(tmp_path / "repo", tmp_path, models=[])
    server.start()
    try:
        yield server
    finally:
        server.stop()


def in_a_fresh_container(triton: TritonServer) -> Run:
    argv = [*CONTAINER, "sh", "-c", '"$@"; true', "sh", sys.executable, "-c", WORKER]
    done = subprocess.run(
        [*argv, triton.grpc_url, triton.key or ""], capture_output=True, text=True, cwd=ROOT
    )
    assert done.stdout, done.stderr
    pid, region, reclaimed = done.stdout.strip("\n").split(" ")
    return Run(int(pid), region, [n for n in reclaimed.split(",") if n])


def test_a_worker_restarted_with_the_dead_ones_pid_reclaims_its_regions(triton):
    class Endpoints:
        triton_grpc = triton.grpc_url
        triton_headers = triton.grpc_headers

    first = in_a_fresh_container(triton)
    assert triton_regions(Endpoints) == {first.region} and (SHM / first.region).exists()
    second = in_a_fresh_container(triton)
    assert second.pid == first.pid  # what a restarted container's worker gets
    assert second.reclaimed == [first.region]
    assert triton_regions(Endpoints) == {second.region}
    assert not (SHM / first.region).exists()

    async def reclaim_from_here() -> list[str]:  # outside the namespace: pid 2 is not theirs
        upstream = Upstream(triton.grpc_url, triton.key)
        try:
            return await reclaim_stale(upstream)
        finally:
            await upstream.close()

    assert second.region in asyncio.run(reclaim_from_here())
    assert triton_regions(Endpoints) == set()
    assert not (SHM / second.region).exists()
