"""Where Chorus's deployments start Triton themselves (the GPU compose file, Kubernetes GPU
pods), Triton runs without its metrics, as ``chorus node`` does: nothing of Chorus reads them,
and no key guards them. (``tests/integration/test_exposure.py`` checks the launched server.)"""

from __future__ import annotations

from pathlib import Path

import yaml

from orchestrator.deploying.kubernetes import render_kubernetes
from orchestrator.deploying.launch import TritonServer
from orchestrator.planning.spec import Ensemble
from tests.unit.test_render import _gpu_plan

ROOT = Path(__file__).parents[2]


def test_the_launcher_turns_tritons_metrics_off(tmp_path: Path) -> None:
    server = TritonServer(tmp_path / "repo", tmp_path / "work", ["a"])
    argv, _ = server.command()
    assert "--allow-metrics=false" in argv
    assert not [a for a in argv if a.startswith(("--metrics-port", "--metrics-address"))]


def test_kubernetes_gpu_pods_run_triton_without_metrics(ensemble: Ensemble, tmp_path: Path) -> None:
    render_kubernetes(ensemble, _gpu_plan(ensemble), tmp_path)
    (deployment, _) = yaml.safe_load_all((tmp_path / "node-node0.yaml").read_text())
    (triton,) = deployment["spec"]["template"]["spec"]["containers"]
    assert triton["command"] == ["tritonserver"]  # a GPU node: the official image's server
    assert "--allow-metrics=false" in triton["args"]
    assert {p["containerPort"] for p in triton["ports"]} == {8000, 8001}


def test_the_gpu_compose_file_runs_triton_without_metrics() -> None:
    compose = yaml.safe_load((ROOT / "compose.gpu.yaml").read_text())
    script = compose["services"]["triton"]["command"][-1]
    assert "exec tritonserver " in script and " --allow-metrics=false " in script
