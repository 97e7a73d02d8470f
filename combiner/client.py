"""Python SDK for a Chorus ensemble endpoint (any KServe v2 gRPC client works too).

    from combiner.client import EnsembleClient
    with EnsembleClient("127.0.0.1:8100") as client:
        probabilities = client.predict(images)

``AsyncEnsembleClient`` is the asyncio twin. On the combiner's host, ``shared_memory=True``
puts each call's input and output in a system shared-memory region of the client's (one per
call in flight, reused, unlinked on ``close``) instead of in the request and response (the
endpoint must allow it: ``chorus up --allow-client-shm``). Its registrations belong to a
session of this client's (a random secret sent as the ``chorus-shm-session`` header); when the
endpoint no longer knows a region (a restarted or reloaded worker, another worker after a
reconnect) the client registers it again and repeats the call (three tries in all). A region
whose call did not end in an answer (a timeout, a cancellation) is never reused: the server may
still write into it, so it is unregistered and unlinked. Regions have random names and are
never opened if they exist (a pid is no identity across PID namespaces sharing /dev/shm).
``token=`` sends the endpoint's bearer token; ``tls=True`` speaks TLS, trusting the system's
authorities or ``root_certificates`` (a PEM file).

Errors are one small tree, translated from gRPC's at
this edge::

    EnsembleError
    ├── InvalidRequest      the request was refused (INVALID_ARGUMENT); the message says why
    ├── ModelNotFound       no such ensemble on this endpoint (NOT_FOUND)
    ├── DeadlineExceeded    no answer in time (DEADLINE_EXCEEDED)
    ├── Unavailable         the endpoint or a member cannot be reached (UNAVAILABLE)
    └── ServerError         anything else the server reported (INTERNAL, ...)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import secrets
import threading
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

__all__ = [
    "Answer",
    "AsyncEnsembleClient",
    "DeadlineExceeded",
    "EnsembleClient",
    "EnsembleError",
    "InvalidRequest",
    "ModelNotFound",
    "ServerError",
    "Unavailable",
]

_MAX_MESSAGE = 2**31 - 1
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
]


class EnsembleError(Exception):
    """Base of every error the client raises."""

    code = ""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code or type(self).code


class InvalidRequest(EnsembleError):
    code = "INVALID_ARGUMENT"


class ModelNotFound(EnsembleError):
    code = "NOT_FOUND"


class DeadlineExceeded(EnsembleError):
    code = "DEADLINE_EXCEEDED"


class Unavailable(EnsembleError):
    code = "UNAVAILABLE"


class ServerError(EnsembleError):
    code = "INTERNAL"


_BY_CODE: dict[str, type[EnsembleError]] = {
    cls.code: cls for cls in (InvalidRequest, ModelNotFound, DeadlineExceeded, Unavailable)
}


def _translate(e: InferenceServerException) -> EnsembleError:
    status = (e.status() or "").removeprefix("StatusCode.")
    cls = _BY_CODE.get(status, ServerError)
    return cls(e.message() or str(e), status)


Inputs = np.ndarray | Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Answer:
    """The ensemble's outputs, with the members that contributed and why others are missing
    (a partial answer under a deadline and quorum)."""

    outputs: dict[str, np.ndarray]
    contributors: tuple[str, ...]
    missing: str = ""

    @property
    def partial(self) -> bool:
        return bool(self.missing)

    def value(self) -> np.ndarray | dict[str, np.ndarray]:
        """One output as an array, several as a mapping."""
        return next(iter(self.outputs.values())) if len(self.outputs) == 1 else self.outputs


_REGION_NAMES = itertools.count()
SESSION_HEADER = "chorus-shm-session"  # the same as the endpoint's (combiner.endpoints.client_shm)
# statuses after which the server may still be working on the call (the client gave up first)
_NO_ANSWER = {"StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED", None}
# a region the endpoint forgot is registered again, and the call repeated, this many times at
# most (a reconnect may land on another worker between the registration and the call)
_REGISTER_TRIES = 3


@dataclass
class _Region:
    name: str
    size: int
    handle: Any
    outputs: dict[str, tuple[int, tuple[int, ...], str]]  # name -> offset, shape, datatype

    @classmethod
    def create(cls, size: int) -> _Region:
        """A new segment of this client's own: a random name, and never one that exists (a
        pid is no identity across PID namespaces that share /dev/shm)."""
        size = max(1 << 16, 1 << (size - 1).bit_length())
        for _ in range(8):
            name = f"chorus_client_{os.getpid()}_{secrets.token_hex(8)}_{next(_REGION_NAMES)}"
            try:
                handle = shm.create_shared_memory_region(name, "/" + name, size, create_only=True)
            except shm.SharedMemoryException:
                continue  # the name exists: another one
            return cls(name, size, handle, {})
        raise EnsembleError("could not create a shared-memory region of the client's own")

    def destroy(self) -> None:
        shm.destroy_shared_memory_region(self.handle)


class _Regions:
    """The client's shared-memory regions: one per call in flight, reused."""

    def __init__(self) -> None:
        self.free: list[_Region] = []
        self.every: list[_Region] = []
        self.lock = threading.Lock()

    def take(self, size: int) -> _Region | None:
        with self.lock:
            fitting = [r for r in self.free if r.size >= size]
            if not fitting:
                return None
            region = min(fitting, key=lambda r: r.size)
            self.free.remove(region)
            return region

    def add(self, region: _Region) -> None:
        with self.lock:
            self.every.append(region)

    def give_back(self, region: _Region) -> None:
        region.outputs = {}
        with self.lock:
            self.free.append(region)

    def discard(self, region: _Region) -> None:
        """Its call ended without an answer: the server may still write into it."""
        with self.lock:
            self.every.remove(region)


