"""The planner on synthetic profiles: no server, no GPU."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

from orchestrator.errors import InfeasibleError, SpecError
from orchestrator.planning.allocate import (
    evaluate,
    evaluate_moves,
    exhaustive,
    greedy,
    member_latency,
    moves,
    problem,
    sequential_throughput,
    worst_fit,
)
from orchestrator.planning.files import read_json, read_yaml
from orchestrator.planning.hardware import Device
from orchestrator.planning.plan import load_plan, make_plan, plan_ensemble
from orchestrator.planning.profile import Curve, Profile
from tests.cli import chorus

GB = 10**9
SIZES = (1, 2, 4, 8, 16, 32, 64)


def gpus(count: int, memory_gb: float = 32, speed: float = 1.0, first: int = 0) -> list[Device]:
    mem = int(memory_gb * GB)
    return [Device("node0", "gpu", first + i, "gpu", mem, mem, speed=speed) for i in range(count)]


def curve(
    memory_gb: float, fixed_ms: float = 5.0, per_sample_ms: float = 0.5, per_sample_mb: float = 20
) -> Curve:
    return Curve(
        int(memory_gb * GB),
        int(per_sample_mb * 1e6),
        tuple((b, fixed_ms + per_sample_ms * b) for b in SIZES),
    )


def plan_of(
    members: dict[str, Curve],
    devices: list[Device],
    max_batch: int = 64,
    cpu: dict[str, Curve] | None = None,
):
    profile = Profile(
        {m: {"gpu": c, **({"cpu": cpu[m]} if cpu else {})} for m, c in members.items()}
    )
    return plan_ensemble("e", list(members), max_batch, profile, devices)


def used_per_device(plan, members):
    used = {d.id: 0 for d in plan.devices}
    for m, per in plan.instances.items():
        for device_id, count in per.items():
            used[device_id] += count * members[m].memory(plan.max_batch_size[m])
    return used


def test_twelve_heavy_members_fit_onto_four_32gb_gpus_without_oversubscribing():
    rng = np.random.default_rng(0)
    members = {
        f"m{i}": curve(rng.uniform(5, 14), rng.uniform(2, 10), rng.uniform(0.1, 1))
        for i in range(12)
    }
    plan = plan_of(members, gpus(4))
    assert all(sum(plan.instances[m].values()) >= 1 for m in members)
    for device in plan.devices:
        used = used_per_device(plan, members)[device.id]
        assert used <= device.memory_bytes
        assert used == plan.planned_memory_bytes[device.id]
    assert plan.predicted_throughput > 0


def test_one_member_onto_sixteen_gpus_runs_everywhere_about_sixteen_times_faster():
    members = {"big": curve(10)}
    one = plan_of(members, gpus(1))
    sixteen = plan_of(members, gpus(16))
    assert sorted(sixteen.instances["big"]) == sorted(d.id for d in sixteen.devices)
    assert sixteen.predicted_throughput == pytest.approx(16 * one.predicted_throughput, rel=0.02)


def test_faster_devices_carry_more_and_the_heavier_member_gets_the_fastest_gpu():
    # one instance fits on the fast GPU; the heavy member (4x the latency) belongs there
    members = {"heavy": curve(10, fixed_ms=20, per_sample_ms=2), "light": curve(10)}
    devices = [*gpus(1, memory_gb=24, speed=1.0), *gpus(1, memory_gb=12, speed=4.0, first=1)]
    plan = plan_of(members, devices)
    assert plan.instances["heavy"].get("node0/gpu1") == 1
    assert "node0/gpu1" not in plan.instances["light"]
    p = problem(list(members), Profile({m: {"gpu": c} for m, c in members.items()}), devices, 64)
    assert plan.predicted_throughput == pytest.approx(exhaustive(p).throughput, rel=1e-6)


def test_a_cpu_beside_gpus_is_used_according_to_its_lanes_and_speed():
    members = {"m": curve(2)}
    slow_cpu = {"m": curve(2, fixed_ms=50, per_sample_ms=5)}
    cpu = Device("node0", "cpu", 0, "cpu", 64 * GB, 64 * GB, cores=4, lanes=4)
    with_cpu = plan_of(members, [*gpus(2, speed=1.0), cpu], cpu=slow_cpu)
    without = plan_of(members, gpus(2))
    assert with_cpu.instances["m"].get("node0/cpu0", 0) >= 1
    assert with_cpu.predicted_throughput > without.predicted_throughput
    cpu_rate = 64 / (slow_cpu["m"].latency(64) / 1000)
    assert with_cpu.predicted_throughput <= without.predicted_throughput + 4 * cpu_rate + 1e-6


def test_a_member_bigger_than_every_device_is_infeasible_with_the_numbers():
    members = {"small": curve(4), "huge": curve(40)}
    with pytest.raises(InfeasibleError) as e:
        plan_of(members, gpus(2, memory_gb=32))
    text = str(e.value)
    assert "'huge'" in text and "37.27 GiB (40020000000 bytes)" in text
    assert "largest free device memory is 29.80 GiB (32000000000 bytes)" in text


def test_a_member_measured_only_from_batch_2_is_placed_and_planned():
    """A curve may start above the smallest batch size another member was measured at: that
    member's smallest batch is its own. Worst-fit read every member at the overall smallest
    one, found none runnable and said the member 'needs -0.00 GiB (-1 bytes)'."""
    late = curve(4)
    late = Curve(late.memory_bytes, late.memory_per_sample_bytes, late.latency_ms[1:])  # from 2
    members = {"small": curve(4), "late": late}
    p = problem(list(members), Profile({m: {"gpu": c} for m, c in members.items()}), gpus(2), 64)
    n, b = worst_fit(p)
    assert n.sum(axis=1).tolist() == [1, 1]
    assert p.batch_sizes[b[1]] >= 2 and p.rate[1, n[1].argmax(), b[1]] > 0
    plan = plan_of(members, gpus(2))
    assert plan.max_batch_size["late"] >= 2 and plan.predicted_throughput > 0


def test_a_member_that_fits_nowhere_at_its_own_smallest_batch_is_named_with_its_numbers():
    big = curve(40)
    big = Curve(big.memory_bytes, big.memory_per_sample_bytes, big.latency_ms[2:])  # from 4
    with pytest.raises(InfeasibleError) as e:
        plan_of({"small": curve(4), "big": big}, gpus(2, memory_gb=32))
    text = str(e.value)
    assert "'big' needs 37.33 GiB (40080000000 bytes) for one instance at batch size 4" in text


def test_planning_is_deterministic():
    rng = np.random.default_rng(3)
    members = {f"m{i}": curve(rng.uniform(1, 8), rng.uniform(1, 9)) for i in range(5)}
    devices = [*gpus(2), *gpus(1, memory_gb=16, speed=2.0, first=2)]
    assert plan_of(members, devices).to_json() == plan_of(members, devices).to_json()


def fast_and_full(p, n: np.ndarray, b: np.ndarray):
    """Every move from (n, b), evaluated incrementally and each in full."""
    mv = moves(n, b, len(p.batch_sizes))
    each = [mv.apply(k, n, b) for k in range(len(mv))]
    full = evaluate(p, np.stack([x[0] for x in each]), np.stack([x[1] for x in each]))
    return evaluate_moves(p, n, b, mv), full


def test_incremental_evaluation_of_moves_equals_full_evaluation():
    rng = np.random.default_rng(7)
    members = {f"m{i}": curve(rng.uniform(1, 12), rng.uniform(1, 9)) for i in range(4)}
    p = problem(
        list(members),
        Profile({m: {"gpu": c} for m, c in members.items()}),
        gpus(3, memory_gb=24),
        64,
    )
    for _ in range(5):
        n = rng.integers(0, 3, (4, 3))
        n[:, 0] += n.sum(axis=1) == 0
        b = rng.integers(0, len(p.batch_sizes), 4)
        fast, full = fast_and_full(p, n, b)
        np.testing.assert_array_equal(fast.feasible, full.feasible)
        ok = full.feasible
        np.testing.assert_allclose(fast.throughput[ok], full.throughput[ok], rtol=1e-9)
        np.testing.assert_array_equal(fast.binding[ok], full.binding[ok])
        np.testing.assert_allclose(fast.congestion[ok], full.congestion[ok], rtol=1e-6)


def test_incremental_evaluation_checks_the_latency_target_as_the_full_one_does():
    rng = np.random.default_rng(8)
    members = {f"m{i}": curve(rng.uniform(1, 6), rng.uniform(1, 9)) for i in range(3)}
    profile = Profile({m: {"gpu": c} for m, c in members.items()})
    p = problem(list(members), profile, gpus(3, memory_gb=24), 64, latency_target_ms=60)
    rejected = 0
    for _ in range(8):
        n = rng.integers(0, 3, (3, 3))
        n[:, 0] += n.sum(axis=1) == 0
        b = rng.integers(0, len(p.batch_sizes), 3)
        fast, full = fast_and_full(p, n, b)
        np.testing.assert_array_equal(fast.feasible, full.feasible)
        rejected += int((~full.feasible).sum())
    assert rejected > 0  # the target did bind somewhere


def test_the_paper_baseline_never_oversubscribes_a_device():
    """One instance each, at the batch size best for it among those that still fit beside
    the others: on tight random devices, the memory it plans never exceeds a device's."""
    rng = np.random.default_rng(5)
    for _ in range(30):
        members = {
            f"m{i}": curve(rng.uniform(1, 5), rng.uniform(1, 9), rng.uniform(0.05, 1), 200)
            for i in range(6)
        }
        p = problem(
            list(members),
            Profile({m: {"gpu": c} for m, c in members.items()}),
            gpus(3, memory_gb=rng.uniform(12, 20)),
            64,
        )
        n, b = worst_fit(p)
        assert (n.sum(axis=1) == 1).all()
        memory = p.memory.transpose(0, 2, 1)[np.arange(len(members)), b]
        assert ((n * memory).sum(axis=0) <= p.capacity).all()
        assert evaluate(p, n[None], b[None]).feasible[0]
        concurrent = evaluate(p, n[None], b[None]).throughput[0]
        sequential = sequential_throughput(p, n, b)
        assert 0 < sequential < concurrent


