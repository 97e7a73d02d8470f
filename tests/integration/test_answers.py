"""Answers are what was asked, on a real tritonserver: ``class_count`` is refused rather than
ignored, no HTTP body is anything but JSON (non-finite inputs are refused on every path, and a
non-finite combination is an error, never ``NaN`` in a body), and a member that answers fewer
rows than it was asked through shared memory is a missing member, never served."""

from __future__ import annotations

import asyncio
import json
import math
import urllib.error
import urllib.request
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from combiner.sdk import AsyncEnsembleClient, EnsembleClient, InvalidRequest, ServerError
from orchestrator.deploying.launch import free_port
from tests.integration.toy import combiner, overflowing, short, toy_config, toy_triton

FLT_MAX = float(np.finfo(np.float32).max)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Two combiners on one Triton. The first: members a, b (linear ONNX) and 'short' (one row
    too few), quorum 2, member outputs through shared memory whatever their size, client shared
    memory on. The second: a, b and 'overflow' (NaN on rows whose first value passes 1e37), all
    must answer. Each serves gRPC and HTTP."""
    root = tmp_path_factory.mktemp("answers")
    odd = {"short": (short(), 1), "overflow": (overflowing(), 1)}
    with toy_triton(root, odd) as (ensemble, triton):
        config = toy_config(
            triton,
            root,
            ["a", "b", "short"],
            quorum=2,
            shared_memory=True,
            output_shared_memory_min_bytes=0,
            client_shared_memory=True,
        )
        overflow = toy_config(triton, root, ["a", "b", "overflow"])
        ports = free_port(), free_port()
        with (
            combiner(root, "combiner", config, "--http-port", str(ports[0])) as (_, address),
            combiner(root, "overflow", overflow, "--http-port", str(ports[1])) as (_, other),
        ):
            yield {
                "toy": (ensemble, address, f"127.0.0.1:{ports[0]}"),
                "overflow": (other, f"127.0.0.1:{ports[1]}"),
            }


@pytest.fixture
def toy(stack):
    return stack["toy"]


def strict_json(body: bytes) -> Any:
    """``body`` parsed as JSON proper: NaN, Infinity and -Infinity are not JSON."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(body, parse_constant=refuse)


def post(http: str, doc: dict[str, Any], binary: bytes = b"") -> tuple[int, bytes]:
    """POST an inference request (JSON, then ``binary`` tensors); the status and body."""
    header = json.dumps(doc).encode()  # allow_nan: a careless client may send NaN
    headers = {"Content-Type": "application/json"}
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(header))
    request = urllib.request.Request(
        f"http://{http}/v2/models/toy/infer", data=header + binary, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def json_input(data: Any, rows: int = 1) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 4], "data": data}]}


