"""The asyncio client: the core's steps, each call awaited with ``tritonclient.grpc.aio``."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, TypeVar

import tritonclient.grpc.aio as aioclient

from combiner.sdk.answer import Answer, Inputs, Outputs
from combiner.sdk.core import Core, Steps
from combiner.sdk.errors import EnsembleError
from combiner.sdk.tensors import join

__all__ = ["AsyncEnsembleClient"]

T = TypeVar("T")


class AsyncEnsembleClient:
    """The asyncio twin of :class:`~combiner.sdk.EnsembleClient`: the same arguments, the same
    methods (coroutines here), the same types in and out."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        shared_memory: bool = False,
        token: str | None = None,
        tls: bool = False,
        root_certificates: str | None = None,
    ) -> None:
        self._core = Core(url, model, shared_memory, token, tls, root_certificates)
        self._client = aioclient.InferenceServerClient(url, **self._core.connection)

    async def _run(self, steps: Steps[T]) -> T:
        """Await each call the steps ask for, until they return (a cancellation is thrown into
        them too: a region whose call it ended is discarded)."""
        try:
            call = next(steps)
            while True:
                try:
                    result = await getattr(self._client, call.method)(*call.args, **call.kwargs)
                except BaseException as e:
                    call = steps.throw(e)
                else:
                    call = steps.send(result)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._core.closed and task is not None and not task.cancelling():
                # grpc.aio cancels the calls of a channel it closes: not the caller's doing
                raise EnsembleError("the client was closed during this call") from None
            raise

    @property
    def url(self) -> str:
        return self._core.url

    @property
    def model(self) -> str | None:
        """The ensemble's name (known after the first call when not given)."""
        return self._core.model

    @model.setter
    def model(self, name: str | None) -> None:
        self._core.model = name

    async def metadata(self) -> dict[str, Any]:
        """See :meth:`EnsembleClient.metadata`."""
        return await self._run(self._core.metadata())

    async def ready(self) -> bool:
        """See :meth:`EnsembleClient.ready`."""
        return await self._run(self._core.ready())

    async def predict(
        self,
        x: Inputs,
        timeout_s: float | None = None,
        deadline_ms: float | None = None,
        *,
        cascade: bool = True,
    ) -> Outputs:
        """The ensemble's answer for ``x``: see :meth:`EnsembleClient.predict` (``x`` a numpy
        array of shape ``(batch, *input shape)`` in the ensemble's input dtype, or a mapping of
        input name to one; an array of shape ``(batch, *output shape)`` back, or a dict)."""
        return (await self.infer(x, timeout_s, deadline_ms, cascade=cascade)).value()

    async def infer(
        self,
        x: Inputs,
        timeout_s: float | None = None,
        deadline_ms: float | None = None,
        *,
        cascade: bool = True,
    ) -> Answer:
        """See :meth:`EnsembleClient.infer`."""
        return await self._run(self._core.infer(x, timeout_s, deadline_ms, cascade))

    async def predict_all(
        self,
        x: Inputs,
        chunk: int | None = None,
        concurrency: int = 8,
        timeout_s: float | None = None,
        deadline_ms: float | None = None,
        *,
        cascade: bool = True,
    ) -> Outputs:
        """See :meth:`EnsembleClient.predict_all`."""
        parts = await self._run(self._core.parts(x, chunk))
        limit = asyncio.Semaphore(max(1, concurrency))

        async def one(part: Inputs) -> Outputs:
            async with limit:
                return await self.predict(part, timeout_s, deadline_ms, cascade=cascade)

        calls = [asyncio.ensure_future(one(p)) for p in parts]
        try:
            return join(list(await asyncio.gather(*calls)))
        except BaseException:  # the first error: the other chunks end before it is raised
            for call in calls:  # (left running, they outlived a close() of the client)
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            raise

    async def close(self) -> None:
        """Unregister and unlink the client's shared memory, then close the channel."""
        await self._run(self._core.close())

    async def __aenter__(self) -> AsyncEnsembleClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