def test_with_a_latency_target_no_member_waits_longer_than_it():
    rng = np.random.default_rng(9)
    members = {
        f"m{i}": curve(rng.uniform(1, 4), rng.uniform(2, 9), rng.uniform(0.2, 1)) for i in range(4)
    }
    profile = Profile({m: {"gpu": c} for m, c in members.items()})
    devices = gpus(2, memory_gb=16)
    free = greedy(problem(list(members), profile, devices, 64))
    p_free = problem(list(members), profile, devices, 64)
    slowest = member_latency(p_free, free.instances, free.batch, free.throughput).max()
    target_ms = slowest * 1000 / 3  # well below what the unconstrained plan needs
    p = problem(list(members), profile, devices, 64, latency_target_ms=target_ms)
    bound = greedy(p)
    assert bound.throughput > 0
    latency = member_latency(p, bound.instances, bound.batch, bound.throughput)
    assert (latency <= target_ms / 1000 * (1 + 1e-9)).all()
    assert bound.throughput <= free.throughput * (1 + 1e-9)


def test_an_unreachable_latency_target_is_infeasible_with_the_numbers():
    members = {"m": curve(2, fixed_ms=20)}
    with pytest.raises(InfeasibleError, match=r"latency target of 5 ms.*'m'.*20\.5 ms"):
        plan_ensemble(
            "e",
            ["m"],
            64,
            Profile({"m": {"gpu": members["m"]}}),
            gpus(1),
            latency_target_ms=5,
        )


