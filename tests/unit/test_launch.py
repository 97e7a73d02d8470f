from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.deploying.launch import ManagedProcess, TritonServer, find_tritonserver
from orchestrator.deploying.watchdog import started
from orchestrator.errors import LaunchError


def fake_server(tmp_path: Path, body: str) -> Path:
    """A program standing in for a tritonserver that fails to start, as a broken one would."""
    path = tmp_path / "bin" / "tritonserver"
    path.parent.mkdir()
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_tritonserver_comes_from_the_environment_variable_first(tmp_path, monkeypatch):
    path = fake_server(tmp_path, "exit 0")
    monkeypatch.setenv("TRITONSERVER", str(path))
    binary = find_tritonserver()
    assert binary.path == path.resolve() and not binary.bundled


def test_the_bundled_tritonserver_is_found_with_its_python_backend(monkeypatch):
    monkeypatch.delenv("TRITONSERVER", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    binary = find_tritonserver()
    assert binary.bundled and binary.path.is_file()
    assert "python" in binary.backends


def test_a_server_that_dies_at_start_raises_with_the_tail_of_its_log(tmp_path, monkeypatch):
    path = fake_server(tmp_path, 'echo "E1128 model cnn failed to load: bad opset"; exit 7')
    monkeypatch.setenv("TRITONSERVER", str(path))
    server = TritonServer(tmp_path / "repo", tmp_path / "work", ["cnn"])
    with pytest.raises(LaunchError, match="exited with code 7") as e:
        server.start(timeout=30)
    assert "model cnn failed to load: bad opset" in e.value.log_tail
    assert "bad opset" in str(e.value)


SLEEPER = "import time; time.sleep(600)"


def test_what_a_dead_process_left_in_its_session_is_killed(tmp_path):
    """As the Python backend's stubs outlive a Triton killed with -9."""
    child = tmp_path / "child.pid"
    parent = ManagedProcess(
        "parent",
        [
            sys.executable,
            "-c",
            "import subprocess, sys; "
            f"p = subprocess.Popen([sys.executable, '-c', {SLEEPER!r}]); "
            f"open({str(child)!r}, 'w').write(str(p.pid))",
        ],
        tmp_path / "parent.log",
    )
    parent.start()
    assert parent.proc is not None and parent.proc.wait(timeout=30) == 0
    orphan = psutil.Process(int(child.read_text()))
    assert orphan.is_running()
    parent.stop()
    orphan.wait(timeout=10)  # not our child: no exit code, but it must end
    assert not orphan.is_running()


def test_a_new_start_kills_what_the_last_run_here_left_when_chorus_was_killed(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    log = work / "thing.log"
    leftover = subprocess.Popen(
        [sys.executable, "-c", SLEEPER, str(work / "repository")], start_new_session=True
    )
    unrelated = subprocess.Popen([sys.executable, "-c", SLEEPER], start_new_session=True)
    # what the last run wrote: the session's id and its leader's start time
    log.with_suffix(".session").write_text(f"{leftover.pid} {started(leftover.pid)}\n")
    (work / "other.session").write_text(f"{unrelated.pid} {started(unrelated.pid)}\n")
    thing = ManagedProcess("thing", [sys.executable, "-c", "pass"], log)
    thing.start()
    try:
        assert leftover.wait(timeout=10) == -signal.SIGKILL
        assert unrelated.poll() is None  # another session, not named in the session file
    finally:
        unrelated.kill()
        unrelated.wait()
        thing.stop()
    assert not log.with_suffix(".session").exists()  # a clean stop: nothing left to find


@pytest.mark.parametrize("case", ["the id given again", "a sibling folder"])
def test_a_new_start_leaves_alone_a_session_the_last_run_here_did_not_leave(tmp_path, case):
    """Found by a hostile review: the session file of a run (never removed, even after a
    clean stop) named a pid that, once given again, could be another deployment's session,
    and a command line naming `work2/...` counted as naming `work`: that deployment's
    Triton was killed."""
    work = tmp_path / "work"
    work.mkdir()
    log = work / "thing.log"
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLEEPER,
            str(work if case == "the id given again" else tmp_path / "work2"),
        ],
        start_new_session=True,
    )
    try:
        since = started(other.pid)
        assert since is not None
        if case == "the id given again":
            since -= 1  # the leader the file names started before this process
        log.with_suffix(".session").write_text(f"{other.pid} {since}\n")
        thing = ManagedProcess("thing", [sys.executable, "-c", "pass"], log)
        thing.start()
        thing.stop()
        assert other.poll() is None, "another deployment's process was killed"
    finally:
        other.kill()
        other.wait()


