"""The blocking client: the core's steps, each call made with ``tritonclient.grpc``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

import tritonclient.grpc as grpcclient

from combiner.sdk.answer import Answer, Inputs, Outputs
from combiner.sdk.core import Core, Steps
from combiner.sdk.tensors import join

__all__ = ["EnsembleClient"]

T = TypeVar("T")


class EnsembleClient:
    """Blocking client of the ensemble endpoint at ``url`` (``host:port``, gRPC).

    ``model``: the ensemble (default: the one the endpoint serves); ``shared_memory``: inputs
    and outputs through a shared-memory region of the client's (same host only; the endpoint
    must allow it); ``token``: the endpoint's bearer token; ``tls``, ``root_certificates`` (a
    PEM file): speak TLS. Nothing is sent before the first call. Safe to use from several
    threads; close it (or use it as a context manager) to free its regions and channel.
    """

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
        self._client = grpcclient.InferenceServerClient(url, **self._core.connection)

    def _run(self, steps: Steps[T]) -> T:
        """Make each call the steps ask for, until they return."""
        try:
            call = next(steps)
            while True:
                try:
                    result = getattr(self._client, call.method)(*call.args, **call.kwargs)
                except BaseException as e:
                    call = steps.throw(e)
                else:
                    call = steps.send(result)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

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

    def metadata(self) -> dict[str, Any]:
        """The ensemble's KServe v2 metadata: ``name``, ``inputs`` and ``outputs`` (each a list
        of ``{"name", "datatype", "shape"}``, shape ``[-1, *per-row shape]``)."""
        return self._run(self._core.metadata())

    def ready(self) -> bool:
        """Whether the endpoint answers that it is ready (False when it cannot be reached)."""
        return self._run(self._core.ready())

    def predict(
        self,
        x: Inputs,
        timeout_s: float | None = None,
        deadline_ms: float | None = None,
        *,
        cascade: bool = True,
    ) -> Outputs:
        """The ensemble's answer for ``x``.

        ``x``: a numpy array of shape ``(batch, *input shape)`` in the dtype of the ensemble's
        input (see :meth:`metadata`), or, for several inputs, a mapping of input name to such an
        array; ``batch`` is at most the ensemble's max batch size (see :meth:`predict_all`).
        Returns a numpy array of shape ``(batch, *output shape)`` in the dtype of the ensemble's
        output (e.g. float32 probabilities of shape ``(batch, classes)``) when the ensemble has
        one output, else a dict of output name to such an array. ``timeout_s``: the client's
        wait (then :class:`DeadlineExceeded`); ``deadline_ms``: the server answers by then with
        the members that made it, if they meet its quorum; ``cascade=False``: an ensemble with a
        cascade answers with every member, not from its first tiers.
        """
        return self.infer(x, timeout_s, deadline_ms, cascade=cascade).value()

    def infer(
        self,
        x: Inputs,
        timeout_s: float | None = None,
        deadline_ms: float | None = None,
        *,
        cascade: bool = True,
    ) -> Answer:
        """Like :meth:`predict`, as an :class:`Answer`: every output by name, the members that
        contributed and those missing (under a deadline, with why), and with a cascade the tier
        that answered each row."""
        return self._run(self._core.infer(x, timeout_s, deadline_ms, cascade))

    def predict_all(
        self,
        x: Inputs,
        chunk: int | None = None,
        concurrency: int = 8,
        timeout_s: float | None = None,
        deadline_ms: float | None = None,
        *,
        cascade: bool = True,
    ) -> Outputs:
        """:meth:`predict` for any number of rows: split into chunks of the ensemble's max batch
        size (or ``chunk``), up to ``concurrency`` in flight together, answers in order (the
        same types and shapes as :meth:`predict`'s, ``batch`` being all of ``x``'s rows)."""
        parts = self._run(self._core.parts(x, chunk))
        with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(parts)))) as pool:
            answers = list(
                pool.map(lambda p: self.predict(p, timeout_s, deadline_ms, cascade=cascade), parts)
            )
        return join(answers)

    def close(self) -> None:
        """Unregister and unlink the client's shared memory, then close the channel."""
        self._run(self._core.close())

    def __enter__(self) -> EnsembleClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
