"""Non-finite and absurd numbers in a profile or a hardware file are refused by field (found
by a hostile run of `chorus plan`: a NaN latency gave a plan that overloaded every GPU 6-9x,
and an infinite memory or speed ended in a traceback)."""

from __future__ import annotations

import pytest

from orchestrator.errors import SpecError
from orchestrator.planning.hardware import load_hardware
from orchestrator.planning.profile import load_profile

CURVE = '{"members": {"a": {"gpu": {"memory_bytes": 1, "latency_ms": {"1": 2.0}, %s}}}}'


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('"service_ms": {"1": NaN}', "members.a.gpu.service_ms.1"),
        ('"service_ms": {"1": Infinity}', "members.a.gpu.service_ms.1"),
        ('"cpu_ms": {"1": NaN}', "members.a.gpu.cpu_ms.1"),
    ],
)
def test_a_non_finite_curve_point_is_refused_by_its_field(tmp_path, text, field):
    path = tmp_path / "profile.json"
    path.write_text(CURVE % text)
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        load_profile(path)


def test_a_non_finite_latency_or_host_cost_is_refused(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text('{"members": {"a": {"gpu": {"memory_bytes": 1, "latency_ms": {"1": NaN}}}}}')
    with pytest.raises(SpecError, match=r"latency_ms\.1.*finite"):
        load_profile(path)
    host = '"host": {"rows_per_request": 1, "combiner_cpu_ms": Infinity}'
    path.write_text(
        '{"members": {"a": {"gpu": {"memory_bytes": 1, "latency_ms": {"1": 2.0}}}}, ' + host + "}"
    )
    with pytest.raises(SpecError, match=r"host\.combiner_cpu_ms.*finite"):
        load_profile(path)


@pytest.mark.parametrize(
    ("device", "field"),
    [
        ("memory_gb: .inf", "memory_gb"),
        ("memory_gb: 1e300", "memory_gb"),
        ("memory_gb: 16, speed: .inf", "speed"),
        ("memory_gb: .nan", "memory_gb"),
        ("memory_gb: 16, index: 100000000000000000000", "index"),
        ("memory_gb: 16, lanes: 100000000000000000000", "lanes"),
        ("memory_gb: 16, cores: 100000000000000000000", "cores"),
        # YAML's true had been read as 1 (index: true was node/gpu1)
        ("memory_gb: 16, index: true", "index"),
        ("memory_gb: 16, cores: true", "cores"),
        ("memory_gb: 16, lanes: true", "lanes"),
        ("memory_gb: true", "memory_gb"),
        ("memory_gb: 16, speed: true", "speed"),
    ],
)
def test_an_infinite_or_absurd_device_is_refused_by_its_field(tmp_path, device, field):
    path = tmp_path / "hardware.yaml"
    path.write_text(f"nodes:\n  - name: n\n    devices:\n      - {{kind: gpu, {device}}}\n")
    with pytest.raises(SpecError, match=rf"devices\[0\]\.{field}"):
        load_hardware(path)


@pytest.mark.parametrize("name", ["..", "."])
def test_a_node_named_as_a_folder_step_is_refused(tmp_path, name):
    """A node's repository is the render's folder / its name: '..' wrote outside it."""
    path = tmp_path / "hardware.yaml"
    path.write_text(f"nodes:\n  - name: '{name}'\n    devices: [{{kind: cpu, memory_gb: 8}}]\n")
    with pytest.raises(SpecError, match=r"nodes\[0\]\.name.*not a node name"):
        load_hardware(path)


def test_a_number_in_exponent_form_without_a_dot_is_a_number(tmp_path):
    """Found by a hostile review: PyYAML (YAML 1.1) reads `1e9` as a string, which the strict
    numbers refused as "not a valid number" (the README writes the bound as 1e9)."""
    path = tmp_path / "hardware.yaml"
    device = "{kind: gpu, memory_gb: 1e3, speed: .5e1}"
    path.write_text(f"nodes:\n  - name: n\n    devices: [{device}]\n")
    (device,) = load_hardware(path)
    assert device.memory_bytes == 1000 * 2**30 and device.speed == 5.0
