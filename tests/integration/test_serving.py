"""The digits ensemble served by a real tritonserver and the combiner."""

from __future__ import annotations

import asyncio

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from combiner.sdk import (
    AsyncEnsembleClient,
    EnsembleClient,
    InvalidRequest,
    ModelNotFound,
    Unavailable,
)
from orchestrator.examples.digits.demo import member_predictions


def softmax(z: np.ndarray) -> np.ndarray:
    """Written here, not taken from the combiner: the reference must not share its code."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def direct_combination(ensemble, x: np.ndarray) -> np.ndarray:
    """The ensemble's answer computed with onnxruntime on the member files, no server (the
    mean of the members' softmax, as the example ensemble combines)."""
    assert ensemble.rule == "mean" and all(m.weight == 1.0 for m in ensemble.members)
    outputs = []
    for m in ensemble.members:
        session = ort.InferenceSession(str(m.path), providers=["CPUExecutionProvider"])
        ((_, in_name),) = m.input_map
        outputs.append(session.run(None, {in_name: x})[0])
    stacked = np.stack(outputs)
    if ensemble.softmax:
        stacked = softmax(stacked)
    return stacked.mean(axis=0)


@pytest.fixture
def client(endpoints):
    with EnsembleClient(endpoints.ensemble) as c:
        yield c


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_served_answer_equals_direct_onnxruntime_combination(ensemble, client, batch):
    assert batch <= ensemble.max_batch_size
    x = np.random.default_rng(batch).random((batch, 1, 8, 8), dtype=np.float32)
    served = client.predict(x)
    assert served.shape == (batch, 10)
    np.testing.assert_allclose(served, direct_combination(ensemble, x), rtol=1e-4, atol=1e-6)


def test_ensemble_is_at_least_as_accurate_as_its_best_member(
    ensemble, deployment, endpoints, client, split
):
    probs = client.predict_all(split.x_test)
    ensemble_acc = np.mean(probs.argmax(1) == split.y_test)
    members = member_predictions(
        ensemble,
        endpoints.triton_grpc,
        split.x_test,
        deployment.plan.max_batch_size,
        endpoints.triton_headers,
    )
    accs = {name: np.mean(out.argmax(1) == split.y_test) for name, out in members.items()}
    assert len(accs) == 4
    assert ensemble_acc >= max(accs.values()), (ensemble_acc, accs)
    assert ensemble_acc > 0.9


def test_a_stock_tritonclient_grpc_call_works(ensemble, endpoints):
    x = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)
    with grpcclient.InferenceServerClient(endpoints.ensemble) as stock:
        assert stock.is_server_live() and stock.is_server_ready()
        assert stock.is_model_ready("digits")
        meta = stock.get_model_metadata("digits", as_json=True)
        assert meta["inputs"] == [
            {"name": "image", "datatype": "FP32", "shape": ["-1", "1", "8", "8"]}
        ]
        assert meta["outputs"][0]["name"] == "probabilities"
        assert stock.get_model_config("digits").config.max_batch_size == 64
        tensor = grpcclient.InferInput("image", [3, 1, 8, 8], "FP32")
        tensor.set_data_from_numpy(x)
        result = stock.infer("digits", [tensor], request_id="r-42")
    assert result.get_response().id == "r-42"
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), direct_combination(ensemble, x), rtol=1e-4, atol=1e-6
    )


def _infer(endpoints, tensors):
    with grpcclient.InferenceServerClient(endpoints.ensemble) as stock:
        return stock.infer("digits", tensors)


def _tensor(name, array, dtype=None):
    t = grpcclient.InferInput(name, list(array.shape), dtype or "FP32")
    t.set_data_from_numpy(array)
    return t


def _good():
    return np.zeros((2, 1, 8, 8), dtype=np.float32)


BAD_REQUESTS = {
    "unknown input name": (lambda: [_tensor("pixels", _good())], "unknown input 'pixels'"),
    "wrong dtype": (
        lambda: [_tensor("image", _good().astype(np.float64), "FP64")],
        "datatype FP64",
    ),
    "wrong shape": (lambda: [_tensor("image", np.zeros((2, 8, 8), np.float32))], "shape [2, 8, 8]"),
    "batch over the maximum": (
        lambda: [_tensor("image", np.zeros((65, 1, 8, 8), np.float32))],
        "exceeds the maximum batch size 64",
    ),
    "missing input": (lambda: [], "missing input 'image'"),
}