def _forgotten(e: InferenceServerException) -> bool:
    """The endpoint does not know a region of ours (see the module's docstring)."""
    return (e.status() or "").endswith(
        "FAILED_PRECONDITION"
    ) and "unknown shared-memory region" in (e.message() or "")


class _Common:
    """What the blocking and the asyncio client share: all but the calls themselves."""

    def __init__(
        self,
        url: str,
        model: str | None,
        shared_memory: bool,
        token: str | None,
        tls: bool,
        root_certificates: str | None,
        module: Any,  # tritonclient.grpc or tritonclient.grpc.aio
    ) -> None:
        self.url = url
        self.model = model
        self._metadata: Any = None
        self._max_batch = 1
        self._regions = _Regions() if shared_memory else None
        headers = {"authorization": f"Bearer {token}"} if token else {}
        if shared_memory:
            headers[SESSION_HEADER] = uuid.uuid4().hex
        self._headers = headers or None
        self._client = module.InferenceServerClient(
            url,
            channel_args=_CHANNEL_ARGS,
            ssl=tls or root_certificates is not None,
            root_certificates=root_certificates,
        )

    def _arrays(self, x: Inputs) -> dict[str, np.ndarray]:
        names = [t["name"] for t in self._metadata["inputs"]]
        if isinstance(x, Mapping):
            return {n: np.ascontiguousarray(a) for n, a in x.items()}
        if len(names) == 1:
            return {names[0]: np.ascontiguousarray(x)}
        raise InvalidRequest(
            f"ensemble {self.model!r} takes several inputs ({names}); "
            "pass a mapping of name to array"
        )

    def _shm_size(self, arrays: dict[str, np.ndarray]) -> int:
        rows = len(next(iter(arrays.values())))
        size = sum(_aligned(a.nbytes) for a in arrays.values())
        for t in self._metadata["outputs"]:
            dims = [int(d) for d in t["shape"][1:]]
            if all(d >= 0 for d in dims):
                item = np.dtype(triton_to_np_dtype(t["datatype"])).itemsize
                size += _aligned(rows * math.prod(dims) * item)
        return size

    def _build_shm(
        self, arrays: dict[str, np.ndarray], region: _Region, module: Any
    ) -> tuple[list[Any], list[Any]]:
        """Inputs written into ``region``, and outputs asked there (those of known size)."""
        inputs, outputs, offset = [], [], 0
        for name, array in arrays.items():
            shm.set_shared_memory_region(region.handle, [array], offset=offset)
            tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_shared_memory(region.name, array.nbytes, offset)
            inputs.append(tensor)
            offset += _aligned(array.nbytes)
        rows = len(next(iter(arrays.values())))
        for t in self._metadata["outputs"]:
            requested = module.InferRequestedOutput(t["name"])
            dims = [int(d) for d in t["shape"][1:]]
            if all(d >= 0 for d in dims):
                shape = (rows, *dims)
                size = math.prod(shape) * np.dtype(triton_to_np_dtype(t["datatype"])).itemsize
                requested.set_shared_memory(region.name, size, offset)
                region.outputs[t["name"]] = (offset, shape, t["datatype"])
                offset += _aligned(size)
            outputs.append(requested)
        return inputs, outputs

    def _build(self, x: Inputs, module: Any) -> tuple[list[Any], list[Any]]:
        inputs = []
        for name, array in self._arrays(x).items():
            tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [module.InferRequestedOutput(t["name"]) for t in self._metadata["outputs"]]
        return inputs, outputs

    def _answer(self, result: Any, region: _Region | None = None) -> Answer:
        names = [t["name"] for t in self._metadata["outputs"]]
        placed = region.outputs if region is not None else {}
        params = result.get_response().parameters
        contributors = (
            params["chorus_contributors"].string_param if "chorus_contributors" in params else ""
        )
        missing = params["chorus_missing"].string_param if "chorus_missing" in params else ""
        return Answer(
            {
                n: np.array(  # a copy: the region serves the next call
                    shm.get_contents_as_numpy(
                        region.handle, triton_to_np_dtype(placed[n][2]), placed[n][1], placed[n][0]
                    )
                )
                if n in placed and region is not None
                else result.as_numpy(n)
                for n in names
            },
            tuple(c for c in contributors.split(",") if c),
            missing,
        )

    @staticmethod
    def _parameters(deadline_ms: float | None) -> dict[str, Any] | None:
        return None if deadline_ms is None else {"deadline_ms": float(deadline_ms)}

    def _split(self, x: Inputs, chunk: int | None) -> list[Inputs]:
        """``x`` in pieces of at most ``chunk`` rows (default: the ensemble's max batch)."""
        size = chunk or self._max_batch
        rows = len(next(iter(x.values()))) if isinstance(x, Mapping) else len(x)
        if isinstance(x, Mapping):
            return [{n: a[i : i + size] for n, a in x.items()} for i in range(0, rows, size)]
        return [x[i : i + size] for i in range(0, rows, size)]

    @staticmethod
    def _join(
        parts: list[np.ndarray | dict[str, np.ndarray]],
    ) -> np.ndarray | dict[str, np.ndarray]:
        first = parts[0]
        if isinstance(first, dict):
            return {n: np.concatenate([p[n] for p in parts]) for n in first}  # type: ignore[index]
        return np.concatenate(parts)  # type: ignore[arg-type]


