"""Python SDK for a Chorus ensemble endpoint (any KServe v2 gRPC client works too).

    from combiner.client import EnsembleClient
    with EnsembleClient("127.0.0.1:8100") as client:
        probabilities = client.predict(images)

``AsyncEnsembleClient`` is the asyncio twin. Errors are one small tree, translated from gRPC's at
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
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

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


class _Common:
    def __init__(self, url: str, model: str | None) -> None:
        self.url = url
        self.model = model
        self._metadata: Any = None
        self._max_batch = 1

    def _build(self, x: Inputs, module: Any) -> tuple[list[Any], list[Any]]:
        meta = self._metadata
        names = [t["name"] for t in meta["inputs"]]
        if isinstance(x, Mapping):
            arrays = dict(x)
        elif len(names) == 1:
            arrays = {names[0]: x}
        else:
            raise InvalidRequest(
                f"ensemble {self.model!r} takes several inputs ({names}); "
                "pass a mapping of name to array"
            )
        inputs = []
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [module.InferRequestedOutput(t["name"]) for t in meta["outputs"]]
        return inputs, outputs

    def _answer(self, result: Any) -> Answer:
        names = [t["name"] for t in self._metadata["outputs"]]
        params = result.get_response().parameters
        contributors = (
            params["chorus_contributors"].string_param if "chorus_contributors" in params else ""
        )
        missing = params["chorus_missing"].string_param if "chorus_missing" in params else ""
        return Answer(
            {n: result.as_numpy(n) for n in names},
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


class EnsembleClient(_Common):
    """Blocking client. ``model`` defaults to the one ensemble the endpoint serves."""

    def __init__(self, url: str, model: str | None = None) -> None:
        super().__init__(url, model)
        self._client = grpcclient.InferenceServerClient(url, channel_args=_CHANNEL_ARGS)

    def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            try:
                if self.model is None:
                    index = self._client.get_model_repository_index(as_json=True)
                    self.model = index["models"][0]["name"]
                self._metadata = self._client.get_model_metadata(self.model, as_json=True)
                config = self._client.get_model_config(self.model, as_json=True)["config"]
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
            return bool(self._client.is_server_ready())
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
        inputs, outputs = self._build(x, grpcclient)
        try:
            result = self._client.infer(
                self.model,
                inputs,
                outputs=outputs,
                client_timeout=timeout_s,
                parameters=self._parameters(deadline_ms),
            )
        except InferenceServerException as e:
            raise _translate(e) from e
        return self._answer(result)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> EnsembleClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncEnsembleClient(_Common):
    """The asyncio twin of :class:`EnsembleClient`."""

    def __init__(self, url: str, model: str | None = None) -> None:
        super().__init__(url, model)
        self._client = aioclient.InferenceServerClient(url, channel_args=_CHANNEL_ARGS)

    async def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            try:
                if self.model is None:
                    index = await self._client.get_model_repository_index(as_json=True)
                    self.model = index["models"][0]["name"]
                self._metadata = await self._client.get_model_metadata(self.model, as_json=True)
                config = (await self._client.get_model_config(self.model, as_json=True))["config"]
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
        inputs, outputs = self._build(x, aioclient)
        try:
            result = await self._client.infer(
                self.model,
                inputs,
                outputs=outputs,
                client_timeout=timeout_s,
                parameters=self._parameters(deadline_ms),
            )
        except InferenceServerException as e:
            raise _translate(e) from e
        return self._answer(result)

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> AsyncEnsembleClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
