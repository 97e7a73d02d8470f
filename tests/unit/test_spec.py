from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.errors import SpecError
from orchestrator.planning.spec import load_ensemble
from tests.cli import chorus
from tests.onnx_models import linear


def write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "ensemble.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def members(tmp_path: Path) -> dict:
    linear(tmp_path / "a.onnx", seed=0)
    linear(tmp_path / "b.onnx", seed=1, input_name="features", output_name="scores")
    return {
        "name": "toy",
        "members": [
            {"name": "a", "path": "a.onnx"},
            {"name": "b", "path": "b.onnx", "weight": 2.0},
        ],
    }


def test_tensors_are_inferred_from_the_first_member_and_single_tensors_mapped(tmp_path, members):
    ens = load_ensemble(write(tmp_path, members))
    assert [(t.name, t.dtype, t.shape) for t in ens.inputs] == [("x", "FP32", (4,))]
    assert [(t.name, t.shape) for t in ens.outputs] == [("y", (3,))]
    b = ens.member("b")
    assert b.input_map == (("x", "features"),)
    assert b.output_map == (("y", "scores"),)
    assert b.weight == 2.0
    assert b.path == (tmp_path / "b.onnx").resolve()


def test_explicit_maps_name_member_tensors(tmp_path):
    linear(tmp_path / "a.onnx", input_name="in0", output_name="out0")
    linear(tmp_path / "b.onnx", input_name="in1", output_name="out1")
    spec = {
        "name": "toy",
        "inputs": [{"name": "x", "dtype": "FP32", "shape": [4]}],
        "outputs": [{"name": "y", "dtype": "FP32", "shape": [3]}],
        "members": [
            {"name": "a", "path": "a.onnx", "inputs": {"x": "in0"}, "outputs": {"y": "out0"}},
            {"name": "b", "path": "b.onnx", "inputs": {"x": "in1"}, "outputs": {"y": "out1"}},
        ],
    }
    ens = load_ensemble(write(tmp_path, spec))
    assert ens.member("a").input_map == (("x", "in0"),)
    assert ens.member("b").output_map == (("y", "out1"),)


def test_unknown_key_names_the_field(tmp_path, members):
    members["members"][1]["wieght"] = 3
    with pytest.raises(SpecError) as e:
        load_ensemble(write(tmp_path, members))
    assert e.value.field == "members[1].wieght"
    assert "unknown key" in str(e.value)
    assert "ensemble.yaml" in str(e.value)


def test_missing_member_file_names_the_path_field(tmp_path, members):
    members["members"][0]["path"] = "nowhere.onnx"
    with pytest.raises(SpecError) as e:
        load_ensemble(write(tmp_path, members))
    assert e.value.field == "members[0].path"
    assert "nowhere.onnx" in str(e.value)


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("", "is a folder"),
        ("sub", "is a folder"),
        ("empty.onnx", "is empty"),
        ("/dev/zero", "device"),
    ],
)
def test_a_member_path_that_is_not_a_model_file_says_what_it_is(tmp_path, members, path, says):
    """A folder, the empty path or /dev/zero had been said not to exist."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "empty.onnx").write_bytes(b"")
    members["members"][0]["path"] = path
    with pytest.raises(SpecError, match=says) as e:
        load_ensemble(write(tmp_path, members))
    assert e.value.field == "members[0].path"


def test_members_whose_outputs_disagree_in_shape_are_refused(tmp_path, members):
    linear(tmp_path / "b.onnx", out_dim=5)
    with pytest.raises(SpecError) as e:
        load_ensemble(write(tmp_path, members))
    assert e.value.field == "members[1].outputs"
    assert "[5]" in str(e.value) and "[3]" in str(e.value)


def test_members_whose_inputs_disagree_in_dtype_are_refused(tmp_path, members):
    linear(tmp_path / "b.onnx", elem_type=__import__("onnx").TensorProto.DOUBLE)
    with pytest.raises(SpecError) as e:
        load_ensemble(write(tmp_path, members))
    assert e.value.field == "members[1].inputs"
    assert "FP64" in str(e.value)


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "", "x" * 65, "sp ace"])
def test_bad_member_names_are_refused(tmp_path, members, name):
    members["members"][0]["name"] = name
    with pytest.raises(SpecError) as e:
        load_ensemble(write(tmp_path, members))
    assert e.value.field == "members[0].name"


def test_duplicate_member_names_are_refused(tmp_path, members):
    members["members"][1]["name"] = "a"
    with pytest.raises(SpecError, match="duplicate member name 'a'") as e:
        load_ensemble(write(tmp_path, members))
    assert e.value.field == "members[1].name"


def test_a_member_named_as_the_fanout_model_is_refused(tmp_path, members):
    """It passed, then Triton refused the repository as a cycle, after a minute's profiling."""
    members["members"][1]["name"] = "toy__fanout"
    with pytest.raises(SpecError, match="the model Chorus adds") as e:
        load_ensemble(write(tmp_path, members))
    assert e.value.field == "members[1].name"


