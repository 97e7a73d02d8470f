"""Request decoding under hypothesis: whatever a client sends (gRPC protobufs, HTTP bodies in
JSON or with binary tensors), decoding either yields a request or refuses it with a status in
the protocol (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED): never another exception, which
the endpoints would answer as an internal error."""

from __future__ import annotations

import json
import math
from typing import Any

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from combiner.config import CombinerConfig, MemberRoute, TensorInfo
from combiner.endpoints.client_shm import Caller, ClientRegions
from combiner.endpoints.http_codec import to_proto as _to_proto
from combiner.errors import RequestError
from combiner.stages.request import RequestReader

CONFIG = CombinerConfig(
    name="digits",
    triton_url="127.0.0.1:1",
    max_batch_size=64,
    inputs=(TensorInfo(name="image", dtype="FP32", shape=(1, 8, 8)),),
    outputs=(TensorInfo(name="logits", dtype="FP32", shape=(10,)),),
    members=(MemberRoute(name="m", inputs={"image": "image"}, outputs={"logits": "logits"}),),
    uncertainty=("entropy",),
)
OUTPUTS = {
    "logits": CONFIG.outputs[0],
    **{n: d[0] for n, d in CONFIG.uncertainty_outputs().items()},
}
ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,  # a shared-memory region this caller never registered
}
FUZZ = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


CALLER = Caller("f" * 32, "ipv4:127.0.0.1:1")


def decode(request: service_pb2.ModelInferRequest, enabled: bool = False) -> None:
    """What the service does with a request before any member is called."""
    reader = RequestReader(CONFIG, OUTPUTS, ClientRegions(enabled=enabled))
    try:
        reader.parse(request, CALLER)
        reader.requested_outputs(request, CALLER)
        seconds = reader.deadline(request, None)
        assert seconds is None or (math.isfinite(seconds) and seconds > 0)
    except RequestError as e:
        assert e.code in ALLOWED, e


int64 = st.integers(-(2**63), 2**63 - 1)
big_ints = st.one_of(st.integers(-3, 70), int64, st.integers(2**63, 2**80), st.just(64))
floats = st.floats(allow_nan=True, allow_infinity=True)
texts = st.text(max_size=12)
names = st.one_of(st.just("image"), st.just("logits"), st.just("logits_entropy"), texts)
dtypes = st.sampled_from(["FP32", "FP64", "INT64", "BYTES", "BOOL", "UINT8", "", "fp32", "X"])
scalars = st.one_of(st.none(), st.booleans(), big_ints, floats, texts)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(texts, inner, max_size=5)),
    max_leaves=30,
)
parameter_values = st.one_of(st.booleans(), big_ints, floats, texts, st.lists(scalars, max_size=2))
parameters = st.dictionaries(
    st.one_of(
        st.sampled_from(
            [
                "deadline_ms",
                "shared_memory_region",
                "shared_memory_offset",
                "shared_memory_byte_size",
                "binary_data_size",
                "binary_data",
                "binary_data_output",
            ]
        ),
        texts,
    ),
    parameter_values,
    max_size=4,
)


def mostly(draw: Any, plausible: st.SearchStrategy[Any], wild: st.SearchStrategy[Any]) -> Any:
    """Usually a plausible value (so decoding goes deep), sometimes anything."""
    return draw(wild if draw(st.integers(0, 9)) == 9 else plausible)


