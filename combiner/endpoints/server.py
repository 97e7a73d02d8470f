"""The combiner's endpoints: the KServe v2 gRPC servicer, and :func:`serve` for both protocols.

Every RPC translates to and from :class:`EnsembleService`; every failure is answered with a
gRPC status in the protocol (a bug is INTERNAL, never UNKNOWN). Messages larger than the
ensemble's request limit are refused by gRPC itself (RESOURCE_EXHAUSTED) before they are read;
a message that does not arrive within ``body_timeout_s`` of its call is answered
DEADLINE_EXCEEDED.

:func:`serve` runs until ``stop`` is set, then answers what it accepted (up to the drain
timeout), stops listening, answers what reached it meanwhile, lets the batches and the calls
on Triton end (never cancelling one) and gives back its shared memory. What clients may hold
open (connections, streams, idle time) is bounded (:mod:`combiner.endpoints.connections`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from tritonclient.grpc import model_config_pb2, service_pb2

from combiner import __version__
from combiner.config import CombinerConfig, TensorInfo
from combiner.endpoints.auth import HEALTH_METHODS, Credentials
from combiner.endpoints.client_shm import NOBODY, SESSION_HEADER, Caller
from combiner.endpoints.connections import BoundedSite, connection_limit
from combiner.endpoints.http import make_app
from combiner.errors import RequestError
from combiner.stages.service import EnsembleService
from combiner.triton.nodes import Nodes

__all__ = ["GrpcEndpoint", "Listen", "serve"]

log = logging.getLogger("chorus.combiner")

Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]

# after the drain, how long the requests parked meanwhile may take to be answered, at least
_LAST_ANSWERS_S = 5.0
# (no maximum_concurrent_rpcs: gRPC counts a call from its headers, so streams that never send
# their message would hold every place, health checks' included; the in-flight cap is the
# service's, once a message, bounded in size, has arrived)
_STREAM_ROOM = 64  # a connection's streams beyond the requests in flight: health, metadata


class _Undecodable:
    """What a request that is not a valid protobuf of its type decodes to, or that never came."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT):
        self.message, self.code = message, code

    @classmethod
    def invalid(cls, kind: str, error: Exception) -> _Undecodable:
        return cls(f"the request is not a valid {kind} protobuf ({error})")

    @classmethod
    def late(cls, timeout_s: float, evicted: bool = False) -> _Undecodable:
        return cls(
            "the request message did not arrive, and this worker had too many calls waiting "
            "for theirs"
            if evicted
            else f"the request message did not arrive within {timeout_s:g} s",
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )

    @classmethod
    def none(cls) -> _Undecodable:
        return cls("the call ended without a request message")


