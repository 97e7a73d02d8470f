"""Profiling on the real Triton, and serving what the planner decided."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from combiner.sdk import EnsembleClient
from orchestrator.deploying.render import parse_config
from orchestrator.measuring.measure import batch_sizes
from orchestrator.planning.plan import plan_ensemble
from orchestrator.planning.profile import HOST_COSTS
from tests.integration.test_serving import direct_combination


def test_profile_measures_every_member_at_every_batch_size(ensemble, profile):
    assert set(profile.members) == {m.name for m in ensemble.members}
    for curves in profile.members.values():
        cpu = curves["cpu"]
        assert cpu.batch_sizes == tuple(batch_sizes(64)) == (1, 2, 4, 8, 16, 32, 64)
        assert all(ms > 0 for _, ms in cpu.latency_ms)
        # a Python-backend instance is a process of its own: tens of MiB at least
        assert cpu.memory_bytes > 10 * 2**20
        # Triton's compute statistics: the instance is busy for part of each round trip
        assert [b for b, _ in cpu.service_ms] == list(cpu.batch_sizes)
        assert all(0 < cpu.service(b) <= cpu.latency(b) for b in cpu.batch_sizes)
        assert [b for b, _ in cpu.cpu_ms] == list(cpu.batch_sizes)
        assert sum(ms for _, ms in cpu.cpu_ms) > 0  # CPU is counted in ticks: not per point
    # through the combiner, requests of the ensemble's maximum batch size
    assert profile.host is not None and profile.host.rows == 64
    host = profile.host
    # a busy host may leave a cost unmeasured (the difference of noisy windows): then it says
    # why, and never gives a negative number
    reasons = dict(host.unmeasured)
    for name in HOST_COSTS:
        value = getattr(host, name)
        assert (value is None and reasons[name]) or (value is not None and value >= 0), name
    assert host.client_cpu_ms is not None and host.client_cpu_ms > 0  # measured, not derived
    # the serving processes' busy time over what other processes left of the cores: at most all
    assert host.busy_share is None or 0.5 <= host.busy_share <= 1


def test_the_served_plan_splits_requests_over_member_batch_limits(
    ensemble, deployment, endpoints, served_plan
):
    repo = deployment.workdir / "repository"
    cnn = parse_config((repo / "cnn" / "config.pbtxt").read_text(), "cnn")
    assert cnn.max_batch_size == 8 and cnn.instance_group[0].count == 2
    x = np.random.default_rng(5).random((64, 1, 8, 8), dtype=np.float32)
    with EnsembleClient(endpoints.ensemble) as client:
        np.testing.assert_allclose(
            client.predict(x), direct_combination(ensemble, x), rtol=1e-4, atol=1e-6
        )


def test_plan_cli_from_the_measured_profile_fits_this_machine(
    ensemble_file, profile_file, profile, ensemble
):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "plan",
            str(ensemble_file),
            "--profile",
            str(profile_file),
            "--time-limit",
            "0",  # the whole search, as below: under a time budget a busy host plans less
            "--json",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["members"] == [m.name for m in ensemble.members]
    (cpu,) = plan["devices"]
    assert cpu["kind"] == "cpu" and 0 < cpu["planned_memory_bytes"] <= cpu["memory_bytes"]
    assert plan["predicted_throughput"] > 0
    direct = plan_ensemble(
        ensemble.name,
        plan["members"],
        64,
        profile,
        __import__("orchestrator.planning.hardware").planning.hardware.discover(),
        time_limit_s=None,
    )
    assert direct.instances == plan["instances"]


def test_tune_measures_candidates_on_the_live_triton_and_keeps_the_best(
    ensemble, profile, tmp_path
):
    from orchestrator.measuring.tune import tune
    from orchestrator.planning.hardware import discover
    from orchestrator.planning.plan import load_plan

    start = plan_ensemble(
        ensemble.name, [m.name for m in ensemble.members], 64, profile, discover()
    )
    result = tune(
        ensemble,
        start,
        profile,
        tmp_path / "work",
        tmp_path / "checkpoint.json",
        tmp_path / "plan.json",
        budget=3,
        seconds=0.5,
        show_progress=False,
    )
    assert result.measurements == len(result.history) == 3
    assert result.measured == max(got for _, _, got in result.history) > 0
    checkpoint = json.loads((tmp_path / "checkpoint.json").read_text())
    assert len(checkpoint["measurements"]) == 3
    assert checkpoint["measurements"][1]["change"] != "unchanged"
    assert load_plan(tmp_path / "plan.json").to_dict() == result.plan.to_dict()
    # the candidates were applied to the live server: the repository holds the last one applied
    final = parse_config(
        (tmp_path / "work" / "repository" / "cnn" / "config.pbtxt").read_text(), "cnn"
    )
    assert final.max_batch_size == result.plan.max_batch_size["cnn"]