def _aligned(size: int) -> int:
    return (size + 63) // 64 * 64


class EnsembleClient(_Common):
    """Blocking client. ``model`` defaults to the one ensemble the endpoint serves;
    ``shared_memory``: inputs and outputs through shared memory (same host only); ``token``:
    the endpoint's bearer token; ``tls``, ``root_certificates``: speak TLS."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        shared_memory: bool = False,
        token: str | None = None,
        tls: bool = False,
        root_certificates: str | None = None,
    ) -> None:
        super().__init__(url, model, shared_memory, token, tls, root_certificates, grpcclient)

    def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            try:
                if self.model is None:
                    index = self._client.get_model_repository_index(
                        as_json=True, headers=self._headers
                    )
                    self.model = index["models"][0]["name"]
                self._metadata = self._client.get_model_metadata(
                    self.model, as_json=True, headers=self._headers
                )
                config = self._client.get_model_config(
                    self.model, as_json=True, headers=self._headers
                )["config"]
                self._max_batch = int(config.get("max_batch_size", 1)) or 1
            except InferenceServerException as e:
                raise _translate(e) from e
        return dict(self._metadata)

    def predict_all(
        self,
        x: Inputs,
        chunk: int | None = None,
        concurrency: int = 8,
        timeout_s: float | None = None,
        deadline_ms: float | None = None,
    ) -> np.ndarray | dict[str, np.ndarray]:
        """``predict`` for any number of rows: split into chunks of the ensemble's max batch
        size (or ``chunk``), up to ``concurrency`` in flight together, answers in order."""
        self.metadata()
        parts = self._split(x, chunk)
        with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(parts)))) as pool:
            answers = list(pool.map(lambda p: self.predict(p, timeout_s, deadline_ms), parts))
        return self._join(answers)

    def ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready(headers=self._headers))
        except InferenceServerException:
            return False

    def predict(
        self, x: Inputs, timeout_s: float | None = None, deadline_ms: float | None = None
    ) -> np.ndarray | dict[str, np.ndarray]:
        """The ensemble's answer for ``x`` (an array, or a mapping name -> array); one output
        comes back as an array, several as a mapping."""
        return self.infer(x, timeout_s, deadline_ms).value()

    def infer(
        self, x: Inputs, timeout_s: float | None = None, deadline_ms: float | None = None
    ) -> Answer:
        """Like predict, with the contributing members: under a deadline the server may answer
        with the members that made it, if they meet its quorum."""
        self.metadata()
        region = None
        answered = False
        try:
            if self._regions is None:
                inputs, outputs = self._build(x, grpcclient)
            else:
                arrays = self._arrays(x)
                region = self._region(self._shm_size(arrays))
                inputs, outputs = self._build_shm(arrays, region, grpcclient)

            def call() -> Any:
                return self._client.infer(
                    self.model,
                    inputs,
                    outputs=outputs,
                    client_timeout=timeout_s,
                    parameters=self._parameters(deadline_ms),
                    headers=self._headers,
                )

            for attempt in range(_REGISTER_TRIES):
                try:
                    result = call()
                    break
                except InferenceServerException as e:
                    last = attempt == _REGISTER_TRIES - 1
                    if region is None or not _forgotten(e) or last:
                        answered = e.status() not in _NO_ANSWER
                        raise
                    self._register(region)
            answered = True
            return self._answer(result, region)
        except InferenceServerException as e:
            answered = answered or e.status() not in _NO_ANSWER
            raise _translate(e) from e
        finally:
            if region is not None:
                self._release(region, answered)

    def _region(self, size: int) -> _Region:
        assert self._regions is not None
        region = self._regions.take(size)
        if region is None:
            region = _Region.create(size)
            try:
                self._register(region)
            except BaseException:
                region.destroy()
                raise
            self._regions.add(region)
        return region

    def _register(self, region: _Region) -> None:
        try:
            self._client.register_system_shared_memory(
                region.name, "/" + region.name, region.size, headers=self._headers
            )
        except InferenceServerException as e:
            if not (e.status() or "").endswith("ALREADY_EXISTS"):
                raise

    def _release(self, region: _Region, answered: bool) -> None:
        assert self._regions is not None
        if answered:
            self._regions.give_back(region)
            return
        self._regions.discard(region)
        with contextlib.suppress(InferenceServerException):
            self._client.unregister_system_shared_memory(region.name, headers=self._headers)
        region.destroy()

    def close(self) -> None:
        """Unregister and unlink the client's shared memory, then close the channel."""
        if self._regions is not None:
            for region in self._regions.every:
                # if the endpoint is gone, its mapping went with it
                with contextlib.suppress(InferenceServerException):
                    self._client.unregister_system_shared_memory(region.name, headers=self._headers)
                region.destroy()
            self._regions = _Regions()
        self._client.close()

    def __enter__(self) -> EnsembleClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncEnsembleClient(_Common):
    """The asyncio twin of :class:`EnsembleClient`."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        shared_memory: bool = False,
        token: str | None = None,
        tls: bool = False,
        root_certificates: str | None = None,
    ) -> None:
        super().__init__(url, model, shared_memory, token, tls, root_certificates, aioclient)

    async def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            try:
                if self.model is None:
                    index = await self._client.get_model_repository_index(
                        as_json=True, headers=self._headers
                    )
                    self.model = index["models"][0]["name"]
                self._metadata = await self._client.get_model_metadata(
                    self.model, as_json=True, headers=self._headers
                )
                config = (
                    await self._client.get_model_config(
                        self.model, as_json=True, headers=self._headers
                    )
                )["config"]
                self._max_batch = int(config.get("max_batch_size", 1)) or 1
            except InferenceServerException as e:
                raise _translate(e) from e
        return dict(self._metadata)

    async def predict_all(
        self,
        x: Inputs,
        chunk: int | None = None,
        concurrency: int = 8,
        timeout_s: float | None = None,
        deadline_ms: float | None = None,
    ) -> np.ndarray | dict[str, np.ndarray]:
        """The asyncio twin of :meth:`EnsembleClient.predict_all`."""
        await self.metadata()
        limit = asyncio.Semaphore(max(1, concurrency))

        async def one(part: Inputs) -> np.ndarray | dict[str, np.ndarray]:
            async with limit:
                return await self.predict(part, timeout_s, deadline_ms)

        return self._join(list(await asyncio.gather(*(one(p) for p in self._split(x, chunk)))))

    async def predict(
        self, x: Inputs, timeout_s: float | None = None, deadline_ms: float | None = None
    ) -> np.ndarray | dict[str, np.ndarray]:
        return (await self.infer(x, timeout_s, deadline_ms)).value()

    async def infer(
        self, x: Inputs, timeout_s: float | None = None, deadline_ms: float | None = None
    ) -> Answer:
        await self.metadata()
        region = None
        answered = False
        try:
            if self._regions is None:
                inputs, outputs = self._build(x, aioclient)
            else:
                arrays = self._arrays(x)
                region = await self._region(self._shm_size(arrays))
                inputs, outputs = self._build_shm(arrays, region, aioclient)

            async def call() -> Any:
                return await self._client.infer(
                    self.model,
                    inputs,
                    outputs=outputs,
                    client_timeout=timeout_s,
                    parameters=self._parameters(deadline_ms),
                    headers=self._headers,
                )

            for attempt in range(_REGISTER_TRIES):
                try:
                    result = await call()
                    break
                except InferenceServerException as e:
                    last = attempt == _REGISTER_TRIES - 1
                    if region is None or not _forgotten(e) or last:
                        answered = e.status() not in _NO_ANSWER
                        raise
                    await self._register(region)
            answered = True
            return self._answer(result, region)
        except InferenceServerException as e:
            answered = answered or e.status() not in _NO_ANSWER
            raise _translate(e) from e
        finally:
            if region is not None:
                await self._release(region, answered)

    async def _region(self, size: int) -> _Region:
        assert self._regions is not None
        region = self._regions.take(size)
        if region is None:
            region = _Region.create(size)
            try:
                await self._register(region)
            except BaseException:
                region.destroy()
                raise
            self._regions.add(region)
        return region

    async def _register(self, region: _Region) -> None:
        try:
            await self._client.register_system_shared_memory(
                region.name, "/" + region.name, region.size, headers=self._headers
            )
        except InferenceServerException as e:
            if not (e.status() or "").endswith("ALREADY_EXISTS"):
                raise

    async def _release(self, region: _Region, answered: bool) -> None:
        assert self._regions is not None
        if answered:
            self._regions.give_back(region)
            return
        self._regions.discard(region)
        with contextlib.suppress(InferenceServerException):
            await self._client.unregister_system_shared_memory(region.name, headers=self._headers)
        region.destroy()

    async def close(self) -> None:
        """Unregister and unlink the client's shared memory, then close the channel."""
        if self._regions is not None:
            for region in self._regions.every:
                # if the endpoint is gone, its mapping went with it
                with contextlib.suppress(InferenceServerException):
                    await self._client.unregister_system_shared_memory(
                        region.name, headers=self._headers
                    )
                region.destroy()
            self._regions = _Regions()
        await self._client.close()

    async def __aenter__(self) -> AsyncEnsembleClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