@pytest.mark.parametrize(("make", "expected"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_gets_invalid_argument_naming_the_problem_then_serving_goes_on(
    endpoints, make, expected
):
    tensors = make()
    with pytest.raises(InferenceServerException) as e:
        _infer(endpoints, tensors)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert expected in e.value.message()
    good = _infer(endpoints, [_tensor("image", _good())])
    assert good.as_numpy("probabilities").shape == (2, 10)


def test_client_translates_errors_into_its_own_tree(endpoints):
    with EnsembleClient(endpoints.ensemble) as c:
        with pytest.raises(InvalidRequest, match="datatype FP64"):
            c.predict(np.zeros((1, 1, 8, 8), dtype=np.float64))
    with EnsembleClient(endpoints.ensemble, model="nope") as c:
        with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
            c.predict(_good())


NOT_A_BATCH = {  # each had escaped the SDK's tree: TypeError, RuntimeError, SharedMemoryException
    "big-endian": (np.zeros((2, 1, 8, 8), ">f4"), None),  # (answered: it is converted)
    "strings": (np.array([["x"]]), "has dtype <U1"),
    "objects": (np.array([[object()]]), "has dtype object"),
    "a single value": (np.float32(0.5), "a single value"),
    "no rows": (np.zeros((0, 1, 8, 8), np.float32), "has no rows"),
    "no inputs": ({}, "no inputs given"),
    "a ragged list": ([[1.0], [1.0, 2.0]], "is not an array"),
}


@pytest.mark.parametrize("shared_memory", [False, True])
@pytest.mark.parametrize(("x", "says"), NOT_A_BATCH.values(), ids=NOT_A_BATCH.keys())
def test_what_is_not_a_batch_is_an_invalid_request_naming_why(
    ensemble, endpoints, shared_memory, x, says
):
    with EnsembleClient(endpoints.ensemble, shared_memory=shared_memory) as c:
        if says is None:
            expected = direct_combination(ensemble, x.astype(np.float32))
            np.testing.assert_allclose(c.predict(x), expected, rtol=1e-4, atol=1e-6)
            return
        with pytest.raises(InvalidRequest, match=says):
            c.predict(x)
        with pytest.raises(InvalidRequest, match=says):
            c.predict_all(x)


def test_predict_all_takes_a_chunk_of_at_least_one_row_and_metadata_has_integer_shapes(
    endpoints,
):
    with EnsembleClient(endpoints.ensemble) as c:
        for chunk in (0, -1, 1.5, True):
            with pytest.raises(InvalidRequest, match=r"chunk must be (a whole number|at least 1)"):
                c.predict_all(_good(), chunk=chunk)
        assert c.predict_all(_good(), chunk=1).shape == (2, 10)
        assert c.predict_all(_good(), chunk=np.int64(1)).shape == (2, 10)  # (computed, often)
        shape = c.metadata()["inputs"][0]["shape"]
        assert shape == [-1, 1, 8, 8]  # (strings, as JSON carries int64, had been passed on)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout_s": -1},
        {"timeout_s": 0},
        {"timeout_s": 10**400},
        {"deadline_ms": "50"},
        {"deadline_ms": float("nan")},
    ],
)
def test_a_timeout_or_deadline_that_is_not_a_positive_number_is_refused_by_name(endpoints, kwargs):
    """timeout_s=-1 had been a DeadlineExceeded, and deadline_ms="50" quietly accepted."""
    (name,) = kwargs
    with EnsembleClient(endpoints.ensemble) as c:
        with pytest.raises(InvalidRequest, match=f"{name} must be a positive number"):
            c.predict(_good(), **kwargs)
        assert c.predict(_good(), timeout_s=30, deadline_ms=np.float32(5000)).shape == (2, 10)


def test_a_token_read_with_its_line_break_is_refused_by_name(endpoints):
    """gRPC had answered INTERNAL 'Invalid metadata', which does not name the token."""
    for token in ("s3cret\n", "s3\ncret", "tøken"):
        with pytest.raises(ValueError, match="token must be printable ASCII"):
            EnsembleClient(endpoints.ensemble, token=token)


