"""The one way the combiner reaches Triton: its KServe v2 gRPC service, asynchronously.

Requests are forwarded as protobufs built directly from the client's request, so an input's
bytes are never decoded on the way to the members. Every call to a restricted API (all but
health) carries Triton's key when the deployment has one (only Chorus holds it); health probes,
sent every 100 ms while Triton is down, never do: whoever holds Triton's port while it restarts
would get them first. Every call runs in a task this module owns: the caller may stop waiting,
but nothing it does cancels a call that Triton is running (see :mod:`combiner.tasks`).

A failed call's text (for a Python-backend member: its exception, traceback and file paths;
possibly values of the batch's rows, which are other clients') goes to the combiner's log, not
to clients: :attr:`MemberError.reason` is what they may be told.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from combiner.tasks import Owner

__all__ = ["GRPC_OPTIONS", "KEY_HEADER", "MemberError", "Upstream", "key_metadata"]

log = logging.getLogger("chorus.combiner")

# Tensors can be large: lift gRPC's 4 MiB default on the channel to Triton. After Triton
# restarts, reconnect within a fraction of a second, not gRPC's default of up to two minutes.
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

_CONTROL_WAIT_S = 10.0
_MAX_CONTROL_CALLS = 64

# Triton's restricted APIs check this header (gRPC prefixes it with "triton-grpc-protocol-").
KEY_HEADER = "chorus-key"

# Triton's "health" protocol, which is never restricted: these calls go without the key.
_OPEN = frozenset({"ServerLive", "ServerReady", "ModelReady"})


def key_metadata(key: str | None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata that opens Triton's restricted protocols with ``key``."""
    return () if key is None else ((f"triton-grpc-protocol-{KEY_HEADER}", key),)


class MemberError(Exception):
    """A member's call on Triton failed."""

    def __init__(self, member: str, code: grpc.StatusCode, details: str) -> None:
        self.member = member
        self.code = code
        self.details = details
        super().__init__(f"member {member!r} failed on Triton ({code.name}): {details}")

    @property
    def reason(self) -> str:
        """Why the member is missing, as a client may read it: the status code, not Triton's
        text (see the module's docstring)."""
        return f"{self.code.name}: failed on Triton (the error is in the combiner's log)"


class Upstream:
    """An async channel to Triton's gRPC endpoint; its calls belong to it, not to callers."""

    def __init__(self, url: str, key: str | None = None) -> None:
        self.url = url
        self._metadata = key_metadata(key)
        self._logged: dict[str, tuple[grpc.StatusCode, str]] = {}  # per model, the last error
        self._channel = grpc.aio.insecure_channel(url, options=GRPC_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self.calls = Owner("Triton inference call")
        self._control = Owner("Triton control call")

    def infer(self, request: service_pb2.ModelInferRequest) -> asyncio.Task[Any]:
        """Start a call; its task ends with the response or a :class:`MemberError`, and
        is never cancelled by anyone who waits for it."""
        return self.calls.spawn(self._infer(request))

    async def _infer(self, request: service_pb2.ModelInferRequest) -> Any:
        try:
            return await self._stub.ModelInfer(request, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise self._failed(request.model_name, e) from e

    def _failed(self, model: str, e: grpc.aio.AioRpcError) -> MemberError:
        """The error of a failed call, its full text logged (once while it repeats)."""
        error = MemberError(model, e.code(), e.details() or "")
        if self._logged.get(model) != (error.code, error.details):
            self._logged[model] = (error.code, error.details)
            log.warning("a call on Triton at %s failed: %s", self.url, error)
        return error

    async def _rpc(self, method: str, request: Any, wait_s: float | None = None) -> Any:
        """A control call in an owned task, without a gRPC deadline (its expiry would reach
        Triton as a cancellation); the caller waits at most ``wait_s`` seconds, then the call
        is left to end on its own."""

        metadata = () if method in _OPEN else self._metadata

        async def call() -> Any:
            try:
                return await getattr(self._stub, method)(request, metadata=metadata)
            except grpc.aio.AioRpcError as e:
                if method in _OPEN:  # the watch logs what it finds
                    raise MemberError("(Triton)", e.code(), e.details() or "") from e
                raise self._failed("(Triton)", e) from e

        task = self._control.spawn(call())
        if wait_s is None:
            return await asyncio.shield(task)
        try:
            async with asyncio.timeout(wait_s):
                return await asyncio.shield(task)
        except TimeoutError:
            raise MemberError(
                "(Triton)", grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {wait_s:g} s"
            ) from None

    async def readiness(self, names: list[str]) -> str | None:
        """None when Triton is live and every named model is ready, else why not. (Not
        Triton's ServerReady: with strict readiness it is false while any model loads, ours
        or not, as when another model is loaded beside the members.)"""
        if len(self._control) > _MAX_CONTROL_CALLS:  # a hung Triton: ask no more of it
            return f"Triton does not answer ({len(self._control)} calls outstanding)"
        try:
            server = await self._rpc("ServerLive", service_pb2.ServerLiveRequest(), 2.0)
            if not server.live:
                return "Triton is not live"
            replies = await asyncio.gather(
                *(
                    self._rpc("ModelReady", service_pb2.ModelReadyRequest(name=n), 2.0)
                    for n in names
                )
            )
        except MemberError as e:
            return f"Triton does not answer ({e.code.name}: {e.details})"
        not_ready = [n for n, r in zip(names, replies, strict=True) if not r.ready]
        return f"model(s) {', '.join(not_ready)} not ready on Triton" if not_ready else None

    async def register_shm(self, name: str, key: str, byte_size: int) -> None:
        await self._rpc(
            "SystemSharedMemoryRegister",
            service_pb2.SystemSharedMemoryRegisterRequest(name=name, key=key, byte_size=byte_size),
            _CONTROL_WAIT_S,
        )

    async def unregister_shm(self, name: str) -> None:
        await self._rpc(
            "SystemSharedMemoryUnregister",
            service_pb2.SystemSharedMemoryUnregisterRequest(name=name),
            _CONTROL_WAIT_S,
        )

    async def shm_status(self) -> service_pb2.SystemSharedMemoryStatusResponse:
        return await self._rpc(
            "SystemSharedMemoryStatus",
            service_pb2.SystemSharedMemoryStatusRequest(),
            _CONTROL_WAIT_S,
        )

    async def close(self, drain_s: float = 10.0) -> None:
        """Let the calls still running end (up to ``drain_s``), then close the channel."""
        if drain_s > 0:
            await self.calls.drain(drain_s)
        await self._control.drain(1.0)
        await self._channel.close()