def test_the_search_matches_the_exact_optimum_on_small_cases():
    rng = np.random.default_rng(21)
    for _ in range(12):
        members = {
            f"m{i}": curve(
                rng.uniform(1, 6), rng.uniform(1, 9), rng.uniform(0.05, 1), rng.uniform(1, 50)
            )
            for i in range(2)
        }
        p = problem(
            list(members),
            Profile({m: {"gpu": c} for m, c in members.items()}),
            gpus(2, memory_gb=rng.uniform(6, 16)),
            16,
        )
        best = exhaustive(p, max_instances=3)
        found = greedy(p)
        assert found.throughput >= best.throughput * (1 - 1e-9)


def test_greedy_never_oversubscribes_and_beats_worst_fit_alone():
    rng = np.random.default_rng(11)
    for _ in range(10):
        members = {
            f"m{i}": curve(
                rng.uniform(1, 6), rng.uniform(1, 9), rng.uniform(0.05, 1), rng.uniform(1, 50)
            )
            for i in range(3)
        }
        p = problem(
            list(members),
            Profile({m: {"gpu": c} for m, c in members.items()}),
            gpus(2, memory_gb=rng.uniform(8, 24)),
            64,
        )
        start = worst_fit(p)
        result = greedy(p)
        plan = make_plan("e", p, result)
        for d in plan.devices:
            assert plan.planned_memory_bytes[d.id] <= d.free_bytes
        assert result.throughput >= evaluate(p, start[0][None], start[1][None]).throughput[0]


def test_plan_json_round_trips_with_the_documented_fields(tmp_path):
    plan = plan_of({"a": curve(3), "b": curve(5)}, gpus(2))
    data = plan.to_dict()
    assert set(data) >= {
        "ensemble",
        "devices",
        "members",
        "instances",
        "max_batch_size",
        "predicted_throughput",
    }
    assert set(data["devices"][0]) >= {
        "id",
        "node",
        "kind",
        "index",
        "memory_bytes",
        "planned_memory_bytes",
    }
    (tmp_path / "plan.json").write_text(plan.to_json())
    assert load_plan(tmp_path / "plan.json").to_json() == plan.to_json()


@pytest.fixture
def planning_files(tmp_path):
    """An ensemble whose member files do not exist, a profile and a 2-node hardware file."""
    (tmp_path / "ensemble.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "big",
                "members": [
                    {"name": "a", "path": "absent/a.onnx"},
                    {"name": "b", "path": "absent/b.onnx"},
                ],
            }
        )
    )
    profile = {
        "members": {
            m: {
                "gpu": {
                    "memory_bytes": mem,
                    "memory_per_sample_bytes": 10**6,
                    "latency_ms": {"1": 5.0, "8": 9.0, "64": 40.0},
                }
            }
            for m, mem in (("a", 5 * GB), ("b", 9 * GB))
        }
    }
    (tmp_path / "profile.json").write_text(__import__("json").dumps(profile))
    (tmp_path / "hw.yaml").write_text(
        yaml.safe_dump(
            {
                "nodes": [
                    {"name": "n0", "devices": [{"kind": "gpu", "index": 0, "memory_gb": 16}]},
                    {
                        "name": "n1",
                        "devices": [{"kind": "gpu", "index": 0, "memory_gb": 16, "speed": 2.0}],
                    },
                ]
            }
        )
    )
    return tmp_path


