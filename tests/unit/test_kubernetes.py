"""`chorus render --target kubernetes`: the manifests for a 2-node GPU plan pass
kubernetes-validate --strict and say what the plan says."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from orchestrator.deploying.kubernetes import render_kubernetes
from orchestrator.errors import ChorusError
from orchestrator.planning.plan import load_plan
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


def test_a_pod_numbers_its_gpus_from_zero_in_the_order_it_gets_them(ensemble, tmp_path):
    """The device plugin shows a pod only the GPUs it requests, as 0, 1, ...: a plan on host
    gpu1 (node0), or on host gpu1 and gpu3 (node1), renders the pod's own numbers."""
    from orchestrator.deploying.render import parse_config, render_node
    from orchestrator.planning.hardware import Device
    from orchestrator.planning.plan import Plan

    gib = 1 << 30
    gpus = [
        Device(n, "gpu", i, "gpu", 16 * gib, 16 * gib) for n in ("node0", "node1") for i in range(4)
    ]
    devices = (*gpus, Device("node0", "cpu", 0, "cpu", 64 * gib, 64 * gib, cores=8))
    plan = Plan(
        ensemble=ensemble.name,
        devices=devices,
        planned_memory_bytes={"node0/gpu1": 6 * gib, "node1/gpu1": 3 * gib, "node1/gpu3": 3 * gib},
        members=("a", "b"),
        instances={
            "a": {"node0/gpu1": 2, "node1/gpu3": 1},
            "b": {"node0/gpu1": 1, "node1/gpu1": 1},
        },
        max_batch_size={"a": 8, "b": 8},
        predicted_throughput=1.0,
    )
    render_kubernetes(ensemble, plan, tmp_path / "k8s")
    (config_map,) = yaml.safe_load_all((tmp_path / "k8s" / "config.yaml").read_text())
    (tmp_path / "plan.json").write_text(config_map["data"]["plan.json"])
    pod_plan = load_plan(tmp_path / "plan.json")  # what the init container renders from
    expected = {"node0": (1, {"a": [0], "b": [0]}), "node1": (2, {"a": [1], "b": [0]})}
    for node, (requested, per_member) in expected.items():
        deployment, _ = yaml.safe_load_all((tmp_path / "k8s" / f"node-{node}.yaml").read_text())
        (triton,) = deployment["spec"]["template"]["spec"]["containers"]
        assert triton["resources"]["requests"]["nvidia.com/gpu"] == requested
        assert triton["resources"]["limits"]["nvidia.com/gpu"] == requested
        render_node(ensemble, pod_plan, node, tmp_path / node, "onnxruntime")
        for member, pod_gpus in per_member.items():
            config = parse_config((tmp_path / node / member / "config.pbtxt").read_text(), member)
            assert [list(g.gpus) for g in config.instance_group] == [pod_gpus]


@pytest.mark.parametrize(
    ("nodes", "says"),
    [
        (("a.b", "a-b"), "node 'a-b' would be named 'chorus-"),
        (("gpu-1.pool", "gpu-1-pool"), "would be named 'node-gpu-1-pool.yaml'"),  # long app
        (("combiner",), "as the combiner's Deployment is"),
        (("gke-pool-" + "x" * 45 + "-k8xz", "gke-pool-" + "x" * 45 + "-p2mn"), None),
        (("Node0",), "node 'Node0' cannot be a Kubernetes node's hostname"),
        (("-x", "y"), "node '-x' cannot be a Kubernetes node's hostname"),
    ],
    ids=[
        "punctuation",
        "punctuation, long app",
        "combiner",
        "long names cut apart",
        "uppercase",
        "leading dash",
    ],
)
def test_nodes_kubernetes_cannot_tell_apart_or_pin_are_refused(ensemble, tmp_path, nodes, says):
    """Found by hostile reviews: two nodes alike but for punctuation, or two long names alike
    in their first 63 characters, made one Service, so one node's Triton was dropped without
    a word; a node named 'combiner' took the combiner's Deployment name; an uppercase or '-x'
    node made a nodeSelector no node matches."""
    if "gpu-1.pool" in nodes:  # its Services' names are cut (and differ): its files do not
        ensemble = replace(ensemble, name="fraud-detection-" + "e" * 40)
    plan = _gpu_plan(ensemble, nodes=nodes)
    if says is None:  # names cut to 63 characters end in a digest of the whole: they differ
        render_kubernetes(ensemble, plan, tmp_path / "k8s")
        names = [
            doc["metadata"]["name"]
            for path in (tmp_path / "k8s").glob("node-*.yaml")
            for doc in yaml.safe_load_all(path.read_text())
            if doc["kind"] == "Service"
        ]
        assert len(set(names)) == 2 and all(len(n) <= 63 for n in names), names
        return
    with pytest.raises(ChorusError, match=re.escape(says)):
        render_kubernetes(ensemble, plan, tmp_path / "k8s")
