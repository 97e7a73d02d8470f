"""One trained digits ensemble, one measured profile and one running deployment (Triton +
combiner) per test run."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from combiner.client import EnsembleClient
from examples.digits.train import HERE, Split, load_split, train_members
from orchestrator.hardware import discover
from orchestrator.measure import measure_profile
from orchestrator.plan import Plan, one_instance_each
from orchestrator.profile import Profile, save_profile
from orchestrator.spec import Ensemble, load_ensemble
from orchestrator.up import Deployment, Endpoints
from tests.integration.processes import command_name, descendants
from tests.integration.test_serving import direct_combination


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
