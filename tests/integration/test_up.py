"""`chorus up` as a user runs it: a real process tree, stopped by a signal (SIGTERM under load:
test_supervision)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from combiner.sdk import EnsembleClient, Unavailable
from orchestrator.deploying.launch import free_port
from tests.cli import chorus
from tests.integration.conftest import launched_up
from tests.integration.processes import alive, command_name, descendants, end_all, held


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_stopping_chorus_up_leaves_no_process_behind(chorus_up, split, sig):
    up = chorus_up
    with EnsembleClient(up.address) as client:
        assert client.predict(split.x_test[:5]).shape == (5, 10)
    tree = descendants(up.process.pid)
    names = " | ".join(command_name(p) for p in tree)
    assert "tritonserver" in names and "-m combiner" in names, names
    (worker, *_) = up.children("combiner.worker")
    metrics = psutil.Process(worker).environ()["PROMETHEUS_MULTIPROC_DIR"]
    assert os.path.isdir(metrics)
    regions = _regions(up.process)  # the Python backend's, one a stub
    assert regions and all(os.path.exists(r) for r in regions), regions

    up.process.send_signal(sig)
    code = up.process.wait(timeout=60)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 0), up.text()
    if sig != signal.SIGKILL:  # its last line says it is done, and how it ended
        assert up.text().rstrip().splitlines()[-1].startswith("stopped in "), up.text()
    up.wait_for("every process gone", lambda: not any(alive(p) for p in tree))
    # the combiner's metrics folder (in /tmp) went with it: each `kill -9` had left one; and
    # the stubs' shared memory (a killed Triton cannot unlink it): each had left 13 MiB
    assert not os.path.exists(metrics)
    up.wait_for("the stubs' shared memory gone", lambda: not any(map(os.path.exists, regions)))


def _regions(process: subprocess.Popen) -> set[str]:
    """The shared-memory regions the stubs below ``process`` name (one each)."""
    stubs = _below(process, "triton_python_backend_stub")
    words = {w for p in stubs for w in command_name(p).split()}
    return {f"/dev/shm/{w}" for w in words if w.startswith("triton_python_backend_shm_region_")}


class _Run:
    """A chorus command line run (its output in a file); at the end, what is left of it and
    of the processes it had is killed (held as psutil objects: their pids may be another's by
    then, sooner where a test chose the next pid), and so are the others a test made."""

    def __init__(self, argv: list[str], tmp_path) -> None:
        self.output = tmp_path / "output.txt"
        with self.output.open("w") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=out)
        self.owned: list[psutil.Process] = []
        self.others: list[subprocess.Popen] = []

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.kill()
        self.process.wait()
        end_all([*self.owned, *held(self.process.pid)])
        for other in self.others:
            other.kill()
            other.wait()

    def hold(self) -> set[int]:
        """The processes below the command now (held until the end): their pids."""
        self.owned += held(self.process.pid)
        return {p.pid for p in self.owned}

    def other(self, process: subprocess.Popen | None) -> subprocess.Popen | None:
        """``process`` (if any), killed at the end."""
        if process is not None:
            self.others.append(process)
        return process

    def wait_serving(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while "serving on" not in self.output.read_text():
            assert self.process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)


def test_chorus_up_killed_while_triton_loads_leaves_no_stub_behind(
    ensemble_file, tmp_path, served_plan
):
    """`kill -9` of chorus up while its Triton loads the members: Triton dies with it, but
    Python-backend stubs that were still starting outlived it, for good (on this host all
    four did when the first was 0.3 s old). Here they are held (SIGSTOP) 0.1 s after the
    first starts until a second after the kill, so that they are starting when Triton dies.
    A watchdog of Chorus's kills what Triton's process group has left."""
    planned = tmp_path / "plan.json"
    planned.write_text(served_plan.to_json())
    argv = up_argv(ensemble_file, tmp_path, "--plan", str(planned))
    with _Run(argv, tmp_path) as run:
        process = run.process
        deadline = time.monotonic() + 120
        while not _below(process, "triton_python_backend_stub"):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.1)
        stubs = _below(process, "triton_python_backend_stub")
        for stub in stubs:
            with contextlib.suppress(ProcessLookupError):  # (a shell on its way to exec one)
                os.kill(stub, signal.SIGSTOP)
        tree = run.hold()
        process.kill()
        process.wait(timeout=60)
        time.sleep(1.0)
        for stub in stubs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stub, signal.SIGCONT)
        deadline = time.monotonic() + 15
        while left := [command_name(p) for p in tree if alive(p)]:
            assert time.monotonic() < deadline, left
            time.sleep(0.2)


def test_a_watchdog_never_kills_a_group_that_took_its_dead_childs_id(
    ensemble_file, profile_file, tmp_path
):
    """Found by a hostile review: Chorus reaped a Triton that died (freeing its pid) before
    it stood that Triton's watchdog down (in the restart, 0.1 s later or more; after a whole
    drain where a Ctrl-C came first). Chorus killed then (here: stopped at once, then
    `kill -9`), the watchdog killed the process group that had since taken the pid: a
    process of someone else's. Where this host lets the test choose the next pid
    (/proc/sys/kernel/ns_last_pid, as root), such a process is made; in any case no watchdog
    of the dead Triton may be left once its pid is free. And a watchdog killed by someone is
    started again (it had been left a zombie, its child unwatched)."""
    argv = up_argv(ensemble_file, tmp_path, "--profile", str(profile_file))
    with _Run(argv, tmp_path) as run:
        process = run.process
        run.wait_serving()
        (triton,) = _below(process, "tritonserver")
        # and a watchdog killed by someone (here first) had left its child unwatched for good
        (first,) = _watchdogs_of(process, triton)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not _watchdogs_of(process, triton):
            assert time.monotonic() < deadline, "the killed watchdog was not started again"
            time.sleep(0.1)
        assert not alive(first) and not psutil.pid_exists(first)  # and reaped
        tree = run.hold()
        regions = _regions(process)
        os.kill(triton, signal.SIGKILL)
        while psutil.pid_exists(triton):  # until chorus up has reaped it
            time.sleep(0.001)
        process.send_signal(signal.SIGSTOP)
        assert not _watchdogs_of(process, triton), "a watchdog of the reaped Triton is still there"
        # and its stubs' shared memory is gone with them (a kill -9 of chorus up before the
        # next reclaim, 10 s after, had left every killed Triton's)
        assert regions and not any(map(os.path.exists, regions)), regions
        deadline = time.monotonic() + 30
        while any(_in_session(p, triton) for p in tree):  # the stubs end and are reaped
            assert time.monotonic() < deadline, "the stubs did not end"
            time.sleep(0.1)
        victim = run.other(_process_with_pid(triton))
        if victim is not None:
            assert os.getpgid(victim.pid) == triton
        process.kill()
        process.wait(timeout=60)
        time.sleep(2.0)  # what a watchdog would do, it has done
        if victim is not None:
            assert victim.poll() is None, "another's process killed by Chorus's watchdog"


def test_a_watchdog_that_acts_late_leaves_another_session_alone(
    ensemble_file, profile_file, tmp_path
):
    """Found by a hostile review: a watchdog that acts late (here stopped until then) after
    Chorus was killed, when its Triton's session had ended and a new process had its id,
    killed that process's session. It now ends nothing where a process of that id started
    at another time than its child."""
    if not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK):
        pytest.skip("this host does not let the test choose the next pid (ns_last_pid)")
    argv = up_argv(ensemble_file, tmp_path, "--profile", str(profile_file))
    with _Run(argv, tmp_path) as run:
        process = run.process
        run.wait_serving()
        tree = run.hold()
        (triton,) = _below(process, "tritonserver")
        (watchdog,) = _watchdogs_of(process, triton)
        os.kill(watchdog, signal.SIGSTOP)
        process.kill()
        process.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(_in_session(p, triton) for p in tree):  # Triton and its stubs end
            assert time.monotonic() < deadline, "Triton's session did not end"
            time.sleep(0.1)
        victim = run.other(_process_with_pid(triton))
        assert victim is not None, f"pid {triton} could not be had"
        os.kill(watchdog, signal.SIGCONT)
        psutil.Process(watchdog).wait(timeout=30)  # it did what it does
        assert victim.poll() is None, "another's process killed by Chorus's watchdog"


def _watchdogs_of(process: subprocess.Popen, child: int) -> list[int]:
    """The watchdogs below ``process`` of its child ``child`` (watchdog.py PIDFD CHILD ...)."""
    found = []
    for pid in _below(process, "watchdog.py"):
        argv = command_name(pid).split()
        script = next((i for i, a in enumerate(argv) if a.endswith("watchdog.py")), None)
        if script is not None and argv[script + 2 : script + 3] == [str(child)]:
            found.append(pid)
    return found


def _in_session(pid: int, session: int) -> bool:
    """Whether process ``pid`` (a zombie too: it holds its ids) is of ``session``."""
    try:
        return os.getsid(pid) == session
    except ProcessLookupError:
        return False


def _process_with_pid(pid: int) -> subprocess.Popen | None:
    """A new process (a group of its own) with id ``pid``, where the host lets us choose it."""
    for _ in range(20):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
        except OSError:
            return None  # not root, or not this kernel: only the watchdog is checked
        other = subprocess.Popen(["sleep", "60"], start_new_session=True)
        if other.pid == pid:
            return other
        other.kill()  # another process of the host took it first
        other.wait()
    return None


def test_workers_auto_start_the_processes_the_plan_asks_for(
    ensemble_file, profile_file, split, tmp_path
):
    """`chorus up` without --workers serves a plan that needs two combiner processes (a plan
    file, as `chorus plan -o` writes it for a host with the cores) with two, and says so."""
    planned = tmp_path / "plan.json"
    run = chorus("plan", str(ensemble_file), "--profile", str(profile_file), "-o", str(planned))
    assert run.returncode == 0, run.stderr
    data = json.loads(planned.read_text())
    planned.write_text(json.dumps({**data, "combiner_workers": 2}))
    port = free_port()
    argv = [sys.executable, "-m", "orchestrator", "up", str(ensemble_file), "--plan", str(planned)]
    argv += ["--grpc-port", str(port), "--http-port", str(free_port())]
    argv += ["--metrics-port", str(free_port()), "--workdir", str(tmp_path / "work")]
    with launched_up(argv, port, tmp_path) as up:
        assert up.process.stdout is not None
        lines = [up.process.stdout.readline() for _ in range(4)]  # after "serving on"
        assert any(line.startswith("combiner: 2 process(es)") for line in lines), lines
        up.wait_for("two workers", lambda: len(up.children("combiner.worker")) == 2)
        with EnsembleClient(up.address) as client:
            assert client.predict(split.x_test[:3]).shape == (3, 10)
        config = json.loads((tmp_path / "work" / "combiner.json").read_text())
        assert config["workers"] == 2
        up.process.send_signal(signal.SIGINT)
        assert up.process.wait(timeout=60) == 0, up.text()


def signalled(argv, tmp_path, running: str, signals, apart_s: float = 0.3):
    """Run a chorus command line until a process whose command line holds ``running`` is
    below it, then send it ``signals`` (``apart_s`` apart); its exit code, its output, and
    the processes it had then, once all of them are gone (15 s at most)."""
    log = tmp_path / "output.txt"
    with log.open("w") as out, subprocess.Popen(argv, stdout=out, stderr=out) as process:
        try:
            deadline = time.monotonic() + 120
            while not any(running in command_name(p) for p in descendants(process.pid)):
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            tree = descendants(process.pid)
            for i, sig in enumerate(signals):
                if i:
                    time.sleep(apart_s)
                process.send_signal(sig)
            code = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    deadline = time.monotonic() + 15
    while any(alive(p) for p in tree):
        assert time.monotonic() < deadline, [command_name(p) for p in tree if alive(p)]
        time.sleep(0.2)
    return code, log.read_text()


def up_argv(ensemble_file, tmp_path, *more: str) -> list[str]:
    argv = [sys.executable, "-m", "orchestrator", "up", str(ensemble_file), *more]
    argv += ["--grpc-port", str(free_port()), "--http-port", str(free_port())]
    argv += ["--metrics-port", str(free_port())]  # (its default, 8102, may be another's)
    return [*argv, "--workdir", str(tmp_path / "work")]


def test_sigterm_while_chorus_up_profiles_stops_its_triton_and_leaves_nothing(
    ensemble_file, tmp_path
):
    """SIGTERM (what systemd, docker and kubectl send) before serving stops the command as
    Ctrl-C does: here while it profiles the members (nothing profiled in its workdir yet), a
    stub of the profile's Triton running. Python's default had ended the command at once, by
    the signal and without a word, and the Triton killed with it could leave a Python-backend
    stub behind."""
    argv = up_argv(ensemble_file, tmp_path)
    code, output = signalled(argv, tmp_path, "triton_python_backend_stub", [signal.SIGTERM])
    assert code == 128 + signal.SIGTERM, output  # not -SIGTERM: it ended, it was not ended
    assert output.rstrip().splitlines()[-1].startswith("stopped by SIGTERM"), output


def test_a_sigterm_after_ctrl_c_does_not_cut_the_stopping_short(ensemble_file, tmp_path):
    """Ctrl-C, then the SIGTERM of a `docker stop` while Chorus stops what it started: the
    second signal is ignored (it had ended the command at once, its Triton mid-shutdown)."""
    argv = up_argv(ensemble_file, tmp_path)
    signals = [signal.SIGINT, signal.SIGTERM]
    code, output = signalled(argv, tmp_path, "triton_python_backend_stub", signals)
    assert code == 128 + signal.SIGINT, output
    assert "already stopping what was started, in order: this signal is ignored" in output


def test_sigterm_while_chorus_up_starts_stops_it_before_it_serves(
    ensemble_file, tmp_path, served_plan
):
    """A signal while Triton and the combiner start (here from a plan file: no profiling)
    stops them; it used to be held until they served, so `serving on` was printed first."""
    planned = tmp_path / "plan.json"
    planned.write_text(served_plan.to_json())
    argv = up_argv(ensemble_file, tmp_path, "--plan", str(planned))
    code, output = signalled(argv, tmp_path, "tritonserver", [signal.SIGTERM])
    assert code == 128 + signal.SIGTERM, output
    assert "serving on" not in output, output


def test_chorus_up_run_with_sigint_ignored_keeps_ignoring_it_once_serving(
    ensemble_file, profile_file, split, tmp_path
):
    """Started where SIGINT is ignored (a background job of a script: `trap '' INT`), chorus
    up had taken SIGINT back once serving and drained on it; SIGTERM still stops it."""
    port = free_port()
    command = up_argv(ensemble_file, tmp_path, "--profile", str(profile_file))
    command[command.index("--grpc-port") + 1] = str(port)
    argv = ["bash", "-c", "trap '' INT; exec " + shlex.join(command)]
    with launched_up(argv, port, tmp_path) as up:
        up.process.send_signal(signal.SIGINT)
        time.sleep(1.0)  # a drain would have closed the endpoint by now
        assert up.process.poll() is None, up.text()
        with EnsembleClient(up.address) as client:
            assert client.predict(split.x_test[:3]).shape == (3, 10)
        up.process.send_signal(signal.SIGTERM)
        assert up.process.wait(timeout=60) == 0, up.text()


def _serving_again(process: subprocess.Popen, port: int, split, within_s: float = 90) -> None:
    """Until the ensemble on ``port`` answers (Triton on its way back: UNAVAILABLE)."""

    def answers() -> bool:
        assert process.poll() is None, "chorus up ended"
        try:
            with EnsembleClient(f"127.0.0.1:{port}") as client:
                return client.predict(split.x_test[:3]).shape == (3, 10)
        except Unavailable:
            return False  # Triton on its way back

    deadline = time.monotonic() + within_s
    while not answers():
        assert time.monotonic() < deadline, f"not serving within {within_s:g} s"
        time.sleep(0.2)


def _below(process: subprocess.Popen, marker: str) -> set[int]:
    return {p for p in descendants(process.pid) if marker in command_name(p)}


def _kill_triton(process: subprocess.Popen) -> None:
    (triton,) = _below(process, "tritonserver")
    subprocess.run(["kill", "-9", str(triton)], check=True)


def test_chorus_up_whose_output_reader_is_gone_keeps_serving_and_restarting(
    ensemble_file, profile_file, split, tmp_path
):
    """`chorus up ... 2>&1 | head -1`: once the reader of its output is gone, the next line
    it wrote (here: that Triton died and is being restarted) stopped the deployment, exit 1
    without a word (a broken pipe, which rich answers with SystemExit). Its output is a
    report: without a reader it is dropped, the deployment goes on as it would have, and
    its events are in WORKDIR/events.log."""
    port = free_port()
    argv = up_argv(ensemble_file, tmp_path, "--profile", str(profile_file))
    argv[argv.index("--grpc-port") + 1] = str(port)
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        try:
            assert process.stdout is not None
            seen = [process.stdout.readline()]
            while "serving on" not in seen[-1]:
                assert seen[-1], f"ended before serving: {seen}"
                seen.append(process.stdout.readline())
            process.stdout.close()  # what `head -1` does once it has its line
            _kill_triton(process)
            _serving_again(process, port, split)
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=60) == 0  # drained as usual
        finally:
            if process.poll() is None:
                process.kill()
    events = (tmp_path / "work" / "events.log").read_text()  # what the console lost
    assert "tritonserver exited with code -9; restarting it" in events, events
    assert "tritonserver is back" in events and "stopped in " in events, events


def test_chorus_up_whose_console_nobody_reads_still_restarts_and_stops(
    ensemble_file, profile_file, split, tmp_path
):
    """Found by hostile reviews: with a console that takes nothing (a terminal paused with
    Ctrl-S, a stuck pipe), `chorus up` blocked in its first write (the cached profile's line
    before serving, the banner, a restart's line): Triton, killed, was never restarted,
    SIGTERM did nothing, and events.log had nothing (the console came first); a second
    signal's word blocked its handler. All it prints goes through a thread of its own, the
    events to the file first; the terminal closing (SIGHUP) drains like SIGTERM (it had
    killed chorus up at once, no drain); a console still stuck at the end is given up. The
    file is appended to from the start, a previous run's line cut short (a full disk) ended."""
    port = free_port()
    argv = up_argv(ensemble_file, tmp_path)  # the profile from the cache: a line said first
    argv[argv.index("--grpc-port") + 1] = str(port)
    events = tmp_path / "work" / "events.log"
    events.parent.mkdir()
    shutil.copy(profile_file, tmp_path / "work" / "profile.json")
    events.write_text("a line of the run before, cut short")
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETFL, os.O_NONBLOCK)
    with contextlib.suppress(BlockingIOError):  # the pipe full: not one more byte goes in
        while True:
            os.write(write_end, b"x" * 4096)
    fcntl.fcntl(write_end, fcntl.F_SETFL, 0)
    with subprocess.Popen(
        argv,
        stdout=write_end,
        stderr=write_end,
    ) as process:
        os.close(write_end)
        try:
            _serving_again(process, port, split, within_s=120)
            _kill_triton(process)
            _serving_again(process, port, split)
            process.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            process.send_signal(signal.SIGHUP)  # its word ("already stopping") waits for none
            deadline = time.monotonic() + 90
            while "stopped in " not in events.read_text():
                assert time.monotonic() < deadline, events.read_text()
                time.sleep(0.1)
            process.send_signal(signal.SIGHUP)  # and in the last wait for the console (a
            assert process.wait(timeout=60) == 0  # review found it blocked there), exit 0
        finally:
            os.close(read_end)
            if process.poll() is None:
                process.kill()
    lines = events.read_text().splitlines()
    assert lines[0] == "a line of the run before, cut short", lines
    said = [line.split(" ", 2)[2] for line in lines[1:]]  # after the date and time
    assert said[0].startswith("starting 'digits'") and said[1].startswith("serving on"), said
    assert any(s.startswith("tritonserver exited with code -9; restarting") for s in said), said
    assert any(s.startswith("tritonserver is back") for s in said), said
    assert said[-1].startswith("stopped in "), said


