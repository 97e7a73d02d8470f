"""`chorus render --target kubernetes`: the manifests for a 2-node GPU plan pass
kubernetes-validate --strict and say what the plan says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from orchestrator.plan import load_plan
from tests.unit.test_render import _gpu_plan


def _render(ensemble, tmp_path: Path) -> tuple[Path, dict[str, list[dict]]]:
    plan = _gpu_plan(ensemble, nodes=("node0", "node1"))
    (tmp_path / "plan.json").write_text(plan.to_json())
    out = tmp_path / "k8s"
    argv = [sys.executable, "-m", "orchestrator", "render", str(tmp_path / "plan.json")]
    argv += ["--ensemble", str(ensemble.file), "--target", "kubernetes", "-o", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    docs = {p.name: list(yaml.safe_load_all(p.read_text())) for p in sorted(out.glob("*.yaml"))}
    return out, docs


def test_manifests_for_a_two_node_gpu_plan_pass_strict_validation(ensemble, tmp_path):
    out, docs = _render(ensemble, tmp_path)
    assert set(docs) == {
        "secrets.yaml", "config.yaml", "node-node0.yaml", "node-node1.yaml", "combiner.yaml",
    }  # fmt: skip
    validate = Path(sys.executable).with_name("kubernetes-validate")
    done = subprocess.run(
        [str(validate), "--strict", *map(str, sorted(out.glob("*.yaml")))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" passed for resource ") == sum(len(d) for d in docs.values()), (
        done.stdout
    )


def test_each_node_runs_its_part_of_the_plan_and_the_combiner_routes_to_them(ensemble, tmp_path):
    out, docs = _render(ensemble, tmp_path)
    plan = load_plan(tmp_path / "plan.json")
    config = json.loads(docs["config.yaml"][0]["data"]["combiner.json"])
    routes = {n["name"]: n["url"] for n in config["nodes"]}
    for node in ("node0", "node1"):
        deployment, service = docs[f"node-{node}.yaml"]
        spec = deployment["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == {"kubernetes.io/hostname": node}
        gpus = {d for per in plan.instances.values() for d in per if d.startswith(node + "/")}
        (triton,) = spec["containers"]
        assert triton["resources"]["limits"]["nvidia.com/gpu"] == len(gpus)
        assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert triton["securityContext"]["runAsNonRoot"] is True
        assert "$(TRITON_KEY)" in " ".join(triton["args"])  # the key comes from the Secret
        (render,) = spec["initContainers"]
        assert render["args"][render["args"].index("--node") + 1] == node
        assert routes[node] == f"{service['metadata']['name']}:8001"
    for member in config["members"]:
        placed = {}
        for device, count in plan.instances[member["name"]].items():
            node = device.split("/")[0]
            placed[node] = placed.get(node, 0) + count
        assert member["nodes"] == placed
    combiner, service = docs["combiner.yaml"]
    assert combiner["spec"]["replicas"] == 2
    assert "--token-file" in combiner["spec"]["template"]["spec"]["containers"][0]["args"]
    assert {p["port"] for p in service["spec"]["ports"]} == {8100, 8101, 8102}
    assert (out / "secrets.yaml").stat().st_mode & 0o077 == 0  # the key and token: owner only


def test_a_node_repository_renders_alone_from_the_plan(ensemble, tmp_path):
    plan = _gpu_plan(ensemble, nodes=("node0", "node1"))
    (tmp_path / "plan.json").write_text(plan.to_json())
    argv = [sys.executable, "-m", "orchestrator", "render", str(tmp_path / "plan.json")]
    argv += ["--ensemble", str(ensemble.file), "--backend", "onnxruntime", "--node"]
    done = subprocess.run(
        [*argv, "node1", "-o", str(tmp_path / "n1")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    on_node1 = {m for m, per in plan.instances.items() if any(d.startswith("node1/") for d in per)}
    assert {p.parent.name for p in (tmp_path / "n1").glob("*/config.pbtxt")} == on_node1
    wrong = subprocess.run([*argv, "node9", "-o", str(tmp_path / "x")], capture_output=True)
    assert wrong.returncode == 2 and b"no node 'node9'" in wrong.stderr
