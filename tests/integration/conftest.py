"""One trained digits ensemble, one measured profile and one running deployment (Triton +
combiner) per test run."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from combiner.sdk import EnsembleClient
from orchestrator.deploying.launch import free_port
from orchestrator.deploying.up import Deployment, Endpoints
from orchestrator.examples.digits.train import HERE, Split, load_split, train_members
from orchestrator.measuring.measure import measure_profile
from orchestrator.planning.hardware import discover
from orchestrator.planning.plan import Plan, one_instance_each
from orchestrator.planning.profile import Profile, save_profile
from orchestrator.planning.spec import Ensemble, load_ensemble
from tests.integration.processes import command_name, descendants
from tests.integration.test_serving import direct_combination


@pytest.fixture(scope="session", autouse=True)
def signals_as_at_a_terminal() -> None:
    """The tests play a user at a terminal, whose Ctrl-C and hang-up reach `chorus up`. Run
    as a script's background job or under nohup, the suite would pass SIGINT or SIGHUP on
    ignored to what it starts, and chorus up keeps ignored what it is given so (a test
    sending SIGINT then waits for a stop that never comes)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.fixture(scope="session")
def split() -> Split:
    return load_split()


@pytest.fixture(scope="session")
def ensemble_file(tmp_path_factory: pytest.TempPathFactory, split: Split) -> Path:
    root = tmp_path_factory.mktemp("digits")
    train_members(root / "models", split)
    shutil.copy(HERE / "ensemble.yaml", root / "ensemble.yaml")
    return root / "ensemble.yaml"


@pytest.fixture(scope="session")
def ensemble(ensemble_file: Path) -> Ensemble:
    return load_ensemble(ensemble_file)


@pytest.fixture(scope="session")
def profile(tmp_path_factory: pytest.TempPathFactory, ensemble: Ensemble) -> Profile:
    """Measured on the real bundled Triton, briefly (the numbers are not asserted)."""
    return measure_profile(
        ensemble, tmp_path_factory.mktemp("profile"), seconds_per_point=0.02, show_progress=False
    )


@pytest.fixture(scope="session")
def profile_file(tmp_path_factory: pytest.TempPathFactory, profile: Profile) -> Path:
    path = tmp_path_factory.mktemp("profile-file") / "profile.json"
    save_profile(profile, path)
    return path


@pytest.fixture(scope="session")
def served_plan(ensemble: Ensemble) -> Plan:
    """A plan that exercises the data path: two instances of one member, and members whose
    batch limit on Triton is below the ensemble's, so the combiner splits large requests."""
    base = one_instance_each(
        ensemble.name, [m.name for m in ensemble.members], discover(), ensemble.max_batch_size
    )
    (cpu,) = {d for per in base.instances.values() for d in per}
    return replace(
        base,
        instances={**base.instances, "cnn": {cpu: 2}},
        max_batch_size={**base.max_batch_size, "cnn": 8, "mlp": 5},
    )


@pytest.fixture(scope="session")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, ensemble: Ensemble, served_plan: Plan
) -> Iterator[Deployment]:
    d = Deployment(
        ensemble,
        tmp_path_factory.mktemp("deployment"),
        plan=served_plan,
        http_port=0,
        allow_client_shm=True,
    )
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def endpoints(deployment: Deployment) -> Endpoints:
    assert deployment.endpoints is not None
    return deployment.endpoints


def worker_pids(deployment: Deployment) -> set[int]:
    """The combiner's worker processes."""
    assert deployment.combiner is not None and deployment.combiner.pid is not None
    tree = descendants(deployment.combiner.pid)
    return {p for p in tree if "combiner.worker" in command_name(p)}


@pytest.fixture
def still_serving(
    deployment: Deployment, endpoints: Endpoints, ensemble: Ensemble
) -> Iterator[None]:
    """The same worker serves, and answers correctly, after the test."""
    workers = worker_pids(deployment)
    yield
    assert worker_pids(deployment) == workers
    x = np.random.default_rng(77).random((3, 1, 8, 8), np.float32)
    with EnsembleClient(endpoints.ensemble) as client:
        np.testing.assert_allclose(
            client.predict(x), direct_combination(ensemble, x), rtol=1e-4, atol=1e-6
        )


@dataclass
class Up:
    process: subprocess.Popen[str]
    address: str
    log: Path
    workdir: Path

    def children(self, marker: str) -> set[int]:
        return {p for p in descendants(self.process.pid) if marker in command_name(p)}

    def wait_for(self, what: str, test: Callable[[], object], timeout: float = 60.0) -> None:
        """Wait (bounded, so a broken build fails instead of hanging) until ``test()``."""
        deadline = time.monotonic() + timeout
        while not test():
            assert time.monotonic() < deadline, f"{what}: not within {timeout} s\n{self.text()}"
            time.sleep(0.1)

    def text(self) -> str:
        return self.log.read_text()


@pytest.fixture
def chorus_up(
    request: pytest.FixtureRequest, ensemble_file: Path, profile_file: Path, tmp_path: Path
) -> Iterator[Up]:
    """``chorus up --workers 2``, as a user runs it; more flags by indirect parametrization."""
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
        "--http-port",
        str(free_port()),
        "--workers",
        "2",
        "--workdir",
        str(tmp_path / "work"),
        *getattr(request, "param", ()),
    ]
    with launched_up(argv, port, tmp_path) as up:
        up.wait_for("two workers", lambda: len(up.children("combiner.worker")) == 2)
        yield up


@contextmanager
def launched_up(argv: list[str], port: int, tmp_path: Path) -> Iterator[Up]:
    """A ``chorus up`` command line, once it serves on ``port`` (stderr to a file: a pipe
    nobody reads could fill up and block it); killed after, if it still runs."""
    log = tmp_path / "stderr.txt"
    with (
        log.open("w") as errors,
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, text=True) as process,
    ):
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert f"serving on 127.0.0.1:{port}" in line, (line, log.read_text())
            yield Up(process, f"127.0.0.1:{port}", log, tmp_path / "work")
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
