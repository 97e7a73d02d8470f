"""A two-member toy ensemble (linear ONNX models), for the rendering tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.planning.spec import Ensemble, load_ensemble
from tests.onnx_models import linear


@pytest.fixture
def ensemble(tmp_path: Path) -> Ensemble:
    linear(tmp_path / "a.onnx", seed=0)
    linear(tmp_path / "b.onnx", seed=1, output_name="scores")
    spec = {
        "name": "toy",
        "members": [{"name": "a", "path": "a.onnx"}, {"name": "b", "path": "b.onnx"}],
    }
    (tmp_path / "ensemble.yaml").write_text(yaml.safe_dump(spec))
    return load_ensemble(tmp_path / "ensemble.yaml")