def _answered(method: Handler) -> Handler:
    """Turn a RequestError into its status, and anything unexpected into INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, _Undecodable):
                raise RequestError(request.code, request.message)
            return await method(self, request, context)
        except RequestError as e:
            code, message = e.code, str(e)
        except Exception as e:
            log.exception("gRPC %s failed unexpectedly", method.__name__)
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}"
        await context.abort(code, message)

    return wrapper


class GrpcEndpoint:
    def __init__(self, service: EnsembleService) -> None:
        self.service = service

    @_answered
    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    @_answered
    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.service.ready())

    @_answered
    async def ModelReady(self, request, context):
        ours = self.service.is_ours(request.name, request.version)
        return service_pb2.ModelReadyResponse(ready=ours and self.service.ready())

    @_answered
    async def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(
            name="chorus", version=__version__, extensions=self.service.extensions()
        )

    @_answered
    async def ModelMetadata(self, request, context):
        self._check_model(request.name, request.version)
        config = self.service.config
        return service_pb2.ModelMetadataResponse(
            name=config.name,
            versions=["1"],
            platform="chorus_ensemble",
            inputs=[_metadata(t) for t in config.inputs],
            outputs=[_metadata(t) for t in self.service.outputs.values()],
        )

    @_answered
    async def ModelConfig(self, request, context):
        self._check_model(request.name, request.version)
        config = self.service.config
        return service_pb2.ModelConfigResponse(
            config=model_config_pb2.ModelConfig(
                name=config.name,
                platform="chorus_ensemble",
                max_batch_size=config.max_batch_size,
                input=[
                    model_config_pb2.ModelInput(
                        name=t.name, data_type=_config_dtype(t.dtype), dims=list(t.shape)
                    )
                    for t in config.inputs
                ],
                output=[
                    model_config_pb2.ModelOutput(
                        name=t.name, data_type=_config_dtype(t.dtype), dims=list(t.shape)
                    )
                    for t in self.service.outputs.values()
                ],
            )
        )

    @_answered
    async def RepositoryIndex(self, request, context):
        state = "READY" if self.service.ready() else "UNAVAILABLE"
        model = service_pb2.RepositoryIndexResponse.ModelIndex(
            name=self.service.config.name, version="1", state=state
        )
        return service_pb2.RepositoryIndexResponse(models=[model])

    # -- system shared memory (KServe extension): a co-located client's own regions -----------

    @_answered
    async def SystemSharedMemoryRegister(self, request, context):
        self.service.regions.register(
            _caller(context), request.name, request.key, request.offset, request.byte_size
        )
        return service_pb2.SystemSharedMemoryRegisterResponse()

    @_answered
    async def SystemSharedMemoryUnregister(self, request, context):
        self.service.regions.unregister(_caller(context), request.name or None)
        return service_pb2.SystemSharedMemoryUnregisterResponse()

    @_answered
    async def SystemSharedMemoryStatus(self, request, context):
        response = service_pb2.SystemSharedMemoryStatusResponse()
        for r in self.service.regions.status(_caller(context), request.name or None):
            response.regions[r.name].CopyFrom(
                service_pb2.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size
                )
            )
        return response

    # -- inference ------------------------------------------------------------------------------

    @_answered
    async def ModelInfer(self, request, context):
        caller = _caller(context) if self.service.regions.enabled else NOBODY  # (per request)
        return await self.service.infer(request, context.time_remaining(), caller)

    def _check_model(self, name: str, version: str) -> None:
        if not self.service.is_ours(name, version):
            raise RequestError(grpc.StatusCode.NOT_FOUND, self.service.not_found(name, version))


def _caller(context: grpc.aio.ServicerContext) -> Caller:
    """Who calls, for client shared memory: its session header, and its peer (gRPC shows a
    servicer no connection object)."""
    session = next((v for k, v in context.invocation_metadata() or () if k == SESSION_HEADER), None)
    return Caller(session if isinstance(session, str) else None, context.peer())


_SERVICE = "inference.GRPCInferenceService"


def _handlers(
    endpoint: GrpcEndpoint, timeout_s: float, unread_limit: int
) -> dict[str, grpc.RpcMethodHandler]:
    """The KServe v2 service's handlers, as the generated code builds them, but with requests
    that do not decode answered INVALID_ARGUMENT (grpc would say UNKNOWN, and log a traceback
    each time) and the RPCs Chorus does not serve answered UNIMPLEMENTED by name.

    The unary RPCs are served as stream-unary (the wire is the same for a unary client) so that
    their message is awaited under ``timeout_s``: a stream that sends its headers and never its
    message would otherwise hold its place until the connection closes; and at most
    ``unread_limit`` calls wait at once (:class:`_Unread`)."""
    unread = _Unread(unread_limit)
    service = service_pb2.DESCRIPTOR.services_by_name[_SERVICE.rsplit(".", 1)[1]]
    handlers = {}
    for method in service.methods:
        request_type = getattr(service_pb2, method.input_type.name)
        response_type = getattr(service_pb2, method.output_type.name)
        implemented = method.name in vars(GrpcEndpoint)
        if method.client_streaming:  # ModelStreamInfer: not served
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _unimplemented_stream(method.name)
            )
            continue
        handlers[method.name] = grpc.stream_unary_rpc_method_handler(
            _one_message(getattr(endpoint, method.name), timeout_s, unread)
            if implemented
            else _unimplemented_stream(method.name),
            request_deserializer=_tolerant(request_type),
            response_serializer=response_type.SerializeToString,
        )
    return handlers


class _Unread:
    """The calls waiting for their message, oldest first, at most ``limit`` per worker: a call
    past it ends the oldest wait at once. A client's message comes with its call, so only a
    stream that stalls on purpose waits long, and it is the one that goes; memory and the timers
    that fire together stay bounded, and no newcomer is refused."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._waiting: dict[asyncio.Timeout, None] = {}  # insertion order: oldest first
        self.evicted: set[asyncio.Timeout] = set()

    def add(self, wait: asyncio.Timeout) -> None:
        if len(self._waiting) >= self.limit:
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            self.evicted.add(oldest)
            oldest.reschedule(asyncio.get_running_loop().time())  # its timeout, now
        self._waiting[wait] = None

    def discard(self, wait: asyncio.Timeout) -> bool:
        """Forget ``wait``; whether it was ended to make room."""
        self._waiting.pop(wait, None)
        if wait in self.evicted:
            self.evicted.discard(wait)
            return True
        return False


