"""A deployment answers only for itself: a second one started on a port the first serves, or in
its working directory, is refused (exit code 2, naming the port or the folder), and every answer
on that port still comes from the first, on fresh connections, whoever starts the second
(``chorus up`` or the combiner alone)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from combiner.sdk import EnsembleClient
from orchestrator.deploying.launch import free_port
from tests.integration.test_serving import direct_combination


def other_weights(ensemble_file: Path, folder: Path) -> Path:
    """The same members with other weights: its answers differ from the first's."""
    doc = yaml.safe_load(ensemble_file.read_text())
    for i, member in enumerate(doc["members"]):
        member["path"] = str(ensemble_file.parent / member["path"])
        member["weight"] = 10.0 if i == 0 else 0.1
    doc["combine"]["rule"] = "weighted_mean"
    path = folder / "ensemble.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def wrong_answers(address: str, ensemble, connections: int = 100) -> int:
    """How many of ``connections`` new connections got an answer not the first's."""
    x = np.random.default_rng(8).random((4, 1, 8, 8), np.float32)
    expected = direct_combination(ensemble, x)
    wrong = 0
    for _ in range(connections):
        with EnsembleClient(address) as client:  # a channel, and so a connection, of its own
            got = client.predict(x)
        wrong += not np.allclose(got, expected, rtol=1e-4, atol=1e-6)
    return wrong


def run_second(argv: list[str], log: Path) -> tuple[int | None, str]:
    """Start the second deployment; its exit code (None: it kept running, then was stopped)
    and what it said."""
    with log.open("w") as out, subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT) as p:
        try:
            return p.wait(timeout=120), log.read_text()
        except subprocess.TimeoutExpired:
            return None, log.read_text()
        finally:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()


def test_a_second_chorus_up_on_a_served_port_is_refused(
    chorus_up, ensemble, ensemble_file, profile_file, tmp_path
):
    port = chorus_up.address.rpartition(":")[2]
    second = other_weights(ensemble_file, tmp_path)
    argv = [sys.executable, "-m", "orchestrator", "up", str(second), "--grpc-port", port]
    argv += ["--http-port", "0", "--metrics-port", "0", "--profile", str(profile_file)]
    argv += ["--workdir", str(tmp_path / "second")]
    code, said = run_second(argv, tmp_path / "second.txt")
    assert code == 2, said
    assert f"port {port} on 127.0.0.1 is in use" in said
    assert wrong_answers(chorus_up.address, ensemble) == 0


def test_a_second_combiner_on_a_served_port_is_refused_before_any_worker(
    chorus_up, ensemble, tmp_path
):
    """The check the combiner makes itself, for a port taken after ``chorus up`` looked."""
    port = chorus_up.address.rpartition(":")[2]
    config = chorus_up.workdir / "combiner.json"
    argv = [sys.executable, "-m", "combiner", "--config", str(config), "--grpc-port", port]
    code, said = run_second([*argv, "--workers", "2"], tmp_path / "second.txt")
    assert code == 2, said
    assert f"port {port} on 127.0.0.1 is in use" in said
    assert "combiner.worker" not in said
    assert wrong_answers(chorus_up.address, ensemble) == 0


def test_a_second_chorus_up_in_the_first_ones_folder_is_refused(
    chorus_up, ensemble, ensemble_file, profile_file, tmp_path
):
    """Ports of its own, the first's --workdir: refused before it writes there (it rewrote the
    first's config and Triton key, and killed its processes as a dead run's); the first keeps
    its files, its processes and its answers."""
    workdir = chorus_up.workdir
    files = {n: (workdir / n).read_bytes() for n in ("combiner.json", "triton.key", "plan.json")}
    processes = chorus_up.children("tritonserver") | chorus_up.children("combiner")
    argv = [sys.executable, "-m", "orchestrator", "up", str(ensemble_file)]
    argv += ["--grpc-port", str(free_port()), "--http-port", "0", "--metrics-port", "0"]
    argv += ["--profile", str(profile_file), "--workdir", str(workdir)]
    code, said = run_second(argv, tmp_path / "second.txt")
    assert code == 2, said
    assert f"the working directory {workdir.resolve()} is in use by another deployment" in said
    assert f"pid {chorus_up.process.pid}:" in said  # who holds it
    assert {n: (workdir / n).read_bytes() for n in files} == files
    assert chorus_up.children("tritonserver") | chorus_up.children("combiner") == processes
    assert wrong_answers(chorus_up.address, ensemble) == 0


def test_chorus_profile_in_a_held_folder_is_refused_before_its_triton(ensemble_file, tmp_path):
    """A profile's Triton in the folder of a deployment that profiles took that one's Triton
    (same session file) for a dead run's and stopped it."""
    from tests.unit.test_workdir import other_process_holds

    workdir = tmp_path / "held"
    holder = other_process_holds(workdir)
    try:
        argv = [sys.executable, "-m", "orchestrator", "profile", str(ensemble_file)]
        code, said = run_second([*argv, "--workdir", str(workdir)], tmp_path / "profile.txt")
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    assert code == 2, said
    assert f"{workdir.resolve()} is in use by another deployment (pid {holder.pid}:" in said
    assert not (workdir / "profile").exists()  # no Triton was started there