def plan_cli(d, *more: str):
    """`chorus plan` on the fixture's files."""
    return chorus(
        "plan",
        str(d / "ensemble.yaml"),
        "--profile",
        str(d / "profile.json"),
        "--hardware",
        str(d / "hw.yaml"),
        *more,
    )


def test_plan_cli_prints_json_for_another_machine_without_the_models(planning_files):
    d = planning_files
    result = plan_cli(d, "--json", "-o", str(d / "plan.json"))
    assert result.returncode == 0, result.stderr
    plan = __import__("json").loads(result.stdout)
    assert plan["members"] == ["a", "b"]
    assert {dev["id"] for dev in plan["devices"]} == {"n0/gpu0", "n1/gpu0"}
    assert all(sum(v.values()) >= 1 for v in plan["instances"].values())
    assert plan["predicted_throughput"] > 0
    assert load_plan(d / "plan.json").to_dict() == plan


def test_plan_cli_exits_3_when_a_member_fits_nowhere(planning_files):
    d = planning_files
    (d / "hw.yaml").write_text(
        yaml.safe_dump({"nodes": [{"name": "n0", "devices": [{"kind": "gpu", "memory_gb": 8}]}]})
    )
    result = plan_cli(d)
    assert result.returncode == 3, result.stderr
    assert "'b'" in result.stderr and "8.38 GiB" in result.stderr
    assert "largest free device memory is 8.00 GiB" in result.stderr.replace("\n", " ")


@pytest.mark.parametrize(
    ("file", "edit", "key"),
    [
        # a profile merged by hand with member 'a' twice: the last one had silently won
        ("profile.json", lambda t: t.replace('{"members": {', '{"members": {"a": {}, ', 1), "a"),
        ("ensemble.yaml", lambda t: t + "combine: {rule: max}\ncombine: {rule: mean}\n", "combine"),
        (
            "hw.yaml",
            lambda t: t.replace("memory_gb: 16", "memory_gb: 16\n    memory_gb: 8", 1),
            "memory_gb",
        ),
    ],
    ids=["profile", "ensemble", "hardware"],
)
def test_plan_cli_refuses_a_key_given_twice_naming_it(planning_files, file, edit, key):
    d = planning_files
    (d / file).write_text(edit((d / file).read_text()))
    result = plan_cli(d)
    assert result.returncode == 2, result.stderr
    text = " ".join(result.stderr.split())
    assert file in text and f"key '{key}' is given twice" in text, text


def test_a_key_twice_deep_in_a_profile_is_named_by_its_path_each_time(planning_files):
    """Every curve has a batch size '1': the message says which curve, and every key twice."""
    d = planning_files
    text = (d / "profile.json").read_text()
    text = text.replace('"latency_ms": {"1": 5.0', '"latency_ms": {"1": 4.0, "1": 5.0', 1)
    (d / "profile.json").write_text(text.replace('{"members": {', '{"members": {"b": {}, ', 1))
    result = plan_cli(d)
    assert result.returncode == 2, result.stderr
    text = " ".join(result.stderr.split())
    assert "key 'b' is given twice in members" in text, text
    assert "key '1' is given twice in members.a.gpu.latency_ms" in text, text


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"name: e\n? [a, b]\n: 1\n", "found unhashable key"),  # PyYAML's own error, exit 2
        (b"name: caf\xe9\n", "not UTF-8 text"),
        # PyYAML kept one of the two merges and dropped the other without a word
        (b"a: &a {x: 1}\nb: &b {y: 2}\nname: {<<: *a, <<: *b}\n", "'<<' is given twice"),
        # had been a RecursionError traceback; libyaml's parser stops at 1,000 levels
        (b"[" * 100_000, "exceeded maximum nesting depth"),
        # found by a hostile review: ValueError tracebacks, exit 1
        (b"name: e\nserving: {max_batch_size: " + b"9" * 5000 + b"}\n", "value has 5000 digits"),
        (b"name: e\nwhen: 2001-13-01\n", "month must be in 1..12"),
    ],
    ids=["unhashable key", "latin-1", "two merge keys", "deep nesting", "huge int", "bad date"],
)
def test_an_ensemble_file_yaml_cannot_read_is_refused_not_a_traceback(
    planning_files, content, says
):
    d = planning_files
    (d / "ensemble.yaml").write_bytes(content)
    result = plan_cli(d)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_profile_with_an_integer_python_does_not_convert_is_refused(planning_files):
    """Found by a hostile review: json.loads raises a ValueError (not a JSONDecodeError) for
    an integer past 4300 digits; that had been a traceback and exit 1."""
    d = planning_files
    (d / "profile.json").write_text('{"members": ' + "9" * 5000 + "}")
    result = plan_cli(d)
    assert result.returncode == 2, result.stderr
    assert "profile.json" in result.stderr and "value has 5000 digits" in result.stderr
    assert "Traceback" not in result.stderr and "set_int_max_str_digits" not in result.stderr


def test_a_batch_size_written_two_ways_in_a_profile_is_refused(planning_files):
    """Found by a hostile review: pydantic reads "01" as 1, so {"1": 4.0, "01": 5.0} passed
    the duplicate check and kept 5.0."""
    d = planning_files
    text = (d / "profile.json").read_text()
    (d / "profile.json").write_text(text.replace('{"1": 5.0', '{"1": 4.0, "01": 5.0', 1))
    result = plan_cli(d)
    assert result.returncode == 2, result.stderr
    text = " ".join(result.stderr.split())
    assert "members.a.gpu.latency_ms" in text and "batch size '01'" in text, text


def test_a_merge_inside_a_merged_mapping_reads_as_pyyaml_reads_it(tmp_path):
    """The duplicate check sees each mapping as written, before a merge rewrites it: the key
    'x' is given once in the mapping &b (it had been refused as given twice)."""
    text = "c:\n  <<: &b\n    <<: {x: 1}\n    x: 2\nd: *b\n"
    (tmp_path / "f.yaml").write_text(text)
    assert read_yaml(tmp_path / "f.yaml") == yaml.safe_load(text)


def test_a_file_that_cannot_be_opened_is_named_with_why(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for path, says in [
        (tmp_path / "f.yaml" / "x", "Not a directory"),
        (tmp_path / "loop", "symbolic links"),
        (tmp_path / ("x" * 300), "too long"),
    ]:
        (tmp_path / "f.yaml").write_text("a: 1\n")
        with pytest.raises(SpecError, match=says):
            read_yaml(path)


def test_many_keys_twice_make_a_bounded_error(tmp_path):
    (tmp_path / "p.json").write_text("[" + ",".join(['{"a": 1, "a": 2}'] * 5000) + "]")
    with pytest.raises(SpecError) as e:
        read_json(tmp_path / "p.json")
    assert "key 'a' is given twice in [9]; and 4990 more" in str(e.value)
    assert len(str(e.value)) < 1000


def test_a_plan_file_with_a_key_twice_is_refused(planning_files):
    d = planning_files
    assert plan_cli(d, "-o", str(d / "plan.json")).returncode == 0
    text = (d / "plan.json").read_text()
    (d / "plan.json").write_text(text.replace('"ensemble": ', '"ensemble": "x", "ensemble": ', 1))
    with pytest.raises(SpecError, match="key 'ensemble' is given twice"):
        load_plan(d / "plan.json")


def _devices_like(device: dict, count: int) -> list[dict]:
    return [
        {**device, "index": i, "id": f"{device['node']}/{device['kind']}{i}"} for i in range(count)
    ]


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda p: p["max_batch_size"].update(a=float("nan")), "max_batch_size.a"),
        (lambda p: p["max_batch_size"].update(a=0), "max_batch_size.a"),
        (lambda p: p["instances"]["a"].update({p["devices"][0]["id"]: 1.5}), "instances.a"),
        (lambda p: p["instances"]["a"].update({p["devices"][0]["id"]: -1}), "instances.a"),
        (lambda p: p["instances"]["a"].update({"node9/gpu3": 1}), "no device node9/gpu3"),
        (lambda p: p["instances"].pop("a"), "instances: names members"),
        (lambda p: p.update(predicted_throughput=float("inf")), "predicted_throughput"),
        (lambda p: p.update(predicted_throughput="fast"), "predicted_throughput"),
        (lambda p: p["devices"][0].update(memory_bytes=-5), "devices[0].memory_bytes"),
        (lambda p: p.update(members=[*p["members"], "a"]), "named twice"),
        (lambda p: p["devices"].append(p["devices"][0]), "listed twice"),
        (lambda p: p["devices"][0].update(node=".."), "devices[0].node"),  # a folder outside
        (lambda p: p["devices"][0].update(speed="2"), "devices[0].speed"),
        (lambda p: p["devices"][0].update(index=True), "devices[0].index"),
        (lambda p: p["instances"]["a"].update({p["devices"][0]["id"]: 2**31}), "instances.a"),
        (lambda p: p["devices"][0].update(node="n" * 300), "devices[0].node"),
        (lambda p: p.update(devices=_devices_like(p["devices"][0], 12) * 2), "and 2 more listed"),
    ],
    ids=[
        "NaN batch",
        "batch 0",
        "fractional count",
        "negative count",
        "unknown device",
        "member without instances",
        "infinite throughput",
        "string throughput",
        "negative memory",
        "member twice",
        "device twice",
        "node ..",
        "speed as text",
        "index true",
        "count beyond int32",
        "node name of 300",
        "many devices twice",
    ],
)
def test_a_plan_edited_into_nonsense_is_refused_naming_the_field(planning_files, edit, says):
    """Found by a hostile review: a NaN batch size or a string throughput in a plan passed to
    chorus up --plan got into the rendered configs, or ended in a ValueError traceback."""
    d = planning_files
    assert plan_cli(d, "-o", str(d / "plan.json")).returncode == 0
    data = json.loads((d / "plan.json").read_text())
    edit(data)
    (d / "plan.json").write_text(json.dumps(data))
    with pytest.raises(SpecError, match=re.escape(says)):
        load_plan(d / "plan.json")


