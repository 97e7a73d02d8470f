"""One trained digits ensemble and one running deployment (Triton + combiner) per test run."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples.digits.train import HERE, Split, load_split, train_members
from orchestrator.spec import Ensemble, load_ensemble
from orchestrator.up import Deployment, Endpoints


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
def deployment(
    tmp_path_factory: pytest.TempPathFactory, ensemble: Ensemble
) -> Iterator[Deployment]:
    d = Deployment(ensemble, tmp_path_factory.mktemp("deployment"))
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def endpoints(deployment: Deployment) -> Endpoints:
    assert deployment.endpoints is not None
    return deployment.endpoints
