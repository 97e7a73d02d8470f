"""The ensemble's KServe v2 HTTP/REST endpoint, beside the gRPC one, with the same semantics.

Every route is a translation: an inference request becomes the same ``ModelInferRequest`` the gRPC
endpoint takes and goes through the same :meth:`EnsembleService.infer`, and its answer is written
back in the protocol (the bodies both ways, JSON and binary tensors, are translated by
:mod:`combiner.endpoints.http_codec`). This module holds the routes, the bearer-token check and the
errors. Bodies are read within the ensemble's request limit, and inflated within it too
(:mod:`combiner.endpoints.body`). Every error, the server's own (an unknown route, a wrong method, a
body too large) included, is ``{"error": "..."}`` with the HTTP status of its gRPC code; only
bytes that aiohttp's parser does not take for HTTP/1.1 (a request line or a header too long, an
unknown method, conflicting lengths, a bad chunk) get its plain-text 400 (or 413, 431), and the
connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import HttpVersion11, web

from combiner import __version__
from combiner.config import TensorInfo
from combiner.endpoints.auth import Credentials
from combiner.endpoints.body import BodyError, read_body
from combiner.endpoints.client_shm import NOBODY, SESSION_HEADER, Caller
from combiner.endpoints.connections import add_busy_tracking
from combiner.endpoints.http_codec import (
    HEADER_LENGTH,
    from_proto,
    invalid,
    is_int64,
    parse_json,
    to_proto,
)
from combiner.errors import RequestError
from combiner.stages.service import EnsembleService

__all__ = ["make_app"]

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
_CONTROL_LIMIT = 1 << 16  # a shared-memory registration is a small JSON object
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
    app.router.add_post("/v2/repository/index", _repository_index, expect_handler=_continue)
    shm = "/v2/systemsharedmemory"
    app.router.add_get(shm + "/status", _shm_status)
    app.router.add_get(shm + "/region/{region}/status", _shm_status)
    app.router.add_post(shm + "/region/{region}/register", _shm_register, expect_handler=_continue)
    app.router.add_post(shm + "/unregister", _shm_unregister, expect_handler=_continue)
    app.router.add_post(
        shm + "/region/{region}/unregister", _shm_unregister, expect_handler=_continue
    )
    for base in (model, versioned):
        app.router.add_get(base, _model_metadata)
        app.router.add_get(base + "/ready", _model_ready)
        app.router.add_get(base + "/config", _model_config)
        app.router.add_post(base + "/infer", _infer, expect_handler=_continue)
    return app


async def _continue(request: web.Request) -> None:
    """aiohttp's answer to ``Expect: 100-continue``, but a client gone before it is sent is
    not an error to log (aiohttp logged a traceback for each): its body, read next, is cut
    short (answered 400, to nobody)."""
    expect = request.headers.get("Expect", "")
    if request.version == HttpVersion11:
        if expect.lower() != "100-continue":
            raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
        with contextlib.suppress(ConnectionResetError):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # (not the answer's bytes)


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
    # by the route matched, not the path's text: '/v2/models/x%2Fready' ends in '/ready' once
    # decoded, but is a model's metadata
    health = request.match_info.handler in _HEALTH
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
    doc = parse_json(body or b"{}")
    if not isinstance(doc, dict) or not isinstance(doc.get("key"), str):
        raise invalid("register needs a JSON object with 'key', 'offset' and 'byte_size'")
    offset, size = doc.get("offset", 0), doc.get("byte_size")
    if not is_int64(offset) or not is_int64(size):
        raise invalid("'offset' and 'byte_size' must be 64-bit integers")
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


_HEALTH = frozenset({_live, _ready, _model_ready})  # what needs no token (auth.HEALTH_METHODS)


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
    proto, binary_outputs = to_proto(body, request.headers.get(HEADER_LENGTH), name, version)
    answer = await service.infer(
        proto, caller=_caller(request) if service.regions.enabled else NOBODY
    )
    response = from_proto(answer, binary_outputs)
    if "Accept-Encoding" in request.headers:
        response.enable_compression()
    return response
