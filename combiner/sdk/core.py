"""The client without its I/O, shared by the blocking and the asyncio client.

Each operation (``metadata``, ``ready``, ``infer``, ``close``) is a generator of *steps*: it
yields a :class:`Call` on tritonclient's ``InferenceServerClient`` and is sent that call's
result back (or has its exception thrown in), until it returns the operation's value. The
blocking client makes each call with ``tritonclient.grpc``, the asyncio one awaits it with
``tritonclient.grpc.aio``; what to call, with which headers, when to register a region again and
repeat the call, when a region is reused or discarded, and how an answer is read, is written
once, here.
"""

from __future__ import annotations

import math
import numbers
import uuid
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

import numpy as np
from tritonclient.utils import InferenceServerException

from combiner.sdk.answer import Answer, Inputs
from combiner.sdk.errors import EnsembleError, InvalidRequest, translate
from combiner.sdk.protocol import CASCADE, DEADLINE_MS, SESSION_HEADER, UNKNOWN_REGION
from combiner.sdk.regions import Region, Regions
from combiner.sdk.tensors import Request, Signature, split

__all__ = ["Call", "Core", "Steps"]

T = TypeVar("T")

_MAX_MESSAGE = 2**31 - 1
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
]
# statuses after which the server may still be working on the call (the client gave up first)
_NO_ANSWER = {"StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED", None}
# a region the endpoint forgot is registered again, and the call repeated, this many times at
# most (a reconnect may land on another worker between the registration and the call)
_REGISTER_TRIES = 3


