"""The combiner processes a plan needs (``--workers auto``), from a profile and a hardware file,
through the real ``chorus plan`` command: no server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from combiner.supervisor import _count, _workers
from orchestrator.deploying.kubernetes import render_kubernetes
from orchestrator.deploying.up import combiner_config
from orchestrator.errors import SpecError
from orchestrator.planning.data_path import data_path
from orchestrator.planning.hardware import Device, load_hardware
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
    assert "run 'chorus profile' on the serving host" in " ".join(table.stdout.split())


def test_cores_not_known_do_not_cap_the_count(tmp_path):
    plan = _plan(tmp_path, *_files(tmp_path, cpu_cores=None, combiner_cpu_ms=0.8))
    assert plan["combiner_cores"] is None
    assert plan["combiner_workers"] == -(-plan["members_throughput"] // 1250)


def _cpu_alone(tmp_path: Path, cores: int) -> Device:
    """The CPU of a one-node hardware file that lists only it."""
    hardware = tmp_path / "cpu.yaml"
    device = {"kind": "cpu", "cores": cores, "memory_gb": 64}
    hardware.write_text(yaml.safe_dump({"nodes": [{"name": "n", "devices": [device]}]}))
    (cpu,) = load_hardware(hardware)
    return cpu


def test_cpu_instances_leave_their_cores_to_triton(tmp_path):
    cpu = _cpu_alone(tmp_path, cores=8)
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
    per_pod = -(-plan.combiner_workers // 2)  # the default 2 replicas share them
    assert container["args"][-2:] == ["--workers", str(per_pod)]
    assert container["resources"]["requests"]["cpu"] == f"{500 * per_pod}m"


def test_the_combiner_runs_on_the_first_node_for_the_cost_model_and_the_count(tmp_path):
    # node a (GPUs, no CPU listed) comes first: the combiner is there, not beside b's 2 cores
    a = [{"kind": "gpu", "index": i, "name": "V100", "memory_gb": 16} for i in range(8)]
    b = [*a, {"kind": "cpu", "cores": 2, "memory_gb": 64}]
    hardware = tmp_path / "two.yaml"
    hardware.write_text(
        yaml.safe_dump({"nodes": [{"name": "a", "devices": a}, {"name": "b", "devices": b}]})
    )
    args = _files(tmp_path, cpu_cores=None, combiner_cpu_ms=0.8)
    args[args.index("--hardware") + 1] = str(hardware)
    plan = _plan(tmp_path, *args)
    assert plan["combiner_cores"] is None  # a lists no CPU
    assert plan["members_throughput"] > 15_000  # b's 2 cores do not bound the combiner
    assert plan["combiner_workers"] == -(-plan["members_throughput"] // 1250)


def test_a_node_with_no_core_to_spare_says_so(tmp_path):
    cpu = _cpu_alone(tmp_path, cores=2)
    path = data_path(9000.0, Host(1, 0.5, 0.1, 1.0), [cpu], {m: {cpu.id: 1} for m in "abcd"})
    assert (path.cores, path.workers) == (0, 1)
    assert "no core is left beside Triton's work" in path.describe()
    assert "requests of 1 row(s)" in path.describe()


def test_a_plan_file_with_a_bad_combiner_count_is_refused_naming_it(tmp_path):
    args = _files(tmp_path, cpu_cores=32, combiner_cpu_ms=0.8)
    out = tmp_path / "plan.json"
    assert chorus("plan", *args, "-o", str(out), "--evaluations", "20000").returncode == 0
    good = json.loads(out.read_text())
    for field, value in [
        ("combiner_workers", -3),
        ("combiner_workers", 0),
        ("combiner_workers", "abc"),
        ("combiner_workers", 2.7),
        ("combiner_workers", True),
        ("combiner_per_process", "fast"),
        ("combiner_cores", -1),
    ]:
        out.write_text(json.dumps({**good, field: value}))
        with pytest.raises(SpecError, match=field):
            load_plan(out)


def test_a_plan_from_before_the_sizing_keeps_one_process_and_says_to_plan_again(tmp_path):
    args = _files(tmp_path, cpu_cores=32, combiner_cpu_ms=0.8)
    out = tmp_path / "plan.json"
    assert chorus("plan", *args, "-o", str(out), "--evaluations", "20000").returncode == 0
    old = {k: v for k, v in json.loads(out.read_text()).items() if not k.startswith("combiner")}
    old.pop("members_throughput")
    out.write_text(json.dumps(old))
    plan = load_plan(out)
    assert plan.combiner_workers == 1
    assert "run 'chorus plan' again" in plan.data_path().describe()


def test_workers_on_the_command_line_are_auto_or_a_plain_count():
    assert _workers("auto") is None
    assert _workers("3") == 3
    for bad in ("0", "-1", "abc", "2.5", "", " 2", "+2", "\u0663", "257"):
        with pytest.raises(ValueError):
            _workers(bad)
