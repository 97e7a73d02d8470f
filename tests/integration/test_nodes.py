"""A plan over two nodes served by one Triton per node (``chorus node``) and one combiner that
routes each member to its nodes; and ``regenerate-configs`` switching a running deployment to a
new plan in place, under load. Real tritonservers, as ``chorus node`` starts them."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from combiner.sdk import EnsembleClient, EnsembleError
from combiner.triton.upstream import key_metadata
from orchestrator.deploying.deploy import new_key
from orchestrator.deploying.launch import ManagedProcess, free_port
from orchestrator.deploying.render import render_plan
from orchestrator.deploying.up import combiner_config
from orchestrator.planning.hardware import Device
from orchestrator.planning.plan import Plan
from tests.integration.test_serving import direct_combination

GIB = 1 << 30


@contextmanager
def node(repo: Path, key_file: Path, workdir: Path) -> Iterator[tuple[str, str]]:
    """``chorus node`` on a repository: (gRPC address, HTTP address) once ready."""
    grpc_port, http_port = free_port(), free_port()
    argv = [sys.executable, "-m", "orchestrator", "node", str(repo), "--key-file", str(key_file)]
    argv += ["--grpc-port", str(grpc_port), "--http-port", str(http_port)]
    argv += ["--workdir", str(workdir)]
    process = ManagedProcess("node", argv, workdir / "node.log")
    process.start()
    try:
        _wait(f"http://127.0.0.1:{http_port}/v2/health/ready", process)
        yield f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}"
    finally:
        process.stop()


@contextmanager
def combiner(config: Path, workdir: Path) -> Iterator[str]:
    """``python -m combiner`` on a config file: its gRPC address once it serves."""
    port = free_port()
    argv = [sys.executable, "-m", "combiner", "--config", str(config), "--grpc-port", str(port)]
    process = ManagedProcess("combiner", argv, workdir / "combiner.log")
    process.start()
    try:
        served = config.with_name(config.name + ".served")
        deadline = time.monotonic() + 60
        while not served.is_file():
            assert process.exited() is None, process.log_tail()
            assert time.monotonic() < deadline, process.log_tail()
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        process.stop()


def _wait(url: str, process: ManagedProcess, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.exited() is None, process.log_tail()
        assert time.monotonic() < deadline, process.log_tail()
        try:
            with urllib.request.urlopen(url, timeout=1.0) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)


def inferences(address: str, key: str) -> dict[str, int]:
    """Samples each model has run on a Triton (its statistics)."""
    with grpcclient.InferenceServerClient(address) as client:
        stats = client.get_inference_statistics(headers=dict(key_metadata(key)), as_json=True)
    return {s["name"]: int(s.get("inference_count", 0)) for s in stats.get("model_stats", []) if s}


def two_node_plan(ensemble) -> Plan:
    cpus = tuple(Device(n, "cpu", 0, "cpu", 4 * GIB, 4 * GIB, cores=1) for n in ("node0", "node1"))
    a, b = (d.id for d in cpus)
    instances = {
        "mlp": {a: 1, b: 1},
        "mlp_bagged": {a: 1},
        "cnn": {b: 2},
        "wide_cnn": {a: 1, b: 3},
    }
    return Plan(
        ensemble=ensemble.name,
        devices=cpus,
        planned_memory_bytes={},
        members=tuple(m.name for m in ensemble.members),
        instances=instances,
        max_batch_size={m.name: 16 for m in ensemble.members},
        predicted_throughput=0.0,
    )


def test_two_nodes_answer_like_one_and_split_calls_by_instances(ensemble, tmp_path):
    plan = two_node_plan(ensemble)
    repo = tmp_path / "repository"
    render_plan(ensemble, plan, repo, "python")
    assert sorted(p.name for p in repo.iterdir()) == ["node0", "node1"]
    key = new_key(tmp_path / "triton.key")
    with (
        node(repo / "node0", tmp_path / "triton.key", tmp_path / "n0") as (url0, _),
        node(repo / "node1", tmp_path / "triton.key", tmp_path / "n1") as (url1, _),
    ):
        config = combiner_config(
            ensemble,
            {"node0": url0, "node1": url1},
            plan,
            shared_memory=True,
            key_file=tmp_path / "triton.key",
        )
        path = tmp_path / "combiner.json"
        config.save(path)
        with combiner(path, tmp_path) as address, EnsembleClient(address) as client:
            rng = np.random.default_rng(3)
            for _ in range(40):  # one after another: each request is a batch of its own
                x = rng.random((3, 1, 8, 8), np.float32)
                np.testing.assert_allclose(
                    client.predict(x), direct_combination(ensemble, x), rtol=1e-4, atol=1e-6
                )
        counts = {"node0": inferences(url0, key), "node1": inferences(url1, key)}
    # 40 batches of 3 rows; each member's share of them follows its instances per node
    assert counts["node0"] == {"mlp": 60, "mlp_bagged": 120, "wide_cnn": 30}
    assert counts["node1"] == {"mlp": 60, "cnn": 120, "wide_cnn": 90}


def test_a_node_the_plan_leaves_empty_serves_nothing_and_the_others_answer(ensemble, tmp_path):
    """Every instance on node1: node0's repository is rendered empty, and its ``chorus node``
    still becomes ready (it exited with code 2 before, so a compose deployment failed)."""
    plan = two_node_plan(ensemble)
    b = plan.devices[1].id
    plan = Plan(**{**plan.__dict__, "instances": {m: {b: 1} for m in plan.members}})
    repo = tmp_path / "repository"
    render_plan(ensemble, plan, repo, "python")
    assert [p.name for p in (repo / "node0").iterdir()] == [".chorus-node"]  # no model
    key = new_key(tmp_path / "triton.key")
    with (
        node(repo / "node0", tmp_path / "triton.key", tmp_path / "n0") as (url0, _),
        node(repo / "node1", tmp_path / "triton.key", tmp_path / "n1") as (url1, _),
    ):
        assert "places no model on this node" in (tmp_path / "n0" / "node.log").read_text()
        config = combiner_config(  # shared memory with node0, as compose's combiner has
            ensemble,
            {"node0": url0, "node1": url1},
            plan,
            shared_memory=True,
            key_file=tmp_path / "triton.key",
        )
        path = tmp_path / "combiner.json"
        config.save(path)
        with combiner(path, tmp_path) as address, EnsembleClient(address) as client:
            x = np.random.default_rng(5).random((3, 1, 8, 8), np.float32)
            want = direct_combination(ensemble, x)
            np.testing.assert_allclose(client.predict(x), want, rtol=1e-4, atol=1e-6)
        assert inferences(url0, key) == {}
        assert set(inferences(url1, key)) == set(plan.members)


def test_a_node_repository_that_was_never_rendered_is_refused_by_name(tmp_path):
    """Missing, a file, or a folder with neither a model nor the render's marker (a wrong
    path, a host that never got its part): exit 2 naming it, no empty Triton that passes a
    health check."""
    new_key(tmp_path / "triton.key")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = {"missing": "does not exist", "a-file": "is not a folder", "empty": ".chorus-node"}
    for name, says in cases.items():
        argv = [sys.executable, "-m", "orchestrator", "node", str(tmp_path / name)]
        argv += ["--key-file", str(tmp_path / "triton.key")]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2, (name, done.stdout + done.stderr)
        assert str(tmp_path / name) in done.stderr and says in done.stderr, done.stderr
        assert done.stdout == ""


def test_a_member_stays_served_while_one_of_its_nodes_is_down(ensemble, tmp_path):
    """node1 holds only instances that node0 also has: with node1 gone, every answer still
    comes (from node0), none wrong."""
    plan = two_node_plan(ensemble)
    a, b = (d.id for d in plan.devices)
    instances = {m: {a: 1} for m in plan.members}
    instances["mlp"] = {a: 1, b: 1}
    plan = Plan(**{**plan.__dict__, "instances": instances})
    repo = tmp_path / "repository"
    render_plan(ensemble, plan, repo, "python")
    new_key(tmp_path / "triton.key")
    with node(repo / "node0", tmp_path / "triton.key", tmp_path / "n0") as (url0, _):
        n1 = node(repo / "node1", tmp_path / "triton.key", tmp_path / "n1")
        url1, _ = n1.__enter__()
        config = combiner_config(
            ensemble, {"node0": url0, "node1": url1}, plan, key_file=tmp_path / "triton.key"
        )
        path = tmp_path / "combiner.json"
        config.save(path)
        with combiner(path, tmp_path) as address, EnsembleClient(address) as client:
            x = np.random.default_rng(4).random((2, 1, 8, 8), np.float32)
            want = direct_combination(ensemble, x)
            np.testing.assert_allclose(client.predict(x), want, rtol=1e-4, atol=1e-6)
            n1.__exit__(None, None, None)  # node1 stops
            answered = 0
            for _ in range(20):
                try:
                    got = client.predict(x)
                except EnsembleError as e:  # the call that found node1 gone
                    assert e.code == "UNAVAILABLE", e
                    continue
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
                answered += 1
            assert answered >= 18


HARDWARE = """nodes:
  - name: node0
    devices:
      - {{kind: cpu, cores: {cores}, memory_gb: 16}}
