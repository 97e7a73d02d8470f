"""The ensemble's KServe v2 HTTP/REST endpoint, beside the gRPC one, with the same semantics.

Every route is a translation: an inference request (JSON, or JSON followed by binary tensors with
the ``Inference-Header-Content-Length`` header: the binary tensor extension) becomes the same
``ModelInferRequest`` the gRPC endpoint takes and goes through the same
:meth:`EnsembleService.infer`; its answer is written back as JSON, each output in the body's binary
part when the client asked (``binary_data``, as ``tritonclient.http`` does by default). Bodies are
read within the ensemble's request limit, and inflated within it too
(:mod:`combiner.endpoints.body`). Every error, the server's own (an unknown route, a wrong method, a
body too large) included, is ``{"error": "..."}`` with the HTTP status of its gRPC code. JSON is
JSON both ways: a request's ``NaN``/``Infinity`` (which Python's json would take) and a value that
no finite number of its datatype holds are refused naming the input, and no body carries them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeGuard

import grpc
import numpy as np
from aiohttp import web
from tritonclient.grpc import service_pb2
from tritonclient.utils import triton_to_np_dtype

from combiner import __version__
from combiner.config import TensorInfo
from combiner.endpoints.auth import Credentials
from combiner.endpoints.body import BodyError, read_body
from combiner.endpoints.client_shm import NOBODY, SESSION_HEADER, Caller
from combiner.endpoints.connections import add_busy_tracking
from combiner.errors import RequestError
from combiner.stages.service import EnsembleService

__all__ = ["make_app"]

_HEADER_LENGTH = "Inference-Header-Content-Length"
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_SERVICE = web.AppKey("service", EnsembleService)
_CREDENTIALS = web.AppKey("credentials", Credentials)
_INT64 = (-(2**63), 2**63 - 1)
log = logging.getLogger("chorus.combiner")


def make_app(service: EnsembleService, credentials: Credentials | None = None) -> web.Application:
    """The HTTP/REST app; serve it with ``auto_decompress=False`` (bodies are inflated here,
    within the limit)."""
    app = web.Application(
        client_max_size=service.config.request_limit(), middlewares=[_errors, _authorized]
    )
    app[_SERVICE] = service
    app[_CREDENTIALS] = credentials or Credentials()
    add_busy_tracking(app)  # which connections are idle (combiner.endpoints.connections)
    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    app.router.add_get("/v2/health/live", _live)
    app.router.add_get("/v2/health/ready", _ready)
    app.router.add_get("/v2", _server_metadata)
    app.router.add_post("/v2/repository/index", _repository_index)
    shm = "/v2/systemsharedmemory"
    app.router.add_get(shm + "/status", _shm_status)
    app.router.add_get(shm + "/region/{region}/status", _shm_status)
    app.router.add_post(shm + "/region/{region}/register", _shm_register)
    app.router.add_post(shm + "/unregister", _shm_unregister)
    app.router.add_post(shm + "/region/{region}/unregister", _shm_unregister)
    for base in (model, versioned):
        app.router.add_get(base, _model_metadata)
        app.router.add_get(base + "/ready", _model_ready)
        app.router.add_get(base + "/config", _model_config)
        app.router.add_post(base + "/infer", _infer)
    return app


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer in the protocol: aiohttp's own errors, and any bug, as JSON."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, e.text or e.reason)
    except RequestError as e:
        return _refusal(e)
    except BodyError as e:
        return _error(e.status, str(e))
    except Exception as e:
        log.exception("HTTP request %s %s failed unexpectedly", request.method, request.path)
        return _error(500, f"internal error: {type(e).__name__}")


@web.middleware
async def _authorized(request: web.Request, handler: Handler) -> web.StreamResponse:
    health = request.path.startswith("/v2/health/") or request.path.endswith("/ready")
    if health or request.app[_CREDENTIALS].allows(request.headers.get("Authorization")):
        return await handler(request)
    response = _error(401, "this endpoint needs 'Authorization: Bearer <token>'")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _caller(request: web.Request) -> Caller:
    """Who calls, for client shared memory: its session header, its peer (named as gRPC names
    its peers, ``ipv4:host:port``) and its connection."""
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport else None
    address = "unknown"
    if peer:
        host, port = peer[0], peer[1]
        address = f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
    return Caller(request.headers.get(SESSION_HEADER), address, transport)


def _refusal(e: RequestError) -> web.Response:
    return _error(_STATUS.get(e.code, 500), str(e))


def _names(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


def _check_model(request: web.Request) -> web.Response | None:
    service = request.app[_SERVICE]
    name, version = _names(request)
    if service.is_ours(name, version):
        return None
    return _error(404, service.not_found(name, version))


async def _live(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def _ready(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[_SERVICE].ready() else 400)


async def _server_metadata(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "name": "chorus",
            "version": __version__,
            "extensions": request.app[_SERVICE].extensions(),
        }
    )


async def _repository_index(request: web.Request) -> web.Response:
    service = request.app[_SERVICE]
    state = "READY" if service.ready() else "UNAVAILABLE"
    return web.json_response([{"name": service.config.name, "version": "1", "state": state}])


async def _shm_register(request: web.Request) -> web.Response:
    body = await read_body(request, _CONTROL_LIMIT)
    try:
        doc = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _invalid(f"the request is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("key"), str):
        raise _invalid("register needs a JSON object with 'key', 'offset' and 'byte_size'")
    offset, size = doc.get("offset", 0), doc.get("byte_size")
    if not _is_int(offset) or not _is_int(size):
        raise _invalid("'offset' and 'byte_size' must be 64-bit integers")
    request.app[_SERVICE].regions.register(
        _caller(request), request.match_info["region"], doc["key"], offset, size
    )
    return web.Response(status=200)


async def _shm_unregister(request: web.Request) -> web.Response:
    request.app[_SERVICE].regions.unregister(_caller(request), request.match_info.get("region"))
    return web.Response(status=200)


async def _shm_status(request: web.Request) -> web.Response:
    found = request.app[_SERVICE].regions.status(_caller(request), request.match_info.get("region"))
    return web.json_response(
        [
            {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
            for r in found
        ]
    )


async def _model_ready(request: web.Request) -> web.Response:
    service = request.app[_SERVICE]
    ok = service.is_ours(*_names(request)) and service.ready()
    return web.Response(status=200 if ok else 400)


async def _model_metadata(request: web.Request) -> web.Response:
    if (refused := _check_model(request)) is not None:
        return refused
    service = request.app[_SERVICE]

    def tensor(t: TensorInfo) -> dict[str, Any]:
        return {"name": t.name, "datatype": t.dtype, "shape": [-1, *t.shape]}

    return web.json_response(
        {
            "name": service.config.name,
            "versions": ["1"],
            "platform": "chorus_ensemble",
            "inputs": [tensor(t) for t in service.config.inputs],
            "outputs": [tensor(t) for t in service.outputs.values()],
        }
    )


async def _model_config(request: web.Request) -> web.Response:
    if (refused := _check_model(request)) is not None:
        return refused
    service = request.app[_SERVICE]

    def tensor(t: TensorInfo) -> dict[str, Any]:
        return {"name": t.name, "data_type": f"TYPE_{t.dtype}", "dims": list(t.shape)}

    return web.json_response(
        {
            "name": service.config.name,
            "platform": "chorus_ensemble",
            "max_batch_size": service.config.max_batch_size,
            "input": [tensor(t) for t in service.config.inputs],
            "output": [tensor(t) for t in service.outputs.values()],
        }
    )


async def _infer(request: web.Request) -> web.StreamResponse:
    service = request.app[_SERVICE]
    name, version = _names(request)
    service.check_room()  # before reading a byte of the body
    try:
        async with asyncio.timeout(service.config.body_timeout_s):  # slow senders
            body = await read_body(request, service.config.request_limit())
    except TimeoutError:
        raise BodyError(
            408, f"the request body did not arrive within {service.config.body_timeout_s:g} s"
        ) from None
    proto, binary_outputs = _to_proto(body, request.headers.get(_HEADER_LENGTH), name, version)
    answer = await service.infer(
        proto, caller=_caller(request) if service.regions.enabled else NOBODY
    )
    response = _from_proto(answer, binary_outputs)
    if "Accept-Encoding" in request.headers:
        response.enable_compression()
    return response


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _is_int(value: object) -> TypeGuard[int]:
    """Whether a JSON value is an integer that fits 64 bits."""
    return (
        isinstance(value, int) and not isinstance(value, bool) and _INT64[0] <= value <= _INT64[1]
    )


# a shared-memory registration is a small JSON object
_CONTROL_LIMIT = 1 << 16


def _to_proto(
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
            raise _invalid(
                f"header {_HEADER_LENGTH} must be an integer, got {header_length!r}"
            ) from None
        if not 0 <= length <= len(body):
            raise _invalid(
                f"header {_HEADER_LENGTH} is {length} but the body has {len(body)} bytes"
            )
        header, binary = body[:length], body[length:]
    try:
        doc = json.loads(header, parse_constant=_not_json)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _invalid(f"the request is not valid JSON: {type(e).__name__}: {e}") from None
    except _NotJSON as e:
        raise _invalid(f"the request is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise _invalid("the request must be a JSON object with 'inputs'")
    try:
        return _build(doc, binary, model, version)
    except (ValueError, TypeError, OverflowError) as e:  # protobuf refused a value
        raise _invalid(f"the request holds a value the protocol cannot carry ({e})") from None


def _build(
    doc: dict[str, Any], binary: bytes, model: str, version: str
) -> tuple[service_pb2.ModelInferRequest, set[str] | bool]:
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise _invalid("'id' must be a string")
    proto = service_pb2.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    params = _object(doc.get("parameters"), "the request")
    _set_parameters(proto.parameters, params, "the request")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        raise _invalid("the request has no 'inputs' list")
    offset = 0
    for i, item in enumerate(inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _invalid(f"input {i} must be an object with a 'name'")
        name = item["name"]
        datatype = item.get("datatype")
        shape = item.get("shape")
        if not isinstance(datatype, str):
            raise _invalid(f"input {name!r} has no 'datatype'")
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise _invalid(f"input {name!r} needs 'shape', a list of 64-bit integers")
        tensor = proto.inputs.add(name=name, datatype=datatype, shape=shape)
        item_params = dict(_object(item.get("parameters"), f"input {name!r}"))
        size = item_params.pop("binary_data_size", None)
        _set_parameters(tensor.parameters, item_params, f"input {name!r}")
        if size is not None:
            if not _is_int(size) or size < 0 or offset + size > len(binary):
                raise _invalid(
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
            raise _invalid(f"input {name!r} has neither 'data' nor binary_data_size")
    if offset != len(binary):
        raise _invalid(
            f"the request carries {len(binary)} bytes of binary data but its inputs use {offset}"
        )
    default_binary = params.get("binary_data_output", False) is True
    outputs = doc.get("outputs")
    if not outputs:
        return proto, default_binary
    if not isinstance(outputs, list):
        raise _invalid("'outputs' must be a list")
    binary_outputs = set()
    for i, item in enumerate(outputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _invalid(f"output {i} must be an object with a 'name'")
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
        raise _invalid(f"'parameters' of {where} must be an object")
    return value


def _set_parameters(target: Any, params: dict[str, Any], where: str) -> None:
    for key, value in params.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            if not _is_int(value):
                raise _invalid(f"parameter {key!r} of {where} does not fit 64 bits")
            target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        elif isinstance(value, str):
            target[key].string_param = value
        else:
            raise _invalid(f"parameter {key!r} of {where} must be a number, string or bool")


def _json_bytes(name: str, datatype: str, shape: list[int], data: object) -> bytes:
    """The raw bytes of a tensor given as JSON values (flattened row-major, or nested); its
    values are counted against its shape before any array is built."""
    dtype = triton_to_np_dtype(datatype)
    if dtype is None or dtype is np.object_ or any(d < 0 for d in shape):
        return b""  # the request reader names the datatype or shape it expected
    expected = math.prod(shape)
    values = _flatten(data, expected, name)
    if len(values) != expected:
        raise _invalid(
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
            raise _invalid(
                f"input {name!r}: 'data' value {bad[1]!r} at index {bad[0]} is not a {datatype} "
                f"integer (from {info.min} to {info.max})"
            )
    try:
        with np.errstate(over="ignore"):  # a float too large for FP16/FP32 is inf: refused below
            array = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as e:
        raise _invalid(f"input {name!r}: 'data' is not a list of {datatype} values ({e})") from None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        at = int(np.flatnonzero(~np.isfinite(array))[0])
        raise _invalid(
            f"input {name!r}: 'data' value {values[at]!r} at index {at} is not a finite "
            f"{datatype} number (inputs must be finite)"
        )
    return array.tobytes()


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
                raise _invalid(
                    f"input {name!r}: 'data' has more than the {most} values its shape needs"
                )
        else:
            raise _invalid(f"input {name!r}: 'data' must hold numbers, found {type(item).__name__}")
    return values


_END = object()


def _from_proto(
    answer: service_pb2.ModelInferResponse, binary_outputs: set[str] | bool
) -> web.Response:
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
        headers={_HEADER_LENGTH: str(len(header))},
    )
