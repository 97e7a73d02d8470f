"""KServe v2 HTTP/REST inference bodies, translated to and from the gRPC protos
(:mod:`combiner.endpoints.http` serves them).

A request is JSON, or JSON followed by binary tensors with the ``Inference-Header-Content-Length``
header (the binary tensor extension); it becomes the same ``ModelInferRequest`` the gRPC endpoint
takes. An answer is written back as JSON, each output in the body's binary part when the client
asked (``binary_data``, as ``tritonclient.http`` does by default). JSON is JSON both ways: a
request's ``NaN``/``Infinity`` (which Python's json would take) and a value that no finite number
of its datatype holds are refused naming the input, and no body carries them. Every refusal is a
:class:`~combiner.errors.RequestError` with INVALID_ARGUMENT, raised before the request goes on.
"""

from __future__ import annotations

import json
import math
from typing import Any, TypeGuard

import grpc
import numpy as np
from aiohttp import web
from tritonclient.grpc import service_pb2
from tritonclient.utils import triton_to_np_dtype

from combiner.errors import RequestError

__all__ = ["HEADER_LENGTH", "from_proto", "invalid", "is_int64", "parse_json", "to_proto"]

HEADER_LENGTH = "Inference-Header-Content-Length"
_INT64 = (-(2**63), 2**63 - 1)


def invalid(message: str) -> RequestError:
    """A refusal of the request as the client sent it (INVALID_ARGUMENT, HTTP 400)."""
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def is_int64(value: object) -> TypeGuard[int]:
    """Whether a JSON value is an integer that fits 64 bits."""
    return (
        isinstance(value, int) and not isinstance(value, bool) and _INT64[0] <= value <= _INT64[1]
    )


def to_proto(
    body: bytes, header_length: str | None, model: str, version: str
) -> tuple[service_pb2.ModelInferRequest, set[str] | bool]:
    """The gRPC request an HTTP one stands for, and which outputs go back as binary (a set of
    names, or True/False for every output when the request names none)."""
    if header_length is None:
        header, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise invalid(
                f"header {HEADER_LENGTH} must be an integer, got {header_length!r}"
            ) from None
        if not 0 <= length <= len(body):
            raise invalid(f"header {HEADER_LENGTH} is {length} but the body has {len(body)} bytes")
        header, binary = body[:length], body[length:]
    doc = parse_json(header)
    if not isinstance(doc, dict):
        raise invalid("the request must be a JSON object with 'inputs'")
    try:
        return _build(doc, binary, model, version)
    except (ValueError, TypeError, OverflowError) as e:  # protobuf refused a value
        raise invalid(f"the request holds a value the protocol cannot carry ({e})") from None