def probabilities(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def reference(ensemble, x: np.ndarray, members=("a", "b")) -> np.ndarray:
    """The mean of the members' softmax, computed here from the ONNX files."""
    outs = [
        probabilities(ort.InferenceSession(str(m.path)).run(None, {"x": x})[0])
        for m in ensemble.members
        if m.name in members
    ]
    return np.mean(outs, axis=0)


def test_class_count_is_refused_naming_the_parameter_on_grpc(toy):
    _, address, _ = toy
    x = np.zeros((2, 4), dtype=np.float32)
    tensor = grpcclient.InferInput("x", [2, 4], "FP32")
    tensor.set_data_from_numpy(x)
    client = grpcclient.InferenceServerClient(address)
    try:
        with pytest.raises(InferenceServerException) as e:
            client.infer("toy", [tensor], outputs=[grpcclient.InferRequestedOutput("y", 3)])
    finally:
        client.close()
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "output 'y'" in e.value.message() and "'classification'" in e.value.message()


def test_class_count_is_refused_naming_the_parameter_on_http(toy):
    _, _, http = toy
    tensor = httpclient.InferInput("x", [2, 4], "FP32")
    tensor.set_data_from_numpy(np.zeros((2, 4), dtype=np.float32))
    client = httpclient.InferenceServerClient(http)
    try:
        with pytest.raises(InferenceServerException) as e:
            client.infer(
                "toy", [tensor], outputs=[httpclient.InferRequestedOutput("y", class_count=3)]
            )
    finally:
        client.close()
    assert e.value.status() == "400"
    assert "output 'y'" in e.value.message() and "'classification'" in e.value.message()


@pytest.mark.parametrize(
    "data",
    [
        [0.0, 0.0, 0.0, 0.0],
        [1.0, -2.0, 0.5, 3.0],
        [3e38, 0.0, 0.0, 0.0],
        [-3e38, 0.0, 0.0, 0.0],
        [3e38, 3e38, 3e38, 3e38],
        [3e38, -3e38, 3e38, -3e38],
        [FLT_MAX, FLT_MAX, -FLT_MAX, FLT_MAX],
        [1e30, 1e30, 1e30, 1e30],
    ],
    ids=["zeros", "small", "3e38-once", "-3e38-once", "3e38", "3e38-mixed", "max", "1e30"],
)
def test_every_http_answer_to_finite_input_is_strict_json_with_finite_values(toy, data):
    """Finite inputs, however large: a finite answer, or a clear error, always JSON."""
    _, _, http = toy
    status, body = post(http, json_input(data))
    doc = strict_json(body)
    if status == 200:
        (out,) = doc["outputs"]
        values = np.asarray(out["data"], dtype=np.float64)
        assert out["shape"] == [1, 3] and np.isfinite(values).all()
        np.testing.assert_allclose(values.sum(), 1.0, rtol=1e-5)  # probabilities
    else:
        assert status == 500 and "not finite" in doc["error"], (status, doc)


def test_a_large_but_finite_input_gets_a_finite_answer(toy):
    """3e38 in one place makes the linear members' logits infinite: their softmax is still
    a distribution (the infinite class takes it all), and so is the answer."""
    ensemble, address, _ = toy
    x = np.array([[3e38, 0.0, 0.0, 0.0]], dtype=np.float32)
    with EnsembleClient(address) as client:
        answer = client.infer(x)
    y = answer.outputs["y"]
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, rtol=1e-5)
    logits = [ort.InferenceSession(str(m.path)).run(None, {"x": x})[0][0] for m in ensemble.members]
    expected = []
    for row in logits:  # the limit of softmax as the input grows: +inf classes share it all
        top = row == np.inf if np.isposinf(row).any() else row == row.max()
        expected.append(top / top.sum() if np.isinf(row).any() else probabilities(row))
    np.testing.assert_allclose(y[0], np.mean(expected, axis=0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "literal", ["NaN", "Infinity", "-Infinity", "1e999", "3.5e38"], ids=lambda s: s
)
def test_a_json_input_that_is_not_a_finite_fp32_is_refused_naming_the_input(toy, literal):
    _, _, http = toy
    body = json.dumps(json_input([1.0, 2.0, 3.0, 4.0])).replace("4.0", literal).encode()
    request = urllib.request.Request(
        f"http://{http}/v2/models/toy/infer",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 400
    error = strict_json(e.value.read())["error"]
    if literal in ("NaN", "Infinity", "-Infinity"):  # not JSON at all
        assert f"not valid JSON: {literal} is not a JSON number" in error, error
    else:  # JSON numbers, but no finite FP32
        assert f"input 'x': 'data' value {float(literal)!r} at index 3" in error, error
        assert "not a finite FP32" in error, error


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_a_non_finite_input_is_refused_naming_the_input_on_every_path(toy, value):
    _, address, http = toy
    x = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, value, 0.0]], dtype=np.float32)
    with EnsembleClient(address) as client, pytest.raises(InvalidRequest) as grpc_raw:
        client.infer(x)
    with (
        EnsembleClient(address, shared_memory=True) as client,
        pytest.raises(InvalidRequest) as grpc_shm,
    ):
        client.infer(x)
    typed = service_pb2.ModelInferRequest(model_name="toy")
    typed.inputs.add(name="x", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend(
        x.ravel().tolist()
    )
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as grpc_typed:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(typed, timeout=10)
    assert grpc_typed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4]}]}
    doc["inputs"][0]["parameters"] = {"binary_data_size": x.nbytes}
    status, body = post(http, doc, x.tobytes())
    http_binary = strict_json(body)
    assert status == 400
    for message in (
        str(grpc_raw.value),
        str(grpc_shm.value),
        grpc_typed.value.details(),
        http_binary["error"],
    ):
        assert "input 'x'" in message and "not finite" in message, message
        assert "row 1" in message, message


def test_a_member_that_answers_fewer_rows_through_shared_memory_is_never_served(toy):
    """'short' writes one row too few into the batch's region: the row after them is an
    earlier batch's (or nothing); it is a missing member, and the answer is a's and b's."""
    ensemble, address, _ = toy
    rng = np.random.default_rng(3)
    with EnsembleClient(address) as client:
        for rows in (4, 4, 1, 3):  # regions come back from the pool with old bytes
            x = rng.normal(size=(rows, 4)).astype(np.float32)
            answer = client.infer(x)
            assert answer.contributors == ("a", "b")
            assert answer.missing == ("short",)
            reason = answer.reasons["short"]
            assert reason.startswith("INTERNAL: answered 'y' with shape"), reason
            assert f"expected [{rows}, 3]" in reason, reason
            np.testing.assert_allclose(answer.outputs["y"], reference(ensemble, x), rtol=1e-5)


def test_a_member_that_overflows_on_a_request_fails_that_request_and_no_other(stack):
    """'overflow' answers NaN on the rows that start with 3e38: the requests holding one get
    INTERNAL naming the output, their rows and the member; the others (the same batches, when
    they arrive together) are answered."""
    address, _ = stack["overflow"]
    rng = np.random.default_rng(11)
    xs = [rng.normal(size=(2, 4)).astype(np.float32) for _ in range(8)]
    for x in xs[::2]:
        x[1, 0] = 3e38

    async def send_all() -> list[Any]:
        async with AsyncEnsembleClient(address) as client:
            return await asyncio.gather(*(client.infer(x) for x in xs), return_exceptions=True)

    answers = asyncio.run(send_all())
    for i, answer in enumerate(answers):
        if i % 2 == 0:
            assert isinstance(answer, ServerError), answer
            assert answer.code == "INTERNAL"
            assert str(answer) == (
                "output 'y' is not finite in row(s) 1 of this request; the outputs of overflow "
                "there are not finite (an input outside the range they compute in?)"
            )
        else:
            assert not isinstance(answer, BaseException), answer
            y = answer.outputs["y"]
            assert np.isfinite(y).all() and answer.contributors == ("a", "b", "overflow")
            np.testing.assert_allclose(y.sum(axis=-1), 1.0, rtol=1e-5)


def test_a_non_finite_answer_over_http_is_a_json_error(stack):
    _, http = stack["overflow"]
    status, body = post(http, json_input([3e38, 0.0, 0.0, 0.0]))
    assert status == 500
    assert "output 'y' is not finite in row(s) 0" in strict_json(body)["error"]