def test_backend_shared_memory_nobody_maps_any_more_is_unlinked(tmp_path):
    """As a Triton killed with -9 leaves its Python-backend regions behind."""
    import mmap
    import os

    from orchestrator.deploying.launch import reclaim_backend_shm

    def region(name: str) -> Path:
        path = tmp_path / f"triton_python_backend_shm_region_{name}"
        path.write_bytes(bytes(4096))
        os.utime(path, (0, 0))  # old enough
        return path

    left, in_use, other = region("left"), region("in-use"), tmp_path / "not_a_backend_region"
    other.write_bytes(b"x")
    os.utime(other, (0, 0))
    young = tmp_path / "triton_python_backend_shm_region_starting"
    young.write_bytes(bytes(4096))  # just made: a starting Triton maps it next
    with open(in_use, "r+b") as f, mmap.mmap(f.fileno(), 4096):  # a live Triton's
        removed = reclaim_backend_shm(tmp_path)
    assert removed == [str(left)]
    assert not left.exists() and in_use.exists() and other.exists() and young.exists()


def test_a_ctrl_c_as_a_child_starts_comes_once_the_child_is_known(tmp_path, monkeypatch):
    """Found by a hostile review: a KeyboardInterrupt inside Popen (while it waits for the
    child's exec) or before its result was stored left a running child that no stop knew of.
    Here the signal lands just after the real Popen returns."""
    import orchestrator.deploying.launch as launch

    real = subprocess.Popen

    def popen_then_ctrl_c(*args, **kwargs):
        child = real(*args, **kwargs)
        if not kwargs.get("start_new_session"):  # not a ManagedProcess (a version check)
            return child
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the handler runs here, in the main thread
        except KeyboardInterrupt:
            child.kill()  # (what the test would otherwise leave running)
            child.wait()
            raise
        return child

    monkeypatch.setattr(launch.subprocess, "Popen", popen_then_ctrl_c)
    sleeper = ManagedProcess("sleeper", ["sleep", "30"], tmp_path / "sleep.log")
    with pytest.raises(KeyboardInterrupt):
        sleeper.start()
    assert sleeper.proc is not None and sleeper.proc.poll() is None  # known, so stopped
    sleeper.stop(timeout=5)
    assert sleeper.proc.poll() is not None

    # and a server whose start it interrupts is stopped (it had run on, to be SIGKILLed only
    # when Chorus exited: a Triton's stubs and shared memory left behind)
    monkeypatch.setenv(
        "TRITONSERVER", str(fake_server(tmp_path, '[ "$1" = --help ] || exec sleep 30'))
    )
    server = TritonServer(tmp_path / "repo", tmp_path / "work", [])
    with pytest.raises(KeyboardInterrupt):
        server.start(timeout=30)
    assert server.process is not None and server.process.proc is not None
    assert server.process.proc.poll() is not None


def test_a_signal_while_stopping_is_ignored_even_where_stderr_is_gone():
    """The word that a second signal is ignored must not cut the stop short: with stderr
    closed (or a pipe whose reader, a `| tee`, died of the first Ctrl-C) its write failed
    inside the signal handler, raising into the stop."""
    code = "import os; os.close(2); from orchestrator.cli.options import already_stopping; "
    code += "already_stopping(); print('went on')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout == "went on\n", done
