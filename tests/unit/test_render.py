from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.deploying.render import (
    InstanceGroup,
    parse_config,
    pick_backend,
    render_config,
    render_repository,
)
from orchestrator.errors import ChorusError
from orchestrator.planning.plan import Plan
from orchestrator.planning.spec import Ensemble

GROUPS = {
    "cpu": (InstanceGroup("cpu", 2),),
    "gpus": (InstanceGroup("gpu", 1, (0,)), InstanceGroup("gpu", 3, (2, 3))),
}


@pytest.mark.parametrize("backend", ["python", "onnxruntime"])
@pytest.mark.parametrize("groups", GROUPS.values(), ids=GROUPS.keys())
def test_rendered_configs_parse_with_tritons_schema_and_say_what_was_asked(
    ensemble, backend, groups
):
    for member in ensemble.members:
        config = parse_config(render_config(member, backend, groups, 16, 2), member.name)
        assert config.backend == backend
        assert config.max_batch_size == 16
        assert [i.name for i in config.input] == [t.name for t in member.inputs]
        assert [o.name for o in config.output] == [t.name for t in member.outputs]
        assert list(config.output[0].dims) == [3]
        assert [(g.count, g.kind, list(g.gpus)) for g in config.instance_group] == [
            (g.count, 1 if g.kind == "gpu" else 2, list(g.gpus)) for g in groups
        ]  # KIND_GPU = 1, KIND_CPU = 2
        assert config.HasField("dynamic_batching")


def test_rendering_twice_gives_identical_bytes_and_touches_nothing(ensemble, tmp_path):
    groups = {m.name: GROUPS["cpu"] for m in ensemble.members}
    sizes = {m.name: 8 for m in ensemble.members}
    repo = tmp_path / "repo"
    first = render_repository(ensemble, repo, "python", groups, sizes, 1)
    assert sorted(p.relative_to(repo).as_posix() for p in first) == [
        "a/1/model.onnx",
        "a/1/model.py",
        "a/config.pbtxt",
        "b/1/model.onnx",
        "b/1/model.py",
        "b/config.pbtxt",
    ]
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    mtimes = {p: p.stat().st_mtime_ns for p in before}
    assert render_repository(ensemble, repo, "python", groups, sizes, 1) == []
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before
    assert {p: p.stat().st_mtime_ns for p in before} == mtimes


def test_a_changed_batch_size_rewrites_only_the_configs(ensemble, tmp_path):
    groups = {m.name: GROUPS["cpu"] for m in ensemble.members}
    repo = tmp_path / "repo"
    render_repository(ensemble, repo, "onnxruntime", groups, {"a": 8, "b": 8})
    changed = render_repository(ensemble, repo, "onnxruntime", groups, {"a": 8, "b": 32})
    assert changed == [repo / "b" / "config.pbtxt"]
    assert "max_batch_size: 32" in (repo / "b" / "config.pbtxt").read_text()


def test_member_names_that_escape_the_repository_are_refused(ensemble):
    from dataclasses import replace

    evil = replace(ensemble.members[0], name="../../etc")
    with pytest.raises(ValueError, match="not a valid name"):
        render_config(evil, "python", GROUPS["cpu"], 8)


def test_backend_is_onnxruntime_where_the_server_has_it_else_python():
    assert pick_backend({"python", "onnxruntime", "pytorch"}) == "onnxruntime"
    assert pick_backend({"python"}) == "python"
    with pytest.raises(ChorusError, match="neither"):
        pick_backend({"tensorrt"})


def _gpu_plan(ensemble: Ensemble, nodes: tuple[str, ...] = ("node0",)) -> Plan:
    from orchestrator.planning.hardware import Device
    from orchestrator.planning.plan import plan_ensemble
    from orchestrator.planning.profile import Curve, Profile

    gib = 1 << 30
    devices = [
        Device(node, "gpu", i, "gpu", 16 * gib, 16 * gib, speed=1.0 + i)
        for node in nodes
        for i in range(2)
    ]
    curve = Curve(3 * gib, 10**6, ((1, 4.0), (8, 6.0), (32, 15.0)))
    profile = Profile({m.name: {"gpu": curve} for m in ensemble.members})
    return plan_ensemble(ensemble.name, [m.name for m in ensemble.members], 32, profile, devices)


def test_rendered_gpu_plan_names_exactly_the_planned_gpus_and_counts(ensemble, tmp_path):
    from orchestrator.deploying.render import render_plan

    plan = _gpu_plan(ensemble)
    render_plan(ensemble, plan, tmp_path / "repo", "onnxruntime")
    for member in plan.members:
        config = parse_config((tmp_path / "repo" / member / "config.pbtxt").read_text(), member)
        rendered = {(g.kind, tuple(g.gpus)): g.count for g in config.instance_group}
        planned = {(1, (int(d.rsplit("gpu", 1)[1]),)): c for d, c in plan.instances[member].items()}
        assert rendered == planned  # KIND_GPU = 1
        assert config.max_batch_size == plan.max_batch_size[member]


def test_a_plan_over_two_nodes_renders_one_repository_per_node(ensemble, tmp_path):
    from orchestrator.deploying.render import render_plan

    plan = _gpu_plan(ensemble, nodes=("n0", "n1"))
    render_plan(ensemble, plan, tmp_path / "repo", "python")
    _check_node_repositories(plan, tmp_path / "repo", ("n0", "n1"))


def _check_node_repositories(plan: Plan, repo: Path, nodes: tuple[str, ...]) -> int:
    """Each node's repository holds exactly the members placed there, with their instance
    counts; returns the instances rendered."""
    placed = 0
    for node in nodes:
        for member in plan.members:
            here = {d: c for d, c in plan.instances[member].items() if d.startswith(node + "/")}
            path = repo / node / member / "config.pbtxt"
            assert path.is_file() == bool(here)
            if here:
                config = parse_config(path.read_text(), member)
                assert sum(g.count for g in config.instance_group) == sum(here.values())
                placed += sum(here.values())
    return placed


def test_describe_changes_names_moves_and_batch_sizes_and_is_empty_when_nothing_changed(
    ensemble, tmp_path
):
    from dataclasses import replace

    from orchestrator.deploying.render import describe_changes, render_plan

    plan = _gpu_plan(ensemble)
    repo = tmp_path / "repo"
    assert all("new" in line for line in describe_changes(repo, plan))
    render_plan(ensemble, plan, repo, "python")
    assert describe_changes(repo, plan) == []
    assert render_plan(ensemble, plan, repo, "python") == []
    moved = replace(
        plan,
        instances={**plan.instances, "a": {"node0/gpu1": 3}},
        max_batch_size={**plan.max_batch_size, "b": 1},
    )
    changes = describe_changes(repo, moved)
    assert any(line.startswith("a: instances") and line.endswith("-> 3x gpu1") for line in changes)
    assert any(line.startswith("b: batch size") and line.endswith("-> 1") for line in changes)


def test_a_plan_over_four_nodes_renders_and_round_trips(ensemble, tmp_path):
    from orchestrator.deploying.render import describe_changes, render_plan
    from orchestrator.planning.plan import load_plan

    nodes = ("n0", "n1", "n2", "n3")
    plan = _gpu_plan(ensemble, nodes=nodes)
    (tmp_path / "plan.json").write_text(plan.to_json())
    plan = load_plan(tmp_path / "plan.json")
    render_plan(ensemble, plan, tmp_path / "repo", "python")
    assert describe_changes(tmp_path / "repo", plan) == []
    placed = _check_node_repositories(plan, tmp_path / "repo", nodes)
    assert placed == sum(sum(v.values()) for v in plan.instances.values())
    assert len({d.split("/")[0] for v in plan.instances.values() for d in v}) == 4