@dataclass(frozen=True)
class Call:
    """``InferenceServerClient.<method>(*args, **kwargs)``, for a client to make."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


Steps: TypeAlias = Generator[Call, Any, T]


def _forgotten(e: InferenceServerException) -> bool:
    """The endpoint does not know a region of ours (a restarted or reloaded worker, another
    worker after a reconnect)."""
    return (e.status() or "").endswith("FAILED_PRECONDITION") and UNKNOWN_REGION in (
        e.message() or ""
    )


def _answered(e: InferenceServerException) -> bool:
    """The call ended in the server's answer (an error), not in the client's giving up."""
    return e.status() not in _NO_ANSWER


def _positive(value: object) -> bool:
    if not isinstance(value, numbers.Real) or isinstance(value, bool | np.bool_):
        return False
    try:
        number = float(value)
    except OverflowError:  # (an int past float's range)
        return False
    return math.isfinite(number) and number > 0


def _header_value(token: object) -> bool:
    return (
        isinstance(token, str)
        and token.isascii()
        and token.isprintable()
        and token == token.strip()
    )


class Core:
    """One client's state (its ensemble, its headers, its regions) and its operations as steps."""

    def __init__(
        self,
        url: str,
        model: str | None,
        shared_memory: bool,
        token: str | None,
        tls: bool,
        root_certificates: str | None,
    ) -> None:
        self.url = url
        self.model = model
        self.max_batch = 1
        self.regions = Regions() if shared_memory else None
        self.closed = False
        self._metadata: dict[str, Any] | None = None
        self._signature: Signature | None = None
        if token is not None and not _header_value(token):  # (gRPC said 'Invalid metadata')
            raise ValueError(
                "the token must be printable ASCII without spaces or line breaks around it "
                "(read from a file: strip it)"
            )
        headers = {"authorization": f"Bearer {token}"} if token else {}
        if shared_memory:
            headers[SESSION_HEADER] = uuid.uuid4().hex  # the session's secret
        self.headers = headers or None
        # InferenceServerClient(url, **connection)
        self.connection: dict[str, Any] = {
            "channel_args": _CHANNEL_ARGS,
            "ssl": tls or root_certificates is not None,
            "root_certificates": root_certificates,
        }

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Call:
        return Call(method, args, {**kwargs, "headers": self.headers})

    def metadata(self) -> Steps[dict[str, Any]]:
        """The ensemble's KServe v2 metadata (asked once); the ensemble is the endpoint's only
        one unless the client was given ``model``."""
        if self._metadata is None:
            if self.closed:
                raise EnsembleError("this client is closed; make a new one")
            try:
                if self.model is None:
                    index = yield self._call("get_model_repository_index", as_json=True)
                    self.model = index["models"][0]["name"]
                metadata = yield self._call("get_model_metadata", self.model, as_json=True)
                for t in (*metadata.get("inputs", ()), *metadata.get("outputs", ())):
                    t["shape"] = [int(d) for d in t["shape"]]  # (JSON's int64s are strings)
                self._metadata = metadata
                self._signature = Signature.of(self.model, self._metadata)
                config = yield self._call("get_model_config", self.model, as_json=True)
                self.max_batch = int(config["config"].get("max_batch_size", 1)) or 1
            except InferenceServerException as e:
                raise translate(e) from e
        return dict(self._metadata)

    def ready(self) -> Steps[bool]:
        if self.closed:
            return False
        try:
            return bool((yield self._call("is_server_ready")))
        except InferenceServerException:
            return False

    def parts(self, x: Inputs, chunk: int | None) -> Steps[list[Inputs]]:
        """``x`` in pieces of at most ``chunk`` rows (default: the ensemble's max batch)."""
        if chunk is not None:
            if isinstance(chunk, bool | np.bool_) or not isinstance(chunk, numbers.Integral):
                raise InvalidRequest(f"chunk must be a whole number of rows, got {chunk!r}")
            if chunk < 1:
                raise InvalidRequest(f"chunk must be at least 1 row, got {chunk!r}")
            chunk = int(chunk)
        yield from self.metadata()
        assert self._signature is not None
        return split(self._signature.arrays(x), chunk or self.max_batch)

    def infer(
        self, x: Inputs, timeout_s: float | None, deadline_ms: float | None, cascade: bool = True
    ) -> Steps[Answer]:
        """One call; through a region of the client's when it has shared memory, registered
        again and the call repeated if the endpoint forgot it. ``cascade=False`` asks an
        ensemble with a cascade for every member's answer."""
        if not isinstance(cascade, bool):  # a string "false" would be true
            raise TypeError(f"cascade must be True or False, got {cascade!r}")
        if self.closed:
            raise EnsembleError("this client is closed; make a new one")
        for name, value in (("timeout_s", timeout_s), ("deadline_ms", deadline_ms)):
            if value is not None and not _positive(value):  # (-1 had been DeadlineExceeded)
                raise InvalidRequest(f"{name} must be a positive number or None, got {value!r}")
        yield from self.metadata()
        assert self._signature is not None
        signature = self._signature
        region = None
        answered = False
        try:
            arrays = signature.arrays(x)
            request: Request
            if self.regions is None:
                request = signature.request(arrays)
            else:
                region = yield from self._region(signature.region_size(arrays))
                request = signature.request_in(arrays, region)
            parameters: dict[str, float | bool] = {}
            if deadline_ms is not None:
                parameters[DEADLINE_MS] = float(deadline_ms)
            if not cascade:
                parameters[CASCADE] = False
            call = self._call(
                "infer",
                self.model,
                request.inputs,
                outputs=request.outputs,
                client_timeout=timeout_s,
                parameters=parameters or None,
            )
            for attempt in range(_REGISTER_TRIES):
                try:
                    result = yield call
                    break
                except InferenceServerException as e:
                    last = attempt == _REGISTER_TRIES - 1
                    if region is None or not _forgotten(e) or last:
                        answered = _answered(e)
                        raise
                    yield from self._register(region)
            answered = True
            return signature.answer(result, region)
        except InferenceServerException as e:
            answered = answered or _answered(e)
            raise translate(e) from e
        except Exception as e:
            if self.closed:  # (tritonclient's ValueError or grpc's UsageError)
                raise EnsembleError("the client was closed during this call") from e
            raise
        finally:
            if region is not None:
                yield from self._release(region, answered)

    def _region(self, size: int) -> Steps[Region]:
        """A free region of at least ``size`` bytes, or a new one, registered."""
        assert self.regions is not None
        yield from self._unregister_pending()
        region = self.regions.take(size)
        if region is None:
            region = Region.create(size)
            self.regions.add(region)  # (from here close() sees it, whatever interrupts)
            try:
                yield from self._register(region)
            except BaseException as e:
                self.regions.discard(region)
                try:  # the server may have registered it before the client gave up (a
                    # cancellation, a timeout): not left there, counted against the client's cap
                    if not (isinstance(e, InferenceServerException) and _answered(e)):
                        yield from self._unregister(region.name)
                finally:
                    region.destroy()
                raise
        return region

    def _register(self, region: Region) -> Steps[None]:
        try:
            yield self._call("register_system_shared_memory", region.name, region.key, region.size)
        except InferenceServerException as e:
            if not (e.status() or "").endswith("ALREADY_EXISTS"):
                raise

    def _release(self, region: Region, answered: bool) -> Steps[None]:
        """Its call ended: reuse the region after an answer, else unregister and unlink it."""
        assert self.regions is not None
        if answered and self.regions.give_back(region):
            return
        self.regions.discard(region)
        try:
            yield from self._unregister(region.name)
        finally:  # (unlinked even if this call is cancelled too)
            region.destroy()

    def _unregister(self, name: str) -> Steps[None]:
        """Unregister ``name`` on the server. Until the server has answered, it is pending: a
        cancellation of this call too (a second one) leaves it to the next call or close(),
        not registered there for good (64 such had filled the client's cap)."""
        assert self.regions is not None
        pending = self.regions.pending
        pending.add(name)
        try:
            yield self._call("unregister_system_shared_memory", name)
        except InferenceServerException:  # (an endpoint gone: so is it)
            pass
        except Exception:  # the channel closed under it (close() from another thread, task)
            if not self.closed:
                raise
        pending.discard(name)  # (a closed session's registrations the endpoint drops itself)

    def _unregister_pending(self) -> Steps[None]:
        assert self.regions is not None
        for name in list(self.regions.pending):
            yield from self._unregister(name)

    def close(self) -> Steps[None]:
        """Unregister and unlink the client's shared memory, then close the channel."""
        self.closed = True
        if self.regions is not None:
            free = self.regions.close()  # (those in use: their calls unlink them)
            yield from self._unregister_pending()
            for region in free:
                try:  # (if the endpoint is gone, its mapping went with it)
                    yield from self._unregister(region.name)
                finally:
                    region.destroy()
                    self.regions.discard(region)
        yield Call("close")