"""


def test_regenerate_configs_switches_a_running_deployment_in_place(
    ensemble_file, ensemble, profile_file, tmp_path
):
    """Plan for 1 core, serve it, then regenerate for 8 cores while clients keep asking:
    every answer is right or UNAVAILABLE, none hangs, and Triton loads the changed members
    only."""
    repo, key_file, config = tmp_path / "repository", tmp_path / "triton.key", tmp_path / "c.json"
    small, large = tmp_path / "small.yaml", tmp_path / "large.yaml"
    small.write_text(HARDWARE.format(cores=1))
    large.write_text(HARDWARE.format(cores=8))

    def regenerate(hardware: Path, *triton: str) -> str:
        argv = [sys.executable, "-m", "orchestrator", "regenerate-configs", str(ensemble_file)]
        argv += ["--repo", str(repo), "--hardware", str(hardware), "--profile", str(profile_file)]
        argv += ["--key-file", str(key_file), "--combiner-config", str(config), "--shared-memory"]
        argv += [f"--triton={t}" for t in triton]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    grpc_port = free_port()
    regenerate(small, f"127.0.0.1:{grpc_port}")  # the first run: nothing runs yet
    before = {m.name: (repo / m.name / "config.pbtxt").read_bytes() for m in ensemble.members}
    argv = [sys.executable, "-m", "orchestrator", "node", str(repo), "--key-file", str(key_file)]
    argv += ["--grpc-port", str(grpc_port), "--http-port", str(http_port := free_port())]
    argv += ["--workdir", str(tmp_path / "n0")]
    triton = ManagedProcess("node", argv, tmp_path / "node.log")
    triton.start()
    try:
        _wait(f"http://127.0.0.1:{http_port}/v2/health/ready", triton)
        with combiner(config, tmp_path) as address:
            results: list[str] = []
            stop = threading.Event()

            def load(seed: int) -> None:
                rng = np.random.default_rng(seed)
                with EnsembleClient(address) as client:
                    while not stop.is_set():
                        x = rng.random((int(rng.integers(1, 40)), 1, 8, 8), np.float32)
                        try:
                            got = client.predict(x, timeout_s=60)
                        except EnsembleError as e:  # the SDK's error for a status
                            results.append(f"StatusCode.{e.code}")
                            continue
                        ok = np.allclose(got, direct_combination(ensemble, x), 1e-4, 1e-6)
                        results.append("ok" if ok else "WRONG")

            threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            out = regenerate(large, f"127.0.0.1:{grpc_port}")
            time.sleep(1.0)
            stop.set()
            for t in threads:
                t.join(90)
                assert not t.is_alive(), "a client hangs"
    finally:
        triton.stop()
    after = {m.name: (repo / m.name / "config.pbtxt").read_bytes() for m in ensemble.members}
    changed = sorted(m for m in before if before[m] != after[m])
    assert changed, out  # the plan for 8 cores differs from the one for 1
    (line,) = [x for x in out.splitlines() if x.startswith("reloaded: ")]
    reloaded = sorted(n for n in line.removeprefix("reloaded: ").split(", "))
    fanout = [n for n in reloaded if n.endswith("__fanout")]
    assert sorted(set(reloaded) - set(fanout)) == changed
    assert "WRONG" not in results
    assert set(results) <= {"ok", "StatusCode.UNAVAILABLE"}, sorted(set(results))
    assert results.count("ok") > 0