def _one_message(
    method: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
    timeout_s: float,
    unread: _Unread,
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    """A unary method, fed the first message of its stream once it arrives within
    ``timeout_s`` (a message that does not is answered DEADLINE_EXCEEDED)."""

    async def handler(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        wait = asyncio.timeout(timeout_s)
        try:
            async with wait:
                unread.add(wait)
                try:
                    request = await anext(aiter(requests), None)
                finally:
                    evicted = unread.discard(wait)
        except TimeoutError:
            request = _Undecodable.late(timeout_s, evicted)
        return await method(request if request is not None else _Undecodable.none(), context)

    return handler


def _tolerant(message_type: Any) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception as e:  # DecodeError, or anything protobuf may raise on bad bytes
            return _Undecodable.invalid(message_type.__name__, e)

    return deserialize


def _unimplemented(name: str) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, f"{name} is not served by this endpoint (Chorus)"
        )

    return refuse


def _unimplemented_stream(name: str) -> Callable[[Any, grpc.aio.ServicerContext], Any]:
    refuse = _unimplemented(name)

    async def refuse_stream(requests: Any, context: grpc.aio.ServicerContext) -> None:
        await refuse(None, context)

    return refuse_stream


class _TokenCheck(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuse every call but the health checks without the bearer token."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

        async def deny(requests: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "this endpoint needs the metadata 'authorization: Bearer <token>'",
            )

        # (neither reads the request: a stream that never sends it holds nothing)
        self._deny = grpc.stream_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(deny)

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        method = details.method.rsplit("/", 1)[-1]
        metadata = dict(details.invocation_metadata or ())
        if method in HEALTH_METHODS or self._credentials.allows(metadata.get("authorization")):
            return await continuation(details)
        return self._deny_stream if method == "ModelStreamInfer" else self._deny


@dataclass(frozen=True)
class Listen:
    """Where and how the endpoints listen."""

    host: str = "127.0.0.1"
    grpc_port: int = 8100
    http_port: int | None = None
    reuse_port: bool = False  # other workers listen on the same ports
    credentials: Credentials = field(default_factory=Credentials)
    ready_file: Path | None = None  # touched once the endpoints listen


async def serve(config: CombinerConfig, listen: Listen, stop: asyncio.Event) -> None:
    """Serve the ensemble over gRPC and, with ``listen.http_port``, HTTP/REST, until ``stop``
    is set; then drain (see the module's docstring)."""
    key = Path(config.triton_key_file).read_text().strip() if config.triton_key_file else None
    service = EnsembleService(config, Nodes(config, key))
    drain = config.drain_timeout_s
    last_answers = max(drain, _LAST_ANSWERS_S)
    credentials = listen.credentials
    await service.start()  # before listening: a connection accepted means a working endpoint
    connections = connection_limit(config.max_connections)
    server = grpc.aio.server(
        interceptors=[_TokenCheck(credentials)] if credentials.token else None,
        options=[
            ("grpc.max_receive_message_length", config.grpc_request_limit()),
            ("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.so_reuseport", int(listen.reuse_port)),
            ("grpc.max_allowed_incoming_connections", connections),
            ("grpc.max_connection_idle_ms", int(config.idle_timeout_s * 1000)),
            ("grpc.server_handshake_timeout_ms", 10_000),
            # one client may keep as many calls in flight as the worker takes (fewer: a client
            # opening streams before it has the server's settings gets some refused)
            ("grpc.max_concurrent_streams", config.max_requests_in_flight + _STREAM_ROOM),
        ],
    )
    handlers = _handlers(
        GrpcEndpoint(service), config.body_timeout_s, config.max_requests_in_flight + _STREAM_ROOM
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    # ModelInfer's handler is looked up in C; the others go through the generic handler. (Not
    # every method: grpc.aio waits on one pending call per registered method, and each call
    # that arrives pays for that wait over all of them.)
    server.add_registered_method_handlers(_SERVICE, {"ModelInfer": handlers["ModelInfer"]})
    runner = web.AppRunner(
        make_app(service, credentials),
        access_log=None,
        auto_decompress=False,  # bodies are inflated within the limit (combiner.endpoints.body)
        shutdown_timeout=last_answers,
        keepalive_timeout=config.idle_timeout_s,  # from a connection's start, too
    )
    await runner.setup()
    address = f"{listen.host}:{listen.grpc_port}"
    try:
        if listen.http_port is not None:
            await BoundedSite(
                runner,
                listen.host,
                listen.http_port,
                reuse_port=listen.reuse_port or None,
                ssl_context=credentials.ssl_context(),
                limit=connections,
            ).start()
        tls = credentials.grpc_credentials()
        bound = server.add_secure_port(address, tls) if tls else server.add_insecure_port(address)
        if bound == 0:
            raise OSError(f"cannot listen on {address}")
        await server.start()
        if listen.ready_file is not None:
            listen.ready_file.touch()
        log.info(
            "serving ensemble %r on %s%s (Triton at %s)",
            config.name,
            address,
            f" and {'https' if credentials.tls else 'http'}://{listen.host}:{listen.http_port}"
            if listen.http_port
            else "",
            ", ".join(f"{n.name} {n.url}" for n in config.node_routes()),
        )
        await stop.wait()
        log.info("stopping: answering the requests in flight (up to %.0f s)", drain)
        await service.drain(drain)
    finally:
        # Stop listening (gRPC also tells its clients to go away), and only then serve the
        # requests parked meanwhile: they reached a listener, so they are answered, and what
        # their clients send next goes to a listener that is not closing (gRPC cancels what it
        # received but had not handed to the servicer when it shuts down, which is why they
        # were taken in and parked rather than left there).
        stopping = asyncio.gather(server.stop(grace=last_answers), runner.cleanup())
        await asyncio.sleep(0.05)
        service.release()
        await stopping
        await service.close(drain)
        log.info("stopped")


def _metadata(t: TensorInfo) -> service_pb2.ModelMetadataResponse.TensorMetadata:
    return service_pb2.ModelMetadataResponse.TensorMetadata(
        name=t.name, datatype=t.dtype, shape=[-1, *t.shape]
    )


def _config_dtype(dtype: str) -> int:
    return int(model_config_pb2.DataType.Value(f"TYPE_{dtype}"))
