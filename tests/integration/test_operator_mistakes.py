"""What a careless operator gets from ``chorus up``: a refusal at once naming the mistake (exit 2,
no traceback) where it had served half its endpoints, crash-looped, printed a traceback, or
waited three minutes for models that could never start."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.deploying.launch import free_port


def chorus_up(ensemble_file: Path, profile_file: Path, *flags: str) -> tuple[int, str]:
    argv = [sys.executable, "-m", "orchestrator", "up", str(ensemble_file)]
    argv += ["--profile", str(profile_file), *flags]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    return run.returncode, run.stdout + run.stderr


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("")
    return path


MISTAKES = {
    # gRPC and HTTP both listened, one per address family: half the gRPC clients never answered
    "gRPC and HTTP on one port": (lambda p, _: ["--grpc-port", p, "--http-port", p], "given twice"),
    # the combiner crash-looped five times, then gave up with a traceback
    "gRPC and metrics on one port": (
        lambda p, _: ["--grpc-port", p, "--metrics-port", p, "--http-port", "0"],
        "given twice",
    ),
    "a host that does not resolve": (
        lambda _, __: ["--host", "not-a-host.invalid"],
        "cannot listen on 'not-a-host.invalid'",
    ),
    "an address not this host's": (lambda _, __: ["--host", "192.0.2.1"], "cannot listen on"),
    "a workdir that is a file": (lambda _, f: ["--workdir", str(f)], "it is not a folder"),
    "a workdir under a file": (lambda _, f: ["--workdir", str(f / "sub")], "Not a directory"),
    # Triton's Python backend starts its stubs through a shell: no model ever started
    "a workdir with a space": (lambda _, f: ["--workdir", str(f.parent / "my work")], "' '"),
}


@pytest.mark.parametrize(("flags", "expected"), MISTAKES.values(), ids=MISTAKES.keys())
def test_a_mistake_is_refused_at_once_by_name(ensemble_file, profile_file, a_file, flags, expected):
    port = str(free_port())
    if "192.0.2.1" in flags(port, a_file) and _binds_any_address():
        pytest.skip("this host binds addresses it does not have (ip_nonlocal_bind)")
    # ports of the test's own (the defaults may be another's), then the mistake: the last wins
    own = ["--grpc-port", port, "--http-port", "0", "--metrics-port", "0"]
    code, said = chorus_up(ensemble_file, profile_file, *own, *flags(port, a_file))
    assert code == 2, said
    assert expected in said, said
    assert "Traceback" not in said, said
    assert not (a_file.parent / "my work").exists()


def _binds_any_address() -> bool:
    nonlocal_bind = Path("/proc/sys/net/ipv4/ip_nonlocal_bind")
    return nonlocal_bind.is_file() and nonlocal_bind.read_text().strip() == "1"


def test_a_privileged_port_is_said_to_be_the_ports_fault(ensemble_file, profile_file):
    """It was blamed on --host ("cannot listen on '127.0.0.1': Permission denied")."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv(1)")
    argv = [setpriv, "--inh-caps=-all", "--bounding-set=-net_bind_service", sys.executable]
    argv += ["-m", "orchestrator", "up", str(ensemble_file), "--profile", str(profile_file)]
    argv += ["--grpc-port", str(free_port()), "--http-port", "80", "--metrics-port", "0"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    said = run.stdout + run.stderr
    if "setpriv:" in said:
        pytest.skip(f"cannot drop the capability here: {said.strip()}")
    assert run.returncode == 2, said
    assert "port 80 on 127.0.0.1: permission denied" in said, said
    assert "--host" not in said, said


def test_the_combiner_alone_refuses_one_port_for_two_endpoints(chorus_up_config, tmp_path):
    port = str(free_port())
    argv = [sys.executable, "-m", "combiner", "--config", str(chorus_up_config)]
    argv += ["--grpc-port", port, "--metrics-port", port]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert f"port {port} is given twice" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.fixture
def chorus_up_config(deployment) -> Path:
    return deployment.workdir / "combiner.json"


UNSHARE = shutil.which("unshare")


@pytest.mark.skipif(UNSHARE is None, reason="needs unshare(1)")
def test_a_full_disk_is_said_and_leaves_no_cut_copy(ensemble_file, profile_file, tmp_path):
    """Triton's backend copied into a full workdir was cut short and said with a traceback;
    every later start loaded the cut copy and died of SIGBUS, with no word of why."""
    work = tmp_path / "tiny"
    work.mkdir()
    argv = [sys.executable, "-m", "orchestrator", "up", str(ensemble_file)]
    argv += ["--profile", str(profile_file), "--workdir", str(work)]
    argv += ["--grpc-port", str(free_port()), "--http-port", "0", "--metrics-port", "0"]
    script = (
        f"mount --make-rprivate / && mount -t tmpfs -o size=1m tmpfs {work} && "
        f"{{ {subprocess.list2cmdline(argv)}; echo exit=$?; ls -la {work}/backends/python; }}"
    )
    run = subprocess.run(
        [UNSHARE, "-m", "sh", "-c", script], capture_output=True, text=True, timeout=180
    )
    said = run.stdout + run.stderr
    if "exit=" not in said:  # unshare or mount not allowed (not root, a container)
        pytest.skip(f"cannot mount here: {said.strip()}")
    assert "exit=1" in said, said
    assert "No space left on device" in said, said
    assert "Traceback" not in said, said
    assert "libtriton_python.so" not in said.split("exit=1", 1)[1], said  # no cut copy
