"""The one way the combiner reaches Triton: its KServe v2 gRPC service, asynchronously.

Requests are forwarded as protobufs built directly from the client's request, so an input's
bytes are never decoded on the way to the members.
"""

from __future__ import annotations

import asyncio

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

__all__ = ["GRPC_OPTIONS", "MemberError", "Upstream"]

# Tensors can be large: lift gRPC's 4 MiB default on every channel and server.
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
]


class MemberError(Exception):
    """A member's call on Triton failed."""

    def __init__(self, member: str, code: grpc.StatusCode, details: str) -> None:
        self.member = member
        self.code = code
        self.details = details
        super().__init__(f"member {member!r} failed on Triton ({code.name}): {details}")


class Upstream:
    """An async channel to Triton's gRPC endpoint."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._channel = grpc.aio.insecure_channel(url, options=GRPC_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    async def infer(
        self, request: service_pb2.ModelInferRequest, timeout: float | None = None
    ) -> service_pb2.ModelInferResponse:
        try:
            response: service_pb2.ModelInferResponse = await self._stub.ModelInfer(
                request, timeout=timeout
            )
        except grpc.aio.AioRpcError as e:
            raise MemberError(request.model_name, e.code(), e.details() or "") from e
        return response

    async def models_ready(self, names: list[str]) -> bool:
        """Whether Triton is reachable and every named model is ready."""
        try:
            replies = await asyncio.gather(
                *(
                    self._stub.ModelReady(service_pb2.ModelReadyRequest(name=n), timeout=2.0)
                    for n in names
                )
            )
        except grpc.aio.AioRpcError:
            return False
        return all(r.ready for r in replies)

    async def register_shm(self, name: str, key: str, byte_size: int) -> None:
        await self._stub.SystemSharedMemoryRegister(
            service_pb2.SystemSharedMemoryRegisterRequest(name=name, key=key, byte_size=byte_size)
        )

    async def unregister_shm(self, name: str) -> None:
        await self._stub.SystemSharedMemoryUnregister(
            service_pb2.SystemSharedMemoryUnregisterRequest(name=name)
        )

    async def shm_status(self) -> service_pb2.SystemSharedMemoryStatusResponse:
        response: service_pb2.SystemSharedMemoryStatusResponse = (
            await self._stub.SystemSharedMemoryStatus(service_pb2.SystemSharedMemoryStatusRequest())
        )
        return response

    async def close(self) -> None:
        await self._channel.close()
