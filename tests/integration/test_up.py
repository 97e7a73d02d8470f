"""`chorus up` as a user runs it: a real process tree, stopped by a signal (SIGTERM under load:
test_supervision)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from combiner.client import EnsembleClient
from orchestrator.launch import free_port
from tests.integration.processes import alive, command_name, descendants


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_stopping_chorus_up_leaves_no_process_behind(
    ensemble_file, profile_file, tmp_path, split, sig
):
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "orchestrator",
        "up",
        str(ensemble_file),
        "--profile",
        str(profile_file),
        "--grpc-port",
        str(port),
        "--metrics-port",
        str(free_port()),
        "--workdir",
        str(tmp_path / "work"),
    ]
    log = tmp_path / "stderr.txt"
    # stderr to a file: a pipe nobody reads could fill up and block chorus
    with (
        log.open("w") as errors,
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, text=True) as up,
    ):
        try:
            assert up.stdout is not None
            line = up.stdout.readline()
            assert f"serving on 127.0.0.1:{port}" in line, (line, log.read_text())
            with EnsembleClient(f"127.0.0.1:{port}") as client:
                assert client.predict(split.x_test[:5]).shape == (5, 10)
            tree = descendants(up.pid)
            names = " | ".join(command_name(p) for p in tree)
            assert "tritonserver" in names and "-m combiner" in names, names

            up.send_signal(sig)
            code = up.wait(timeout=60)
            assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 0), log.read_text()
        finally:
            if up.poll() is None:
                up.kill()
                up.wait()
    deadline = time.monotonic() + 30
    while any(alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [command_name(p) for p in tree if alive(p)] == []