def _build(
    doc: dict[str, Any], binary: bytes, model: str, version: str
) -> tuple[service_pb2.ModelInferRequest, set[str] | bool]:
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise invalid("'id' must be a string")
    proto = service_pb2.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    params = _object(doc.get("parameters"), "the request")
    _set_parameters(proto.parameters, params, "the request")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        raise invalid("the request has no 'inputs' list")
    offset = 0
    for i, item in enumerate(inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise invalid(f"input {i} must be an object with a 'name'")
        name = item["name"]
        datatype = item.get("datatype")
        shape = item.get("shape")
        if not isinstance(datatype, str):
            raise invalid(f"input {name!r} has no 'datatype'")
        if not isinstance(shape, list) or not all(is_int64(d) for d in shape):
            raise invalid(f"input {name!r} needs 'shape', a list of 64-bit integers")
        tensor = proto.inputs.add(name=name, datatype=datatype, shape=shape)
        item_params = dict(_object(item.get("parameters"), f"input {name!r}"))
        size = item_params.pop("binary_data_size", None)
        _set_parameters(tensor.parameters, item_params, f"input {name!r}")
        if size is not None:
            if "data" in item:  # (one would be dropped unseen)
                raise invalid(f"input {name!r} has both 'data' and binary_data_size")
            if not is_int64(size) or size < 0:
                raise invalid(
                    f"input {name!r}: binary_data_size must be a non-negative integer, got {size!r}"
                )
            if offset + size > len(binary):
                raise invalid(
                    f"input {name!r}: binary_data_size {size!r} runs past the "
                    f"{len(binary)} bytes of binary data"
                )
            proto.raw_input_contents.append(binary[offset : offset + size])
            offset += size
        elif "data" in item:
            proto.raw_input_contents.append(_json_bytes(name, datatype, shape, item["data"]))
        elif "shared_memory_region" in item_params:
            pass  # read by the request reader
        else:
            raise invalid(f"input {name!r} has neither 'data' nor binary_data_size")
    if offset != len(binary):
        raise invalid(
            f"the request carries {len(binary)} bytes of binary data but its inputs use {offset}"
        )
    default_binary = params.get("binary_data_output", False) is True
    outputs = doc.get("outputs")
    if not outputs:
        return proto, default_binary
    if not isinstance(outputs, list):
        raise invalid("'outputs' must be a list")
    binary_outputs = set()
    for i, item in enumerate(outputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise invalid(f"output {i} must be an object with a 'name'")
        out_params = dict(_object(item.get("parameters"), f"output {item['name']!r}"))
        if out_params.pop("binary_data", default_binary) is True:
            binary_outputs.add(item["name"])
        out = proto.outputs.add(name=item["name"])
        _set_parameters(out.parameters, out_params, f"output {item['name']!r}")
    return proto, binary_outputs


def _object(value: object, where: str) -> dict[str, Any]:
    """A 'parameters' value: an object, or absent."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"'parameters' of {where} must be an object")
    return value


def _set_parameters(target: Any, params: dict[str, Any], where: str) -> None:
    for key, value in params.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            if not is_int64(value):
                raise invalid(f"parameter {key!r} of {where} does not fit 64 bits")
            target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        elif isinstance(value, str):
            target[key].string_param = value
        else:
            raise invalid(f"parameter {key!r} of {where} must be a number, string or bool")


def _json_bytes(name: str, datatype: str, shape: list[int], data: object) -> bytes:
    """The raw bytes of a tensor given as JSON values (flattened row-major, or nested); its
    values are counted against its shape before any array is built."""
    dtype = triton_to_np_dtype(datatype)
    if dtype is None or dtype is np.object_ or any(d < 0 for d in shape):
        return b""  # the request reader names the datatype or shape it expected
    expected = math.prod(shape)
    values = _flatten(data, expected, name)
    if len(values) != expected:
        raise invalid(
            f"input {name!r}: 'data' has {len(values)} values; shape {shape} needs {expected}"
        )
    if np.dtype(dtype).kind in "iu":  # numpy would wrap 300 into an INT8 44, or cut 1.7 to 1
        info = np.iinfo(dtype)
        bad = next(
            (
                (i, v)
                for i, v in enumerate(values)
                if isinstance(v, bool) or not isinstance(v, int) or not info.min <= v <= info.max
            ),
            None,
        )
        if bad is not None and np.dtype(dtype).kind != "b":
            raise invalid(
                f"input {name!r}: 'data' value {bad[1]!r} at index {bad[0]} is not a {datatype} "
                f"integer (from {info.min} to {info.max})"
            )
    if np.dtype(dtype).kind == "f":  # numpy would take true for 1.0
        bad = next(((i, v) for i, v in enumerate(values) if isinstance(v, bool)), None)
        if bad is not None:
            raise invalid(
                f"input {name!r}: 'data' value {bad[1]!r} at index {bad[0]} is not a "
                f"{datatype} number"
            )
    try:
        with np.errstate(over="ignore"):  # a float too large for FP16/FP32 is inf: refused below
            array = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as e:
        raise invalid(f"input {name!r}: 'data' is not a list of {datatype} values ({e})") from None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        at = int(np.flatnonzero(~np.isfinite(array))[0])
        raise invalid(
            f"input {name!r}: 'data' value {values[at]!r} at index {at} is not a finite "
            f"{datatype} number (inputs must be finite)"
        )
    return array.tobytes()


def parse_json(body: bytes) -> Any:
    """A request body's JSON; anything that is not JSON, or not JSON Python reads (nesting
    past the recursion limit, an integer of more digits than Python converts), is refused as
    INVALID_ARGUMENT naming why (json raises a bare ValueError for the digits)."""
    try:
        return json.loads(body, parse_constant=_not_json)
    except _NotJSON as e:
        raise invalid(f"the request is not valid JSON: {e}") from None
    except RecursionError:
        raise invalid("the request is not valid JSON Chorus reads: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer's digits
        raise invalid(f"the request is not valid JSON: {type(e).__name__}: {e}") from None


class _NotJSON(ValueError):
    pass


def _not_json(constant: str) -> None:
    """What Python's json would read as a float, but JSON does not have."""
    raise _NotJSON(f"{constant} is not a JSON number (inputs must be finite)")


def _flatten(data: object, most: int, name: str) -> list[int | float]:
    """The numbers of a nested list, row-major; refused as soon as there are more than
    ``most``, or something else than a number or a list."""
    values: list[int | float] = []
    stack = [iter([data])]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        elif isinstance(item, int | float):
            values.append(item)
            if len(values) > most:
                raise invalid(
                    f"input {name!r}: 'data' has more than the {most} values its shape needs"
                )
        else:
            raise invalid(f"input {name!r}: 'data' must hold numbers, found {type(item).__name__}")
    return values


_END = object()


def from_proto(
    answer: service_pb2.ModelInferResponse, binary_outputs: set[str] | bool
) -> web.Response:
    """The HTTP answer to an inference: JSON, followed by the outputs asked as binary (the JSON's
    length in the ``Inference-Header-Content-Length`` header)."""
    doc: dict[str, Any] = {"model_name": answer.model_name, "model_version": answer.model_version}
    if answer.id:
        doc["id"] = answer.id
    doc["parameters"] = {k: v.string_param for k, v in answer.parameters.items()}
    parts = []
    outputs = []
    for out, raw in zip(answer.outputs, answer.raw_output_contents, strict=True):
        tensor: dict[str, Any] = {
            "name": out.name,
            "datatype": out.datatype,
            "shape": list(out.shape),
        }
        binary = binary_outputs if isinstance(binary_outputs, bool) else out.name in binary_outputs
        if "shared_memory_region" in out.parameters:  # written to the client's region
            tensor["parameters"] = {
                "shared_memory_region": out.parameters["shared_memory_region"].string_param,
                "shared_memory_offset": out.parameters["shared_memory_offset"].int64_param,
                "shared_memory_byte_size": out.parameters["shared_memory_byte_size"].int64_param,
            }
        elif binary:
            tensor["parameters"] = {"binary_data_size": len(raw)}
            parts.append(raw)
        else:
            tensor["data"] = np.frombuffer(raw, dtype=triton_to_np_dtype(out.datatype)).tolist()
        outputs.append(tensor)
    doc["outputs"] = outputs
    # answers are finite (combiner.stages.combination): this only keeps the body JSON, whatever
    try:
        header = json.dumps(doc, allow_nan=False).encode()
    except ValueError:
        raise RequestError(
            grpc.StatusCode.INTERNAL,
            "the answer holds a NaN or infinite value, which JSON cannot carry",
        ) from None
    if not parts:
        return web.Response(body=header, content_type="application/json")
    return web.Response(
        body=b"".join([header, *parts]),
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )
