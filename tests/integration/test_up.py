"""`chorus up` as a user runs it: a real process tree, stopped by a signal (SIGTERM under load:
test_supervision)."""

from __future__ import annotations

import signal

import pytest

from combiner.sdk import EnsembleClient
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