def test_async_client_answers_concurrent_requests_each_with_its_own_answer(ensemble, endpoints):
    xs = [
        np.random.default_rng(i).random((i % 5 + 1, 1, 8, 8), dtype=np.float32) for i in range(24)
    ]

    async def go():
        async with AsyncEnsembleClient(endpoints.ensemble) as c:
            return await asyncio.gather(*(c.predict(x) for x in xs))

    answers = asyncio.run(go())
    for x, answer in zip(xs, answers, strict=True):
        np.testing.assert_allclose(answer, direct_combination(ensemble, x), rtol=1e-4, atol=1e-6)


def test_rendered_repository_holds_every_member_for_the_python_backend(ensemble, deployment):
    repo = deployment.workdir / "repository"
    for m in ensemble.members:
        config = (repo / m.name / "config.pbtxt").read_text()
        assert 'backend: "python"' in config
        assert (repo / m.name / "1" / "model.onnx").read_bytes() == m.path.read_bytes()


def test_predict_all_splits_any_number_of_rows_into_max_batches_in_order(
    ensemble, endpoints, split
):
    x = split.x_test[:300]  # more than the maximum batch of 64
    expected = direct_combination(ensemble, x)
    with EnsembleClient(endpoints.ensemble) as client:
        np.testing.assert_allclose(client.predict_all(x), expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            client.predict_all(x, chunk=7, concurrency=3), expected, rtol=1e-4, atol=1e-6
        )

    async def go():
        async with AsyncEnsembleClient(endpoints.ensemble) as client:
            return await client.predict_all(x)

    np.testing.assert_allclose(asyncio.run(go()), expected, rtol=1e-4, atol=1e-6)


def _inference_count(endpoints, model: str) -> int:
    """Asked of Triton directly, with Chorus's key to its restricted APIs."""
    with grpcclient.InferenceServerClient(endpoints.triton_grpc) as triton:
        stats = triton.get_inference_statistics(
            model, as_json=True, headers=dict(endpoints.triton_headers)
        )
    return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))


def test_without_a_deadline_one_call_to_the_fanout_model_serves_every_member(
    ensemble, endpoints, split
):
    fanout = f"{ensemble.name}__fanout"
    before = _inference_count(endpoints, fanout)
    member_before = _inference_count(endpoints, "mlp")
    x = split.x_test[:4]
    with EnsembleClient(endpoints.ensemble) as client:
        answer = client.infer(x)
        np.testing.assert_allclose(
            answer.outputs["probabilities"], direct_combination(ensemble, x), rtol=1e-4, atol=1e-6
        )
        assert answer.contributors == tuple(m.name for m in ensemble.members)
        assert _inference_count(endpoints, fanout) == before + 1
        # a deadline needs per-member calls, to answer with the members that make it
        client.infer(x, deadline_ms=10_000)
        assert _inference_count(endpoints, fanout) == before + 1
    assert _inference_count(endpoints, "mlp") == member_before + 2


SLOW_TO_LOAD = """
import time
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        time.sleep(4)

    def execute(self, requests):
        return [pb_utils.InferenceResponse([]) for _ in requests]
"""


def test_another_model_loading_on_triton_does_not_stop_the_ensemble(
    deployment, endpoints, ensemble
):
    """With strict readiness, Triton is not 'ready' while any model loads: the ensemble's
    readiness follows its own members, not that."""
    import threading

    root = deployment.workdir / "repository" / "slow_to_load"
    (root / "1").mkdir(parents=True)
    (root / "1" / "model.py").write_text(SLOW_TO_LOAD)
    (root / "config.pbtxt").write_text(
        'name: "slow_to_load"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [{ name: "x", data_type: TYPE_FP32, dims: [1] }]\n'
        'output [{ name: "y", data_type: TYPE_FP32, dims: [1] }]\n'
    )
    headers = dict(endpoints.triton_headers)
    x = np.random.default_rng(11).random((2, 1, 8, 8), dtype=np.float32)
    expected = direct_combination(ensemble, x)
    codes = []
    with grpcclient.InferenceServerClient(endpoints.triton_grpc) as triton:
        loading = threading.Thread(
            target=lambda: triton.load_model("slow_to_load", headers=headers)
        )
        loading.start()
        with EnsembleClient(endpoints.ensemble) as client:
            while loading.is_alive():
                try:
                    right = np.allclose(client.predict(x), expected, rtol=1e-4, atol=1e-6)
                    codes.append("OK" if right else "wrong")
                except Unavailable as e:
                    codes.append(str(e))
        loading.join()  # before the channel closes
        triton.unload_model("slow_to_load", headers=headers)
    assert len(codes) > 10 and set(codes) == {"OK"}, set(codes)