@pytest.mark.parametrize("value", ["yes", "off", 1, 0])
def test_a_boolean_is_a_boolean(tmp_path, members, value):
    """'off' had been served as softmax false, and 'yes' or 1 as true."""
    members["combine"] = {"softmax": value}
    with pytest.raises(SpecError) as e:
        load_ensemble(write(tmp_path, members))
    assert "combine.softmax" in str(e.value)


def test_a_fixed_batch_dimension_is_refused_with_the_fix(tmp_path, members):
    linear(tmp_path / "a.onnx", batch=1)
    with pytest.raises(SpecError, match="dynamic batch axis"):
        load_ensemble(write(tmp_path, members))


def test_every_problem_in_the_file_is_reported(tmp_path, members):
    members["typo"] = 1
    members["serving"] = {"max_batch_size": 0}
    with pytest.raises(SpecError) as e:
        load_ensemble(write(tmp_path, members))
    assert "typo" in str(e.value) and "serving.max_batch_size" in str(e.value)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda s, d: s.update(colour="red"), "colour"),
        (lambda s, d: s["members"][0].update(path="missing.onnx"), "members[0].path"),
        (lambda s, d: linear(d / "b.onnx", out_dim=7), "members[1].outputs"),
        (lambda s, d: s["members"][1].update(name="../b"), "members[1].name"),
        # past a day: the stop's wait (member timeout and all) had overflowed threading's
        # timeout, and a manifest's grace period an int64
        (lambda s, d: s.update(serving={"member_timeout_ms": 1e300}), "member_timeout_ms"),
        (lambda s, d: s.update(serving={"deadline_ms": 1e300}), "deadline_ms"),
    ],
    ids=[
        "unknown key",
        "missing member file",
        "outputs disagree in shape",
        "bad member name",
        "member timeout past a day",
        "deadline past a day",
    ],
)
def test_cli_exits_2_naming_the_field(tmp_path, members, change, field):
    change(members, tmp_path)
    result = chorus("up", str(write(tmp_path, members)), "--workdir", str(tmp_path / "w"))
    assert result.returncode == 2, result.stderr
    assert field in result.stderr
    assert "ensemble.yaml" in result.stderr
    assert not (tmp_path / "w").exists()  # nothing was started or written


def test_a_name_that_looks_like_a_number_in_exponent_form_stays_a_name(tmp_path, members):
    """Found by a hostile review: reading `1e3` as a float everywhere had refused `name: 1e3`
    ("Input should be a valid string"); only a float field reads it as a number."""
    members["name"] = "1e3"
    members["members"][0]["name"] = "2e4"
    text = yaml.safe_dump(members).replace("'1e3'", "1e3").replace("'2e4'", "2e4")
    text += "serving: {member_timeout_ms: 1e3}\n"
    (tmp_path / "ensemble.yaml").write_text(text)
    ensemble = load_ensemble(tmp_path / "ensemble.yaml")
    assert ensemble.name == "1e3" and ensemble.members[0].name == "2e4"
    assert ensemble.member_timeout_ms == 1000.0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda s: s.update(serving={"member_timeout_ms": True}), "serving.member_timeout_ms"),
        (lambda s: s.update(serving={"deadline_ms": True}), "serving.deadline_ms"),
        (lambda s: s.update(serving={"max_batch_size": True}), "serving.max_batch_size"),
        (lambda s: s.update(serving={"latency_target_ms": True}), "serving.latency_target_ms"),
        (lambda s: s["members"][1].update(weight=True), "members[1].weight"),
        (
            lambda s: s.update(outputs=[{"name": "y", "dtype": "FP32", "shape": [True]}]),
            "outputs[0].shape[0]",
        ),
    ],
)
def test_a_boolean_is_not_a_number(tmp_path, members, change, field):
    """Found by a hostile review: YAML's `true` was read as 1 (a member timeout of 1 ms)."""
    change(members)
    with pytest.raises(SpecError) as e:
        load_ensemble(write(tmp_path, members))
    assert field in str(e.value), str(e.value)