def test_chorus_up_with_stdout_closed_and_events_log_a_fifo_serves(
    ensemble_file, profile_file, split, tmp_path
):
    """Found by a hostile review: `chorus up >&-` tore the deployment down at its first line
    (exit 120), and an events.log that is a FIFO nobody reads hung it in open() for good: no
    restarts, SIGTERM ignored. A closed stdout is /dev/null, and an events.log that is not a
    regular file is not used, with a word on stderr."""
    port = free_port()
    argv = up_argv(ensemble_file, tmp_path, "--profile", str(profile_file))
    argv[argv.index("--grpc-port") + 1] = str(port)
    events = tmp_path / "work" / "events.log"
    events.parent.mkdir()
    os.mkfifo(events)
    log = tmp_path / "stderr.txt"
    code = f"import os, subprocess, sys\nos.close(1)\nsys.exit(subprocess.run({argv!r}).returncode)"
    with log.open("w") as errors:
        shell = subprocess.Popen([sys.executable, "-c", code], stderr=errors)
    try:
        deadline = time.monotonic() + 30
        while not (ups := psutil.Process(shell.pid).children()):  # chorus up itself
            assert shell.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        (up,) = ups
        _serving_again(shell, port, split, within_s=120)
        _kill_triton(shell)
        _serving_again(shell, port, split)
        up.send_signal(signal.SIGTERM)
        assert shell.wait(timeout=60) == 0, log.read_text()
    finally:
        if shell.poll() is None:
            for p in descendants(shell.pid):
                with contextlib.suppress(psutil.Error):
                    psutil.Process(p).kill()
            shell.kill()
    text = " ".join(log.read_text().split())
    assert f"cannot write {events} (not a regular file)" in text, text
    assert "tritonserver exited with code -9; restarting" in text, text
    assert "stopped in " in text, text
