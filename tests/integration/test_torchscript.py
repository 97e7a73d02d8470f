"""A TorchScript member (.pt) beside ONNX members, served on the bundled Triton (the Python
backend runs it with torch): the combined answer equals the one computed directly."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
import yaml

from combiner.sdk import EnsembleClient
from orchestrator.deploying.render import parse_config, render_config
from orchestrator.deploying.up import Deployment
from orchestrator.planning.spec import load_ensemble


def _torchscript_member(path) -> torch.jit.ScriptModule:
    torch.manual_seed(5)
    module = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    ).eval()
    traced = torch.jit.trace(module, torch.zeros(2, 1, 8, 8))
    traced.save(str(path))
    return traced


def test_a_torchscript_member_beside_onnx_members_gives_the_direct_answer(ensemble, tmp_path):
    traced = _torchscript_member(tmp_path / "scripted.pt")
    onnx_members = [m for m in ensemble.members if m.name in ("mlp", "cnn")]
    spec = {
        "name": "mixed",
        "members": [{"name": m.name, "path": str(m.path)} for m in onnx_members]
        + [{"name": "scripted", "path": "scripted.pt"}],
        "combine": {"rule": "mean", "softmax": True},
        "serving": {"max_batch_size": 16},
    }
    (tmp_path / "mixed.yaml").write_text(yaml.safe_dump(spec))
    mixed = load_ensemble(tmp_path / "mixed.yaml")
    scripted = mixed.member("scripted")
    assert scripted.torchscript and [t.name for t in scripted.inputs] == ["INPUT__0"]
    x = np.random.default_rng(8).random((6, 1, 8, 8), np.float32)
    direct = []
    for m in onnx_members:
        session = ort.InferenceSession(str(m.path), providers=["CPUExecutionProvider"])
        direct.append(session.run(None, {session.get_inputs()[0].name: x})[0])
    with torch.inference_mode():
        direct.append(traced(torch.from_numpy(x)).numpy())
    stacked = np.stack(direct)
    probabilities = np.exp(stacked - stacked.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    with (
        Deployment(mixed, tmp_path / "work") as endpoints,
        EnsembleClient(endpoints.ensemble) as client,
    ):
        served = client.predict(x)
    assert isinstance(served, np.ndarray)
    np.testing.assert_allclose(served, probabilities.mean(0), rtol=1e-4, atol=1e-6)
    assert (tmp_path / "work" / "repository" / "scripted" / "1" / "model.pt").is_file()


def test_a_torchscript_member_renders_for_the_pytorch_backend_of_the_official_image(
    ensemble, tmp_path
):
    _torchscript_member(tmp_path / "scripted.pt")
    mlp = ensemble.member("mlp")
    spec = {
        "name": "mixed",
        "members": [{"name": "mlp", "path": str(mlp.path)}, {"name": "ts", "path": "scripted.pt"}],
    }
    (tmp_path / "mixed.yaml").write_text(yaml.safe_dump(spec))
    member = load_ensemble(tmp_path / "mixed.yaml").member("ts")
    from orchestrator.deploying.render import InstanceGroup

    text = render_config(member, "onnxruntime", (InstanceGroup("gpu", 2, (1,)),), 32)
    config = parse_config(text, "ts")
    assert config.backend == "pytorch" and config.platform == "pytorch_libtorch"
    assert [i.name for i in config.input] == ["INPUT__0"]
    assert [o.name for o in config.output] == ["OUTPUT__0"]
    assert list(config.instance_group[0].gpus) == [1]
    python = parse_config(render_config(member, "python", (InstanceGroup("cpu", 1),), 32), "ts")
    assert python.parameters["model_file"].string_value == "model.pt"