def test_a_member_that_leaves_a_node_leaves_its_repository(ensemble, tmp_path):
    """Triton on that node would still load it: regenerating removes it, and says so; a
    single-node repository's members go when the plan spreads over nodes."""
    from dataclasses import replace

    from orchestrator.deploying.render import describe_changes, render_plan

    repo = tmp_path / "repo"
    render_plan(ensemble, _gpu_plan(ensemble), repo, "python")  # one node, at the top
    assert (repo / "a" / "config.pbtxt").is_file()
    plan = _gpu_plan(ensemble, nodes=("n0", "n1"))
    plan = replace(plan, instances={**plan.instances, "a": {"n0/gpu0": 1, "n1/gpu1": 1}})
    render_plan(ensemble, plan, repo, "python")
    assert not (repo / "a").exists() and not (repo / "b").exists()
    assert (repo / "n1" / "a" / "config.pbtxt").is_file()
    moved = replace(plan, instances={**plan.instances, "a": {"n0/gpu0": 2}})
    assert "[n1] a: removed (no instance on n1 any more)" in describe_changes(repo, moved)
    removed = render_plan(ensemble, moved, repo, "python")
    assert repo / "n1" / "a" in removed
    assert not (repo / "n1" / "a").exists() and (repo / "n1" / "b" / "config.pbtxt").is_file()
    assert describe_changes(repo, moved) == []


# A quote, a newline, a backslash and a brace: what text format needs escaped. The output's
# name, pasted unescaped, closes its block and adds a parameter and an output of its own.
ODD_INPUT = 'x "quoted" \\ back\nslash }'
ODD_OUTPUT = (
    'y" data_type: TYPE_FP32 dims: [ 3 ] } ] '
    'parameters { key: "injected" value: { string_value: "yes" } } '
    'output [ { name: "z'
)


@pytest.mark.parametrize("backend", ["python", "onnxruntime"])
def test_tensor_names_with_quotes_newlines_and_braces_reach_the_config_as_they_are(
    tmp_path, backend
):
    import yaml

    from orchestrator.deploying.render import render_fanout
    from orchestrator.planning.spec import load_ensemble
    from tests.onnx_models import linear

    linear(tmp_path / "odd.onnx", input_name=ODD_INPUT, output_name=ODD_OUTPUT)
    spec = {"name": "odd", "members": [{"name": "m", "path": "odd.onnx"}]}
    (tmp_path / "ensemble.yaml").write_text(yaml.safe_dump(spec))
    ensemble = load_ensemble(tmp_path / "ensemble.yaml")
    (member,) = ensemble.members
    config = parse_config(render_config(member, backend, GROUPS["cpu"], 8, 1), "m")
    assert [i.name for i in config.input] == [ODD_INPUT]
    assert [o.name for o in config.output] == [ODD_OUTPUT]
    assert "injected" not in config.parameters
    fanout = parse_config(render_fanout(ensemble, 8), "odd__fanout")
    assert [i.name for i in fanout.input] == [ODD_INPUT]
    assert [o.name for o in fanout.output] == [f"m__{ODD_OUTPUT}"]
    (step,) = fanout.ensemble_scheduling.step
    assert dict(step.input_map) == {ODD_INPUT: ODD_INPUT}
    assert dict(step.output_map) == {ODD_OUTPUT: f"m__{ODD_OUTPUT}"}


def test_the_python_backends_onnx_session_threads_block_when_idle(ensemble, tmp_path, monkeypatch):
    """Several threads of one instance must not spin between batches: onnxruntime's default
    spinning made Triton spend 3-5x the CPU per request through Chorus on a 2-core host."""
    import importlib.util
    import json
    import sys
    import types

    from google.protobuf import json_format

    member = ensemble.members[0]
    repo = tmp_path / "repo"
    render_repository(ensemble, repo, "python", {member.name: GROUPS["cpu"]}, {member.name: 8}, 2)
    config = parse_config((repo / member.name / "config.pbtxt").read_text(), member.name)
    # the module names Triton's utilities at import; initialize() does not use them
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("stand-in"))
    spec = importlib.util.spec_from_file_location("rendered", repo / member.name / "1" / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(
                json_format.MessageToDict(config, preserving_proto_field_name=True)
            ),
            "model_repository": str(repo / member.name),
            "model_version": "1",
            "model_instance_kind": "CPU",
            "model_instance_device_id": "0",
        }
    )
    options = model.session.session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