def test_a_plan_with_more_instances_than_a_thousand_loads(tmp_path):
    """What the planner writes, the loader reads: 2,049 instances of one small member on a CPU
    of 2,048 lanes (a bound of 1,024 had refused it)."""
    cpu = Device("n0", "cpu", 0, "cpu", 64 * GB, 64 * GB, cores=2048, lanes=2048)
    profile = Profile({"a": {"cpu": curve(0.01, fixed_ms=5)}})
    plan = plan_ensemble("e", ["a"], 64, profile, (cpu,), evaluations=2000, time_limit_s=None)
    (tmp_path / "plan.json").write_text(plan.to_json())
    assert load_plan(tmp_path / "plan.json").instances == plan.instances


def test_plan_cli_exits_2_on_a_bad_hardware_file(planning_files):
    d = planning_files
    (d / "hw.yaml").write_text(
        yaml.safe_dump({"nodes": [{"name": "n0", "devices": [{"kind": "tpu", "memory_gb": 8}]}]})
    )
    result = plan_cli(d)
    assert result.returncode == 2
    assert "nodes[0].devices[0].kind" in result.stderr


def test_plan_cli_draws_the_allocation_matrix(planning_files):
    d = planning_files
    result = plan_cli(d, "--png", str(d / "plan.png"))
    assert result.returncode == 0, result.stderr
    png = (d / "plan.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5_000
    assert "samples/s" in result.stdout and "requests/s" not in result.stdout
    assert "predicted latency ms" in result.stdout


def test_plan_cli_names_devices_the_profile_cannot_plan_and_borrows_on_request(planning_files):
    """Two GPUs and a CPU, a profile measured on the CPU only: the GPUs are named as left
    empty, with how to plan them; nothing from numpy reaches the user."""
    d = planning_files
    profile = __import__("json").loads((d / "profile.json").read_text())
    for curves in profile["members"].values():
        curves["cpu"] = curves.pop("gpu")
    (d / "profile.json").write_text(__import__("json").dumps(profile))
    (d / "hw.yaml").write_text(
        yaml.safe_dump(
            {
                "nodes": [
                    {
                        "name": "n0",
                        "devices": [
                            {"kind": "gpu", "index": 0, "memory_gb": 16, "speed": 4.0},
                            {"kind": "gpu", "index": 1, "memory_gb": 16, "speed": 4.0},
                            {"kind": "cpu", "cores": 8, "memory_gb": 64},
                        ],
                    }
                ]
            }
        )
    )
    result = plan_cli(d, "--json")
    assert result.returncode == 0, result.stderr
    err = " ".join(result.stderr.split())
    for gpu in ("n0/gpu0", "n0/gpu1"):
        assert f"{gpu}: {d / 'profile.json'} has no curve for a, b on it (left empty)" in err
    assert "chorus profile" in err and "--borrow-curves" in err
    assert "Warning" not in result.stderr
    plan = __import__("json").loads(result.stdout)
    assert all(set(v) == {"n0/cpu0"} for v in plan["instances"].values())

    borrowed = plan_cli(d, "--json", "--borrow-curves")
    assert borrowed.returncode == 0, borrowed.stderr
    assert "no curve" not in borrowed.stderr and "Warning" not in borrowed.stderr
    plan = __import__("json").loads(borrowed.stdout)
    used = {dev for v in plan["instances"].values() for dev in v}
    assert used & {"n0/gpu0", "n0/gpu1"}


def test_a_latency_target_in_the_ensemble_file_bounds_every_member(planning_files):
    d = planning_files
    free = __import__("json").loads(plan_cli(d, "--json").stdout)
    slowest = max(free["predicted_latency_ms"].values())
    spec = yaml.safe_load((d / "ensemble.yaml").read_text())
    spec["serving"] = {"max_batch_size": 64, "latency_target_ms": round(slowest / 2, 3)}
    (d / "ensemble.yaml").write_text(yaml.safe_dump(spec))
    result = plan_cli(d, "--json")
    assert result.returncode == 0, result.stderr
    plan = __import__("json").loads(result.stdout)
    assert plan["latency_target_ms"] == round(slowest / 2, 3)
    assert max(plan["predicted_latency_ms"].values()) <= slowest / 2 + 1e-6

    spec["serving"]["latency_target_ms"] = 1.0  # below one batch of 1 (5 ms)
    (d / "ensemble.yaml").write_text(yaml.safe_dump(spec))
    result = plan_cli(d)
    assert result.returncode == 3
    assert "latency target of 1 ms" in " ".join(result.stderr.split())


def _cpu_problem(host_cpu_ms: float, rng_seed: int = 4, cores: int = 4, **serving):
    """Members on one 4-core CPU, with Triton's CPU per call and the combiner's per request
    measured, as chorus profile writes them (``serving``: more of what it measures)."""
    from orchestrator.planning.profile import Host

    rng = np.random.default_rng(rng_seed)
    members = {}
    for i in range(3):
        fixed, per = rng.uniform(1, 4), rng.uniform(0.02, 0.2)
        members[f"m{i}"] = Curve(
            int(GB),
            10**6,
            tuple((b, fixed + per * b) for b in SIZES),  # round trip
            tuple((b, 0.3 * fixed + per * b) for b in SIZES),  # busy time of the instance
            tuple((b, 0.4 * fixed + per * b) for b in SIZES),  # Triton's CPU per call
        )
    host = Host(64, host_cpu_ms, 0.5, 2.0, **serving)
    profile = Profile({m: {"cpu": c} for m, c in members.items()}, host)
    cpu = Device("node0", "cpu", 0, "cpu", 64 * GB, 64 * GB, cores=cores, lanes=cores)
    return problem(list(members), profile, [cpu], 64)


def test_incremental_evaluation_counts_cpu_as_the_full_one_does():
    p = _cpu_problem(host_cpu_ms=3.0)
    rng = np.random.default_rng(2)
    for _ in range(5):
        n = rng.integers(1, 4, (3, 1))
        b = rng.integers(0, len(p.batch_sizes), 3)
        fast, full = fast_and_full(p, n, b)
        ok = full.feasible
        np.testing.assert_array_equal(fast.feasible, full.feasible)
        np.testing.assert_allclose(fast.throughput[ok], full.throughput[ok], rtol=1e-9)
        np.testing.assert_array_equal(fast.binding[ok], full.binding[ok])


def test_the_cpu_that_serving_takes_lowers_the_prediction_and_caps_more_instances():
    light, heavy = _cpu_problem(host_cpu_ms=0.0), _cpu_problem(host_cpu_ms=20.0)
    n = np.ones((3, 1), dtype=np.int64)
    b = np.full(3, len(light.batch_sizes) - 1)
    t_light = evaluate(light, n[None], b[None]).throughput[0]
    t_heavy = evaluate(heavy, n[None], b[None]).throughput[0]
    assert t_heavy < t_light
    # CPU-bound: the cores are the limit, so more instances buy nothing
    more = evaluate(heavy, (4 * n)[None], b[None]).throughput[0]
    need = sum(heavy.cpu[m, 0, -1] for m in range(3)) + heavy.host_cpu
    assert more == pytest.approx(4 / need, rel=1e-9)
    assert t_heavy <= more + 1e-9
    # the busy time, not the round trip, bounds an instance: more than b / latency per second
    assert light.call_rate is not None
    assert light.rate[0, 0, -1] > light.call_rate[0, 0, -1]


def test_profile_files_keep_what_chorus_profile_measures(tmp_path):
    from orchestrator.planning.profile import Host, load_profile, save_profile

    p = _cpu_problem(host_cpu_ms=3.0)
    assert p.host_cpu > 0 and p.host_latency == pytest.approx(0.002)
    profile = Profile(
        {"m": {"cpu": Curve(1, 2, ((1, 2.0), (8, 4.0)), ((1, 1.0), (8, 3.0)), ((1, 1.5),))}},
        Host(64, 1.25, 0.5, 2.0, call_cpu_ms=-0.125, sequential_call_ms=0.25, busy_share=0.875),
    )
    save_profile(profile, tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json") == profile
    older = Profile(profile.members, Host(64, 1.25, 0.5, 2.0))  # what serving adds: optional
    save_profile(older, tmp_path / "older.json")
    assert load_profile(tmp_path / "older.json") == older


def test_the_cores_serving_keeps_busy_bound_a_cpu_bound_ensemble():
    all_cores = _cpu_problem(host_cpu_ms=20.0)
    three = _cpu_problem(host_cpu_ms=20.0, busy_share=0.75)
    assert all_cores.lanes[0] == 4 and three.lanes[0] == 3
    n = np.full((3, 1), 4, dtype=np.int64)  # enough instances: the cores are the limit
    b = np.full(3, len(three.batch_sizes) - 1)
    t_all = evaluate(all_cores, n[None], b[None]).throughput[0]
    t_three = evaluate(three, n[None], b[None]).throughput[0]
    assert t_three == pytest.approx(0.75 * t_all, rel=1e-9)
    # a share, not a count: the same share of a larger CPU measured here
    larger = _cpu_problem(host_cpu_ms=20.0, busy_share=0.75, cores=16)
    assert larger.lanes[0] == 12


def test_what_a_call_costs_when_serving_corrects_each_calls_cpu():
    measured = _cpu_problem(host_cpu_ms=3.0)
    cheaper = _cpu_problem(host_cpu_ms=3.0, call_cpu_ms=-0.5)
    sizes = np.array(measured.batch_sizes, dtype=float)
    # per sample: (Triton's CPU per call - 0.5 ms) / batch size, never below 0
    expected = np.maximum(0.0, measured.cpu[:, 0, :] * sizes - 0.5e-3) / sizes
    np.testing.assert_allclose(cheaper.cpu[:, 0, :], expected, rtol=1e-9, atol=1e-15)
    # a correction per call weighs most on the smallest batches
    gain = measured.cpu[:, 0, :] - cheaper.cpu[:, 0, :]
    assert (gain[:, 0] > gain[:, -1]).all()


def test_each_call_of_a_sequential_fan_out_adds_what_the_profile_measured():
    plain = _cpu_problem(host_cpu_ms=3.0)
    slower = _cpu_problem(host_cpu_ms=3.0, sequential_call_ms=1.0)
    n = np.ones((3, 1), dtype=np.int64)
    for k in (0, len(plain.batch_sizes) - 1):
        b = np.full(3, k)
        per_sample = 1 / sequential_throughput(plain, n, b)
        added = 3 * 1e-3 / plain.batch_sizes[k]  # three calls of batch b per b samples
        assert 1 / sequential_throughput(slower, n, b) == pytest.approx(per_sample + added)


def _plan_argv(d) -> list[str]:
    argv = [sys.executable, "-m", "orchestrator", "plan", str(d / "ensemble.yaml")]
    return [*argv, "--profile", str(d / "profile.json"), "--hardware", str(d / "hw.yaml")]


def _with_closed(fds: tuple[int, ...], argv: list[str]) -> int:
    """The exit code of ``argv`` run with these standard descriptors closed (`>&-`)."""
    code = "import os, subprocess, sys\n" + "".join(f"os.close({fd})\n" for fd in fds)
    code += f"sys.exit(subprocess.run({argv!r}).returncode)\n"
    return subprocess.run([sys.executable, "-c", code], timeout=120, check=False).returncode


def test_a_stream_closed_from_the_start_is_dev_null_not_a_traceback(planning_files):
    """Found by a hostile review: with stdout or stderr closed (`chorus plan >&-`), Python
    leaves sys.stdout None, and the wrapper that drops output without a reader called
    write on None: exit 120 and a traceback; `chorus up >&-` tore down what it had started."""
    d = planning_files
    for fds in ((1,), (2,), (1, 2)):
        assert _with_closed(fds, _plan_argv(d)) == 0, fds
    (d / "ensemble.yaml").write_text("name: [\n")  # an error with stderr closed: still exit 2
    assert _with_closed((2,), _plan_argv(d)) == 2


def test_output_that_cannot_be_written_is_an_error_not_a_silent_success(planning_files):
    """Found by a hostile review: `chorus plan --json > plan.json` on a full disk exited 0
    with nothing written, since every failed write was taken for a reader gone away. Only a
    missing reader (EPIPE; EIO on a terminal that hung up) is dropped."""
    with open("/dev/full", "w") as full:
        argv = [*_plan_argv(planning_files), "--json"]
        result = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "cannot write to stdout: No space left on device" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_the_table_of_a_plan_on_many_alike_gpus_draws_a_row_per_run_of_them():
    """Found by a hostile review: `chorus plan` on 1,024 GPUs spent 4 s drawing a table of
    1,024 rows. Devices next to each other with the same row are one row, which says how many;
    every device is in exactly one row."""
    from rich.console import Console

    from orchestrator.planning.plan import plan_table

    members = {"a": curve(4), "b": curve(4, fixed_ms=9)}
    profile = Profile({m: {"gpu": c} for m, c in members.items()})
    plan = plan_ensemble("e", list(members), 64, profile, gpus(64, memory_gb=16))
    console = Console(record=True, width=200)
    console.print(plan_table(plan))
    rows = [line for line in console.export_text().splitlines() if "node0/gpu" in line]
    assert len(rows) < 64, rows
    covered = 0
    for row in rows:
        found = re.search(r"node0/gpu(\d+)(?: \.\. node0/gpu(\d+) \(gpu, (\d+) alike\))?", row)
        assert found, row
        first, last, alike = found.groups()
        count = 1 if last is None else int(alike)
        assert count == (1 if last is None else int(last) - int(first) + 1), row
        covered += count
    assert covered == 64


def test_a_stderr_that_cannot_be_written_does_not_stop_the_command(planning_files, tmp_path):
    """Found by a hostile review: with stderr on a full disk, the report's first line ended
    `chorus plan` with exit 1 and nothing on stdout (`chorus up` did not start). Stderr holds
    only the report: its failures are dropped; stdout's are errors."""
    with open("/dev/full", "w") as full, (tmp_path / "p.json").open("w") as out:
        argv = [*_plan_argv(planning_files), "--json"]
        result = subprocess.run(argv, stdout=out, stderr=full, timeout=120, check=False)
    assert result.returncode == 0
    assert json.loads((tmp_path / "p.json").read_text())["ensemble"] == "big"
