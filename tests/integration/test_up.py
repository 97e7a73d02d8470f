"""`chorus up` as a user runs it: a real process tree, stopped by a signal (SIGTERM under load:
test_supervision)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from combiner.sdk import EnsembleClient
from orchestrator.deploying.launch import free_port
from tests.cli import chorus
from tests.integration.conftest import launched_up
from tests.integration.processes import alive, command_name, descendants


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_stopping_chorus_up_leaves_no_process_behind(chorus_up, split, sig):
    up = chorus_up
    with EnsembleClient(up.address) as client:
        assert client.predict(split.x_test[:5]).shape == (5, 10)
    tree = descendants(up.process.pid)
    names = " | ".join(command_name(p) for p in tree)
    assert "tritonserver" in names and "-m combiner" in names, names

    up.process.send_signal(sig)
    code = up.process.wait(timeout=60)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 0), up.text()
    if sig != signal.SIGKILL:  # its last line says it is done, and how it ended
        assert up.text().rstrip().splitlines()[-1].startswith("stopped in "), up.text()
    up.wait_for("every process gone", lambda: not any(alive(p) for p in tree))


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


def test_sigterm_while_chorus_up_profiles_stops_its_triton_and_leaves_nothing(
    ensemble_file, tmp_path
):
    """SIGTERM (what systemd, docker and kubectl send) before serving stops the command as
    Ctrl-C does: here while it profiles the members, a stub of the profile's Triton running.
    Python's default had ended the command at once, by the signal and without a word, and the
    Triton killed with it could leave a Python-backend stub behind."""
    argv = [sys.executable, "-m", "orchestrator", "up", str(ensemble_file)]
    argv += ["--grpc-port", str(free_port()), "--http-port", str(free_port())]
    argv += ["--workdir", str(tmp_path / "work")]  # nothing profiled there yet
    log = tmp_path / "output.txt"
    with log.open("w") as out, subprocess.Popen(argv, stdout=out, stderr=out) as process:
        try:
            deadline = time.monotonic() + 120
            while not any(
                "triton_python_backend_stub" in command_name(p) for p in descendants(process.pid)
            ):
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            tree = descendants(process.pid)
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    output = log.read_text()
    assert code == 128 + signal.SIGTERM, output  # not -SIGTERM: it ended, it was not ended
    assert output.rstrip().splitlines()[-1].startswith("stopped by SIGTERM"), output
    deadline = time.monotonic() + 15
    while any(alive(p) for p in tree):
        assert time.monotonic() < deadline, [command_name(p) for p in tree if alive(p)]
        time.sleep(0.2)
