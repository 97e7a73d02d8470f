"""A combiner supervisor killed on its own (kill -9, the OOM killer) cannot remove the folder its
workers wrote their metrics to; the next ``python -m combiner`` on the host removes it, and
never the folder of one that lives. Each test's combiners get a temporary folder of the test's
own (``TMPDIR``), so what it looks at is theirs alone."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from combiner.config import is_served
from orchestrator.deploying.launch import free_port
from orchestrator.deploying.up import Deployment
from tests.integration.processes import end_all, held


@contextmanager
def supervisor(deployment: Deployment, tmp: Path, name: str) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m combiner`` on a copy of the shared deployment's config (its Triton), with
    ``tmp`` as its temporary folder, once every worker listens."""
    config = tmp / f"{name}.json"
    shutil.copy(deployment.workdir / "combiner.json", config)
    argv = [sys.executable, "-m", "combiner", "--config", str(config)]
    argv += ["--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    log = (tmp / f"{name}.log").open("wb")
    process = subprocess.Popen(
        argv, env={**os.environ, "TMPDIR": str(tmp)}, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while not is_served(config):
            assert process.poll() is None, (tmp / f"{name}.log").read_text()
            assert time.monotonic() < deadline, (tmp / f"{name}.log").read_text()
            time.sleep(0.05)
        yield process
    finally:
        left = held(process.pid)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
        psutil.wait_procs(left, timeout=30)
        end_all(left)
        log.close()


def folders(tmp: Path) -> set[Path]:
    return set(tmp.glob("chorus-metrics-*"))


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    (tmp_path / "tmp").mkdir()
    return tmp_path / "tmp"


def test_the_next_supervisor_removes_the_folder_a_killed_one_left(
    deployment: Deployment, tmp: Path
) -> None:
    with supervisor(deployment, tmp, "killed") as killed:
        (left,) = folders(tmp)
        workers = held(killed.pid)
        assert workers
        killed.kill()  # the supervisor alone; its workers follow it (parent-death signal)
        killed.wait()
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, alive
    assert folders(tmp) == {left}, "a kill -9 leaves the folder (what the next start is for)"
    with supervisor(deployment, tmp, "next"):
        assert left not in folders(tmp)
        assert len(folders(tmp)) == 1  # its own
        assert str(left) in (tmp / "next.log").read_text()  # and it says what it removed
    assert folders(tmp) == set()  # a clean stop removes its own


def lock_flags(pid: int, lock: Path) -> list[int]:
    """The flags of each descriptor of process ``pid`` open on ``lock``."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == str(lock):
                info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
                found.append(int(info.split("flags:")[1].split()[0], 8))
    return found


def test_a_supervisor_that_lives_keeps_its_folder(deployment: Deployment, tmp: Path) -> None:
    with supervisor(deployment, tmp, "first") as first_process:
        (first,) = folders(tmp)
        workers = [p for p in held(first_process.pid) if "combiner.worker" in " ".join(p.cmdline())]
        assert workers
        for worker in workers:  # each holds the lock, and passes it to no child of its own
            (flags,) = lock_flags(worker.pid, first / "owner.lock")
            assert flags & os.O_CLOEXEC, oct(flags)
        with supervisor(deployment, tmp, "second"):
            assert first in folders(tmp) and len(folders(tmp)) == 2
            assert (first / "owner.lock").is_file()
        assert folders(tmp) == {first}
    assert folders(tmp) == set()