def test_a_drain_timeout_past_a_day_is_refused_before_anything_starts(tmp_path, members):
    path = write(tmp_path, members)
    result = chorus("up", str(path), "--drain-timeout", "1e300", "--workdir", str(tmp_path / "w"))
    assert result.returncode == 2, result.stderr
    assert "--drain-timeout" in result.stderr and "86400" in result.stderr, result.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["plan", "--effort", "inf"], "'--effort': a finite number from 0 to 1000, not inf"),
        (["plan", "--effort", "nan"], "'--effort': a finite number from 0 to 1000, not nan"),
        (["plan", "--time-limit", "nan"], "'--time-limit': a finite number"),
        (["up", "--drain-timeout", "nan"], "'--drain-timeout': a finite number"),
        (["profile", "--seconds", "inf"], "'--seconds': a finite number"),
        (["up", "--grpc-port", "65536"], "'--grpc-port'"),
        (["up", "--grpc-port", "-1"], "'--grpc-port'"),
        (["up", "--grpc-port", "99999999999999999999"], "'--grpc-port'"),
        (["up", "--metrics-port", "70000"], "'--metrics-port'"),
        (["tune", "--concurrency", "0"], "'--concurrency'"),
        # an ensemble without a cascade had ignored it, even a file that is not there
        (["plan", "--calibration", "nowhere.json"], "has no combine.cascade section"),
        (["up", "--calibration", "nowhere.json"], "has no combine.cascade section"),
    ],
)
def test_a_number_option_out_of_range_exits_2_naming_it(tmp_path, members, argv, says):
    """Found by a hostile review: --effort inf was an OverflowError traceback, --grpc-port
    65536 printed "serving on :65536" while the combiner took a random port, -1 and a huge
    port were tracebacks, --metrics-port 70000 crash-looped the combiner, and a NaN was
    called past the maximum."""
    path = write(tmp_path, members)
    command, *options = argv
    result = chorus(command, str(path), *options, "--workdir", str(tmp_path / "w"))
    assert result.returncode == 2, result.stderr
    assert says in " ".join(result.stderr.replace("│", " ").split()), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()  # nothing was started or written


def test_an_unknown_rule_names_the_field_and_the_choices(tmp_path, members):
    members["combine"] = {"rule": "average"}
    with pytest.raises(SpecError) as e:
        load_ensemble(write(tmp_path, members))
    assert e.value.field == "combine.rule"
    assert "vote" in str(e.value) and "module:function" in str(e.value)


def test_a_user_rule_beside_the_ensemble_file_is_accepted(tmp_path, members):
    (tmp_path / "toy_rules.py").write_text("def best(stacked, weights):\n    return stacked[0]\n")
    members["combine"] = {"rule": "toy_rules:best", "uncertainty": ["entropy", "agreement"]}
    ens = load_ensemble(write(tmp_path, members))
    assert ens.rule == "toy_rules:best"
    assert ens.uncertainty == ("entropy", "agreement")


def test_an_unknown_uncertainty_measure_is_refused(tmp_path, members):
    members["combine"] = {"uncertainty": ["entropy", "surprise"]}
    with pytest.raises(SpecError) as e:
        load_ensemble(write(tmp_path, members))
    assert e.value.field == "combine.uncertainty[1]"


@pytest.mark.parametrize(("quorum", "count"), [(1.0, 2), (0.5, 1), (0.51, 2), (1, 1), (2, 2)])
def test_quorum_is_a_fraction_or_an_integer_count(tmp_path, members, quorum, count):
    members["serving"] = {"quorum": quorum, "deadline_ms": 250}
    ens = load_ensemble(write(tmp_path, members))
    assert ens.quorum == count and ens.deadline_ms == 250


@pytest.mark.parametrize("quorum", [3, 0, 1.5, 0.0])
def test_an_impossible_quorum_names_the_field(tmp_path, members, quorum):
    members["serving"] = {"quorum": quorum}
    with pytest.raises(SpecError) as e:
        load_ensemble(write(tmp_path, members))
    assert e.value.field == "serving.quorum"


@pytest.fixture
def three(tmp_path: Path, members: dict) -> dict:
    """The toy ensemble with a third member, c."""
    linear(tmp_path / "c.onnx", seed=2)
    members["members"].append({"name": "c", "path": "c.onnx"})
    return members