@st.composite
def http_requests(draw: Any) -> tuple[bytes, str | None]:
    """An inference request as tritonclient.http would send it, then bent."""
    binary = draw(st.binary(max_size=600))
    inputs = []
    for _ in range(draw(st.sampled_from([1, 0, 2, 3]))):
        rows = draw(st.integers(1, 70))
        item: dict[str, Any] = {}
        if draw(st.integers(0, 9)) != 9:
            item["name"] = mostly(draw, st.just("image"), names)
        if draw(st.integers(0, 9)) != 9:
            item["datatype"] = mostly(draw, st.just("FP32"), dtypes)
        if draw(st.integers(0, 9)) != 9:
            item["shape"] = mostly(
                draw,
                st.just([rows, 1, 8, 8]),
                st.one_of(st.lists(big_ints, max_size=5), json_values),
            )
        params = mostly(draw, parameters, json_values)
        payload = draw(st.sampled_from([1, 2, 1, 2, 0]))
        if payload == 1:
            item["data"] = mostly(
                draw,
                st.lists(floats, min_size=rows * 64, max_size=rows * 64),
                st.one_of(st.lists(st.lists(floats, max_size=70), max_size=3), json_values),
            )
        elif payload == 2 and isinstance(params, dict):
            params["binary_data_size"] = mostly(
                draw, st.sampled_from([rows * 256, len(binary)]), big_ints
            )
            item["parameters"] = params
        elif draw(st.booleans()):
            item["parameters"] = params
        inputs.append(item)
    doc: dict[str, Any] = {"inputs": mostly(draw, st.just(inputs), json_values)}
    if draw(st.booleans()):
        doc["id"] = mostly(draw, texts, json_values)
    if draw(st.booleans()):
        doc["parameters"] = mostly(draw, parameters, json_values)
    if draw(st.booleans()):
        doc["outputs"] = mostly(
            draw,
            st.lists(st.fixed_dictionaries({"name": names, "parameters": parameters}), max_size=3),
            json_values,
        )
    header = json.dumps(doc, allow_nan=True).encode()
    if draw(st.booleans()):
        return header + binary, mostly(
            draw, st.just(str(len(header))), st.one_of(st.integers(-5, 2000).map(str), texts)
        )
    return header, None


@FUZZ
@given(http_requests())
def test_any_http_inference_body_decodes_or_is_refused_in_the_protocol(request):
    body, header_length = request
    try:
        proto, _ = _to_proto(body, header_length, "digits", "")
    except RequestError as e:
        assert e.code in ALLOWED, e
        return
    decode(proto, enabled=True)


@FUZZ
@given(st.binary(max_size=300), st.one_of(st.none(), texts))
def test_any_bytes_as_an_http_body_are_refused_in_the_protocol(body, header_length):
    try:
        proto, _ = _to_proto(body, header_length, "digits", "1")
    except RequestError as e:
        assert e.code in ALLOWED, e
        return
    decode(proto)


@st.composite
def grpc_requests(draw: Any) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(
        model_name=draw(st.sampled_from(["digits", "other", ""])),
        model_version=draw(st.sampled_from(["", "1", "2"])),
    )
    _parameters(draw, request.parameters)
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(names), datatype=draw(dtypes), shape=draw(st.lists(int64, max_size=5))
        )
        _parameters(draw, tensor.parameters)
        if draw(st.booleans()):
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=70)))
    for _ in range(draw(st.integers(0, 3))):
        request.raw_input_contents.append(draw(st.binary(max_size=300)))
    for _ in range(draw(st.integers(0, 3))):
        _parameters(draw, request.outputs.add(name=draw(names)).parameters)
    return request


def _parameters(draw: Any, target: Any) -> None:
    for key, value in draw(parameters).items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int) and -(2**63) <= value < 2**63:
            target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        elif isinstance(value, str):
            target[key].string_param = value


@FUZZ
@given(grpc_requests(), st.booleans())
def test_any_grpc_inference_request_decodes_or_is_refused_in_the_protocol(request, enabled):
    decode(request, enabled)


def _refusal(request: service_pb2.ModelInferRequest) -> str:
    reader = RequestReader(CONFIG, OUTPUTS, ClientRegions(enabled=False))
    try:
        reader.parse(request, CALLER)
    except RequestError as e:
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT
        return str(e)
    raise AssertionError("accepted")


def _image(**contents: list[Any]) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="image", datatype="FP32", shape=[1, 1, 8, 8])
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    return request


def test_values_in_the_wrong_contents_field_are_named():
    """int_contents for an FP32 input was refused as 'carries 0 bytes'."""
    for contents in (
        {"int_contents": [1] * 64},
        {"fp32_contents": [0.5] * 64, "int_contents": [1]},
    ):
        said = _refusal(_image(**contents))
        assert "takes its values in contents.fp32_contents" in said and "int_contents" in said


def test_raw_and_typed_contents_together_are_refused():
    """The typed values were silently dropped for the raw bytes."""
    request = _image(fp32_contents=[0.5] * 64)
    request.raw_input_contents.append(bytes(256))
    assert "both in raw_input_contents and in contents" in _refusal(request)
