"""Vote and every uncertainty output, served by a real Triton through the combiner."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import yaml

from combiner.sdk import EnsembleClient
from orchestrator.deploying.up import Deployment
from orchestrator.planning.spec import load_ensemble
from tests.onnx_models import linear

MEASURES = ["entropy", "mutual_information", "variance", "agreement"]


@pytest.fixture(scope="module")
def voting(tmp_path_factory):
    root = tmp_path_factory.mktemp("voting")
    for i in range(3):
        linear(root / f"m{i}.onnx", in_dim=6, out_dim=5, seed=10 + i)
    (root / "ensemble.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "voters",
                "members": [{"name": f"m{i}", "path": f"m{i}.onnx"} for i in range(3)],
                "combine": {"rule": "vote", "softmax": True, "uncertainty": MEASURES},
                "serving": {"max_batch_size": 32},
            }
        )
    )
    ensemble = load_ensemble(root / "ensemble.yaml")
    with Deployment(ensemble, root / "work") as endpoints:
        yield ensemble, endpoints


def test_vote_and_uncertainty_outputs_match_numpy_on_the_member_files(voting):
    ensemble, endpoints = voting
    x = np.random.default_rng(3).normal(size=(17, 6)).astype(np.float32)
    with EnsembleClient(endpoints.ensemble) as client:
        meta = client.metadata()
        answer = client.predict(x)
    assert [o["name"] for o in meta["outputs"]] == ["y", *(f"y_{m}" for m in MEASURES)]
    assert meta["outputs"][1]["shape"] == [-1]
    outs = np.stack(
        [ort.InferenceSession(str(m.path)).run(None, {"x": x})[0] for m in ensemble.members]
    ).astype(np.float64)
    p = np.exp(outs) / np.exp(outs).sum(-1, keepdims=True)
    votes = p.argmax(-1)
    fractions = np.stack([(votes == c).mean(0) for c in range(5)], axis=-1)
    np.testing.assert_allclose(answer["y"], fractions, atol=1e-6)
    mean_p = p.mean(0)
    h_mean = -(mean_p * np.log(mean_p)).sum(-1)
    np.testing.assert_allclose(answer["y_entropy"], h_mean, rtol=1e-4)
    mean_h = (-(p * np.log(p)).sum(-1)).mean(0)
    np.testing.assert_allclose(answer["y_mutual_information"], h_mean - mean_h, atol=1e-5)
    np.testing.assert_allclose(answer["y_variance"], p.var(0).mean(-1), rtol=1e-3, atol=1e-7)
    agree = (votes == fractions.argmax(-1)[None]).mean(0)
    np.testing.assert_allclose(answer["y_agreement"], agree)


def test_a_client_may_ask_for_one_uncertainty_output_only(voting):
    _, endpoints = voting
    x = np.zeros((2, 6), dtype=np.float32)
    with grpcclient.InferenceServerClient(endpoints.ensemble) as stock:
        tensor = grpcclient.InferInput("x", [2, 6], "FP32")
        tensor.set_data_from_numpy(x)
        result = stock.infer(
            "voters", [tensor], outputs=[grpcclient.InferRequestedOutput("y_agreement")]
        )
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["y_agreement"]
    assert result.as_numpy("y_agreement").shape == (2,)