def test_a_cascade_section_resolves_its_tiers_exit_threshold_and_output(tmp_path, three):
    three["combine"] = {
        "softmax": True,
        "cascade": {"tiers": [["a", "c"], ["b"]], "exit": "confidence", "threshold": 0.9},
    }
    ens = load_ensemble(write(tmp_path, three))
    assert ens.cascade is not None
    assert ens.cascade.tiers == (("a", "c"), ("b",))
    assert (ens.cascade.exit, ens.cascade.threshold, ens.cascade.output) == (
        "confidence",
        0.9,
        "y",
    )


def test_a_cascade_may_leave_tiers_and_threshold_to_the_calibration(tmp_path, three):
    three["combine"] = {"cascade": {}}
    ens = load_ensemble(write(tmp_path, three))
    assert ens.cascade is not None
    assert (ens.cascade.tiers, ens.cascade.exit, ens.cascade.threshold) == (
        None,
        "agreement",
        None,
    )
    assert ens.cascade.output == "y"  # the first output


def test_an_ensemble_without_a_cascade_section_has_none(tmp_path, members):
    assert load_ensemble(write(tmp_path, members)).cascade is None


@pytest.mark.parametrize(
    ("tiers", "field", "words"),
    [
        ([["a", "b", "c"]], "combine.cascade.tiers", "at least 2 tiers"),
        ([["a"], [], ["b", "c"]], "combine.cascade.tiers[1]", "at least one member"),
        ([["a"], ["b", "d"]], "combine.cascade.tiers[1][1]", "'d' is not a member"),
        ([["a", "b"], ["b", "c"]], "combine.cascade.tiers[1][0]", "more than one place"),
        ([["a"], ["b"]], "combine.cascade.tiers", "missing: c"),
    ],
    ids=["one tier", "empty tier", "unknown member", "member twice", "member left out"],
)
def test_cascade_tiers_must_hold_every_member_exactly_once(tmp_path, three, tiers, field, words):
    three["combine"] = {"cascade": {"tiers": tiers}}
    with pytest.raises(SpecError, match=words) as e:
        load_ensemble(write(tmp_path, three))
    assert e.value.field == field


@pytest.mark.parametrize(
    ("cascade", "field"),
    [
        ({"exit": "consensus"}, "combine.cascade.exit"),
        ({"threshold": 1.5}, "combine.cascade.threshold"),
        ({"thresold": 0.5}, "combine.cascade.thresold"),
        ({"tiers": [["a"], ["../b", "c"]]}, "combine.cascade.tiers[1][0]"),
    ],
    ids=["unknown exit rule", "threshold above 1", "misspelt key", "bad name"],
)
def test_a_bad_cascade_field_is_named(tmp_path, three, cascade, field):
    three["combine"] = {"cascade": cascade}
    with pytest.raises(SpecError) as e:
        load_ensemble(write(tmp_path, three))
    assert e.value.field == field


def test_agreement_with_one_member_first_is_refused_as_it_never_calls_the_rest(tmp_path, three):
    three["combine"] = {"cascade": {"tiers": [["a"], ["b", "c"]], "exit": "agreement"}}
    with pytest.raises(SpecError, match="always agrees with itself") as e:
        load_ensemble(write(tmp_path, three))
    assert e.value.field == "combine.cascade.tiers[0]"
    three["combine"] = {"cascade": {"tiers": [["a"], ["b", "c"]], "exit": "confidence"}}
    assert load_ensemble(write(tmp_path, three)).cascade.tiers == (("a",), ("b", "c"))


def test_a_cascade_output_that_is_not_an_output_is_named(tmp_path, three):
    three["combine"] = {"cascade": {"output": "probabilities"}}
    with pytest.raises(SpecError, match=r"'probabilities' is not an output.*y") as e:
        load_ensemble(write(tmp_path, three))
    assert e.value.field == "combine.cascade.output"


def test_a_cascade_output_needs_a_class_axis(tmp_path, members):
    linear(tmp_path / "a.onnx", out_dim=1)
    linear(tmp_path / "b.onnx", out_dim=1, input_name="features", output_name="scores")
    members["combine"] = {"cascade": {"output": "y"}}
    with pytest.raises(SpecError, match="class axis") as e:
        load_ensemble(write(tmp_path, members))
    assert e.value.field == "combine.cascade.output"


def test_a_cascade_needs_two_members(tmp_path, members):
    members["members"] = members["members"][:1]
    members["combine"] = {"cascade": {}}
    with pytest.raises(SpecError, match="at least 2 members") as e:
        load_ensemble(write(tmp_path, members))
    assert e.value.field == "combine.cascade"
