"""The combiner processes a plan needs (``--workers auto``), from a profile and a hardware file,
through the real ``chorus plan`` command: no server."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from combiner.supervisor import _count
from orchestrator.deploying.kubernetes import render_kubernetes
from orchestrator.deploying.up import combiner_config
from orchestrator.planning.data_path import data_path
from orchestrator.planning.hardware import load_hardware
from orchestrator.planning.plan import load_plan
from orchestrator.planning.profile import Curve, Host, Profile
from orchestrator.planning.spec import load_ensemble
from tests.cli import chorus

SIZES = (1, 2, 4, 8, 16, 32, 64)
GB = 10**9


def _resnet() -> Curve:
    # about a V100's ResNet-50: 1,140 samples/s at batch 64
    return Curve(GB, 20 * 10**6, tuple((b, 5.0 + 0.8 * b) for b in SIZES))


def _files(tmp_path: Path, cpu_cores: int | None, combiner_cpu_ms: float | None) -> list[str]:
    host = None if combiner_cpu_ms is None else Host(1, combiner_cpu_ms, 0.1, 1.0)
    profile = tmp_path / "profile.json"
    profile.write_text(Profile({"resnet": {"gpu": _resnet()}}, host).to_json())
    devices: list[dict[str, object]] = [
        {"kind": "gpu", "index": i, "name": "V100", "memory_gb": 16} for i in range(16)
    ]
    if cpu_cores is not None:
        devices.append({"kind": "cpu", "cores": cpu_cores, "memory_gb": 128})
    hardware = tmp_path / "hardware.yaml"
    hardware.write_text(yaml.safe_dump({"nodes": [{"name": "node0", "devices": devices}]}))
    (tmp_path / "resnet.onnx").write_bytes(b"")
    ensemble = tmp_path / "ensemble.yaml"
    ensemble.write_text(
        yaml.safe_dump(
            {
                "name": "one",
                "members": [{"name": "resnet", "path": "resnet.onnx"}],
                "inputs": [{"name": "x", "dtype": "FP32", "shape": [3, 224, 224]}],
                "outputs": [{"name": "y", "dtype": "FP32", "shape": [1000]}],
                "serving": {"max_batch_size": 64},
            }
        )
    )
    return [str(ensemble), "--profile", str(profile), "--hardware", str(hardware)]


def _plan(tmp_path: Path, *args: str) -> dict:
    run = chorus("plan", *args, "--json", "--evaluations", "20000")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_workers_auto_carry_what_sixteen_gpus_serve(tmp_path):
    # one process carries 1,000 / 0.8 = 1,250 batch-1 requests/s; 16 GPUs serve ~18,300
    plan = _plan(tmp_path, *_files(tmp_path, cpu_cores=32, combiner_cpu_ms=0.8))
    members = plan["members_throughput"]
    assert members > 14 * 1250
    assert plan["combiner_workers"] == -(-members // 1250)  # enough, and not one more
    assert plan["combiner_cores"] == 31  # one core for Triton's front end beside the GPUs
    assert plan["predicted_throughput"] == members  # not capped


def test_a_plan_the_data_path_caps_says_so_with_the_number(tmp_path):
    args = _files(tmp_path, cpu_cores=4, combiner_cpu_ms=0.8)
    plan = _plan(tmp_path, *args)
    assert plan["combiner_workers"] == 3  # 4 cores, one of them Triton's
    assert plan["predicted_throughput"] == 3 * 1250
    # the cost model lets the combiner have every core (4 / 0.8 ms); its processes get 3
    assert plan["members_throughput"] == 4 * 1250
    table = chorus("plan", *args, "--evaluations", "20000")
    assert table.returncode == 0, table.stderr
    text = " ".join(table.stdout.split())
    assert "predicted throughput: 3,750.0 samples/s" in text
    assert "the data path caps this plan at 3,750.0 samples/s" in text
    assert f"members would serve {plan['members_throughput']:,.1f}" in text


def test_without_a_measurement_one_process_and_why(tmp_path):
    args = _files(tmp_path, cpu_cores=32, combiner_cpu_ms=None)
    plan = _plan(tmp_path, *args)
    assert plan["combiner_workers"] == 1
    assert plan["combiner_per_process"] is None
    assert plan["members_throughput"] is None
    table = chorus("plan", *args, "--evaluations", "20000")
    assert "run 'chorus profile' on this host" in " ".join(table.stdout.split())


def test_cores_not_known_do_not_cap_the_count(tmp_path):
    plan = _plan(tmp_path, *_files(tmp_path, cpu_cores=None, combiner_cpu_ms=0.8))
    assert plan["combiner_cores"] is None
    assert plan["combiner_workers"] == -(-plan["members_throughput"] // 1250)


def test_cpu_instances_leave_their_cores_to_triton(tmp_path):
    hardware = tmp_path / "cpu.yaml"
    hardware.write_text(
        yaml.safe_dump(
            {"nodes": [{"name": "n", "devices": [{"kind": "cpu", "cores": 8, "memory_gb": 64}]}]}
        )
    )
    (cpu,) = load_hardware(hardware)
    host = Host(4, 2.0, 0.1, 1.0)  # 2,000 samples/s a process
    path = data_path(50_000.0, host, [cpu], {"a": {cpu.id: 3}, "b": {cpu.id: 2}})
    assert (path.cores, path.workers, path.capacity) == (3, 3, 6000.0)
    assert path.caps and path.throughput == 6000.0


def test_the_count_reaches_the_combiner_and_kubernetes(tmp_path):
    args = _files(tmp_path, cpu_cores=32, combiner_cpu_ms=0.8)
    out = tmp_path / "plan.json"
    run = chorus("plan", *args, "-o", str(out), "--evaluations", "20000")
    assert run.returncode == 0, run.stderr
    plan = load_plan(out)
    assert plan.combiner_workers >= 15
    ensemble = load_ensemble(args[0], read_models=False)
    config = combiner_config(ensemble, "triton:8001", plan)
    assert config.workers == plan.combiner_workers
    saved = tmp_path / "combiner.json"
    config.save(saved)
    assert _count(None, saved) == plan.combiner_workers  # --workers auto
    assert _count(2, saved) == 2  # a number given wins
    manifests = render_kubernetes(ensemble, plan, tmp_path / "k8s", image="chorus:test")
    docs = list(yaml.safe_load_all((tmp_path / "k8s" / "combiner.yaml").read_text()))
    assert manifests
    (container,) = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"
    ]
    assert "--workers" not in container["args"]  # auto: the config's count
    assert container["resources"]["requests"]["cpu"] == f"{500 * plan.combiner_workers}m"
