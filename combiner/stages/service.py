"""The ensemble behind both endpoints: one request through the paper's three stages.

Per request: check it against the ensemble's tensors (:mod:`combiner.stages.request`: a bad one gets
INVALID_ARGUMENT naming the problem, and touches no member), put it in a batch
(:mod:`combiner.stages.batching`), wait for the batch's members (:mod:`combiner.stages.predict`)
until the request's own deadline (stopping as much before it as answers lately took to be ready, so
that the answer is out by the deadline), combine the answers of those that made it
(:mod:`combiner.stages.combination`) if they meet the quorum, and shape the response. The gRPC and
HTTP endpoints (:mod:`combiner.endpoints.server`, :mod:`combiner.endpoints.http`) only translate to
and from it.

A request that gives up (its deadline, or its client went away) stops its own wait; the batch's
calls go on, owned by the prediction stage. While Triton is down (:mod:`combiner.triton.watch`; with
several nodes, while some member has no node up: :mod:`combiner.triton.nodes`) requests get
UNAVAILABLE at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from combiner import metrics
from combiner.config import CombinerConfig, TensorInfo
from combiner.endpoints.client_shm import NOBODY, Caller, ClientRegion, ClientRegions
from combiner.errors import RequestError
from combiner.sdk.protocol import CONTRIBUTORS, MISSING, TIER, format_missing
from combiner.stages.batching import Batcher, Placement, Rows
from combiner.stages.combination import Combination
from combiner.stages.predict import Prediction, Predictor
from combiner.stages.prediction import is_late
from combiner.stages.request import RequestReader
from combiner.triton.nodes import Nodes

__all__ = ["EnsembleService", "RequestError"]

log = logging.getLogger("chorus.combiner")

# After the drain: wait for this long a quiet (no new request), at most _SETTLE_MAX_S.
_SETTLE_QUIET_S = 0.05
_SETTLE_MAX_S = 1.0


class EnsembleService:
    def __init__(self, config: CombinerConfig, nodes: Nodes) -> None:
        self.config = config
        self.nodes = nodes
        self.regions = ClientRegions(
            config.client_shared_memory,
            config.client_shm_max_regions,
            config.client_shm_max_bytes,
            config.client_shm_max_total,
        )
        self.combination = Combination(config)
        self.outputs: dict[str, TensorInfo] = {
            **{t.name: t for t in config.outputs},
            **{n: d[0] for n, d in config.uncertainty_outputs().items()},
        }
        self.reader = RequestReader(config, self.outputs, self.regions)
        self.predictor = Predictor(config, nodes)
        self._batcher: Batcher[Prediction] | None = (
            Batcher(
                self.predictor.start,
                config.max_batch_size,
                config.max_in_flight,
                config.batch_fill_ms / 1000.0,
            )
            if config.batching
            else None
        )
        self._quorum = config.quorum_count()
        self._lead = _Lead()
        self._member_names = tuple(m.name for m in config.members)
        tiers = config.cascade.tiers if config.cascade else (self._member_names,)
        self._tier_of = {m: k for k, tier in enumerate(tiers) for m in tier}
        self._in_flight = 0  # requests being served (not those parked while stopping)
        self._draining = False
        self._idle = asyncio.Event()  # no request in flight, while draining
        self._released = asyncio.Event()  # parked requests may be refused now
        self._last_arrival = 0.0  # loop time of the last request parked while draining

    async def start(self) -> None:
        """Reclaim what stopped processes left in shared memory; start watching Triton."""
        await self.nodes.start()

    async def close(self, drain_s: float) -> None:
        """After the endpoints stopped taking requests: let the batches end (up to
        ``drain_s``), then the calls still running on Triton, which are never cancelled: they
        are kept until they end, up to the member timeout (a call may still write into the
        shared memory, and cancelling one can crash Triton 2.51); then give the shared memory
        back."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        if self._batcher is not None:
            await self._batcher.close()
        await self.predictor.close(max(0.0, began + drain_s - loop.time()))
        calls_until = began + max(drain_s, self.config.member_timeout_ms / 1000.0)
        await self.nodes.close(max(0.0, calls_until - loop.time()))
        self.regions.close()

    def ready(self) -> bool:
        return self.nodes.ready and not self._draining

    async def drain(self, timeout: float) -> bool:
        """Stop taking requests for now: a new one is parked (and served once the endpoints
        have stopped listening, see :meth:`release`); wait up to ``timeout`` for those in
        flight to be answered, then until no new request has come for a moment (a client that
        got its answer sends its next one: it is parked, not left in transit). Whether every
        request in flight was answered."""
        self._draining = True
        loop = asyncio.get_running_loop()
        self._last_arrival = loop.time()
        if self._in_flight == 0:
            self._idle.set()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            log.warning("%d request(s) still in flight after %.0f s", self._in_flight, timeout)
            return False
        until = loop.time() + _SETTLE_MAX_S
        while loop.time() - self._last_arrival < _SETTLE_QUIET_S and loop.time() < until:
            await asyncio.sleep(_SETTLE_QUIET_S / 5)
        return True

    def release(self) -> None:
        """Serve the requests parked while draining: they reached a listener, so they are
        answered; the endpoints have stopped listening, so what their clients send next goes
        elsewhere rather than into this closing server."""
        self._released.set()

    def check_room(self) -> None:
        """Refuse a request before its body is read when this worker serves all it takes."""
        if self._in_flight >= self.config.max_requests_in_flight:
            raise self._full()

    def _full(self) -> RequestError:
        return RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{self.config.max_requests_in_flight} requests are in flight on this worker, "
            "the most it takes; retry later",
        )

    def extensions(self) -> list[str]:
        """The KServe/Triton protocol extensions both endpoints implement."""
        return ["binary_tensor_data"] + (["system_shared_memory"] if self.regions.enabled else [])

    def is_ours(self, name: str, version: str) -> bool:
        return name == self.config.name and version in ("", "1")

    def not_found(self, name: str, version: str) -> str:
        shown = f"{name!r}" + (f" version {version!r}" if version else "")
        return f"unknown model {shown}; this endpoint serves {self.config.name!r} (version 1)"

    async def infer(
        self,
        request: service_pb2.ModelInferRequest,
        remaining: float | None = None,
        caller: Caller = NOBODY,
    ) -> service_pb2.ModelInferResponse:
        """Answer one request. ``remaining``: seconds the client still waits, if it said;
        ``caller``: who sent it (the shared-memory regions it may name are its own). Every
        refusal or failure is a RequestError carrying its status."""
        if self._draining and not self._released.is_set():
            self._last_arrival = asyncio.get_running_loop().time()
            await self._released.wait()
        began = time.perf_counter()
        code = grpc.StatusCode.OK
        self._in_flight += 1
        metrics.IN_FLIGHT.inc()
        try:
            return await self._infer(request, remaining, caller)
        except RequestError as e:
            code = e.code
            raise
        except Exception as e:  # a bug: still an answer in the protocol, and in the log
            log.exception("request failed unexpectedly")
            code = grpc.StatusCode.INTERNAL
            raise RequestError(code, f"internal error: {type(e).__name__}: {e}") from e
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self._in_flight -= 1
            if self._in_flight == 0 and self._draining:
                self._idle.set()
            metrics.IN_FLIGHT.dec()
            metrics.REQUESTS.labels(code.name).inc()
            metrics.LATENCY.observe(time.perf_counter() - began)

    async def _infer(
        self, request: service_pb2.ModelInferRequest, remaining: float | None, caller: Caller
    ) -> service_pb2.ModelInferResponse:
        if not self.is_ours(request.model_name, request.model_version):
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                self.not_found(request.model_name, request.model_version),
            )
        if self._in_flight > self.config.max_requests_in_flight:
            raise self._full()
        inputs = self.reader.parse(request, caller)
        wanted, placed = self.reader.requested_outputs(request, caller)
        with contextlib.ExitStack() as held:  # the client's regions stay open until written
            for region, _, _ in placed.values():
                held.enter_context(region.held())
            return await self._answer(request, inputs, tuple(wanted), placed, remaining)

    async def _answer(
        self,
        request: service_pb2.ModelInferRequest,
        inputs: Rows,
        wanted: tuple[str, ...],
        placed: dict[str, tuple[ClientRegion, int, int]],
        remaining: float | None,
    ) -> service_pb2.ModelInferResponse:
        deadline = self.reader.deadline(request, remaining)
        stranded = self.nodes.stranded  # a bad request is bad whether Triton is there or not
        if stranded:  # the watch logged why, in gRPC's words: they name Triton's address
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                f"the members are not reachable: {', '.join(stranded)} (Triton unavailable; "
                "the error is in the combiner's log)",
            )
        loop = asyncio.get_running_loop()
        due = None if deadline is None else time.monotonic() + deadline
        # stop waiting a little early: the answer must be out by the deadline, not begun
        stop_at = None if deadline is None else loop.time() + deadline - self._lead.of(deadline)
        cascade = self.config.cascade is not None and self.reader.cascade(request)
        where = await self._place(inputs, wanted, stop_at, cascade)
        prediction = where.flight
        at_deadline = False
        try:
            if stop_at is None:
                await self._until_answered(where)
            else:
                async with asyncio.timeout_at(stop_at):
                    await self._until_answered(where)
        except TimeoutError:
            at_deadline = True  # answer with the members that made it
        finally:
            prediction.leave()  # also when the client went away: it stops only its own wait
        try:
            parts = self._parts(prediction, where.start, where.stop, deadline)
            if prediction.tiers is None:  # one part: the batch's combination may be shared
                ((contributors, _, missing),) = parts
                outputs = await self.combination.outputs(
                    prediction, contributors, where.start, where.stop, wanted
                )
            else:
                outputs = await self.combination.outputs_by_rows(
                    prediction, [(c, rows) for c, rows, _ in parts], where.start, where.stop, wanted
                )
                contributors = tuple(
                    m for m in self._member_names if any(m in c for c, _, _ in parts)
                )
                missing = {m: why for _, _, lost in parts for m, why in lost.items()}
            if missing:
                metrics.PARTIAL.inc()
            tiers = None
            if self.config.cascade is not None:
                tiers = np.empty(where.stop - where.start, dtype=np.int64)
                for c, rows, _ in parts:
                    tiers[rows - where.start] = max(self._tier_of[m] for m in c)
            return self._response(request.id, outputs, contributors, missing, placed, tiers)
        finally:
            if at_deadline and due is not None:
                self._lead.observe(time.monotonic() - due)

    @staticmethod
    async def _until_answered(where: Placement[Prediction]) -> None:
        """Until the request's rows are answered; never cancels what it waits for."""
        prediction = where.flight
        if prediction.tiers is None:
            await asyncio.shield(prediction.finished)
        else:  # its own rows, not the whole batch
            await prediction.rows_decided(where.start, where.stop)

    def _parts(
        self, p: Prediction, start: int, stop: int, deadline: float | None
    ) -> list[tuple[tuple[str, ...], np.ndarray, dict[str, str]]]:
        """The request's rows by the members that answer them (:meth:`Prediction.parts`), each
        part meeting its quorum, else the request's error."""
        late = f"no answer within {deadline * 1000:.0f} ms" if deadline is not None else None
        parts = []
        for part in p.parts(start, stop, late):
            if not part.contributors or len(part.contributors) < part.needed:
                raise _below_quorum(part.contributors, part.names, part.needed, part.lost)
            parts.append((part.contributors, part.rows, part.lost))
        return parts

    async def _place(
        self, inputs: Rows, wanted: tuple[str, ...], deadline_at: float | None, cascade: bool
    ) -> Placement[Prediction]:
        if self._batcher is not None:
            return await self._batcher.submit(inputs, wanted, deadline_at, cascade)
        prediction = self.predictor.start(inputs, wanted, (deadline_at,), cascade)
        prediction.expect(1)
        return Placement(prediction, 0, inputs.batch)

    def _response(
        self,
        request_id: str,
        outputs: dict[str, np.ndarray],
        contributors: tuple[str, ...],
        missing: dict[str, str],
        placed: dict[str, tuple[ClientRegion, int, int]],
        tiers: np.ndarray | None = None,
    ) -> service_pb2.ModelInferResponse:
        response = service_pb2.ModelInferResponse(
            model_name=self.config.name, model_version="1", id=request_id
        )
        response.parameters[CONTRIBUTORS].string_param = ",".join(contributors)
        if tiers is not None:
            response.parameters[TIER].string_param = ",".join(map(str, tiers.tolist()))
        if missing:
            response.parameters[MISSING].string_param = format_missing(missing)
        for name, array in outputs.items():
            info = self.outputs[name]
            data = array.tobytes()
            out = response.outputs.add(name=name, datatype=info.dtype, shape=array.shape)
            if name in placed:  # into the client's shared memory, not the response
                region, offset, size = placed[name]
                if len(data) > size:
                    raise RequestError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"output {name!r} needs {len(data)} bytes; shared-memory region "
                        f"{region.name!r} offers {size} at offset {offset}",
                    )
                region.write(offset, data, f"output {name!r}")
                out.parameters["shared_memory_region"].string_param = region.name
                out.parameters["shared_memory_offset"].int64_param = offset
                out.parameters["shared_memory_byte_size"].int64_param = len(data)
                response.raw_output_contents.append(b"")
            else:
                response.raw_output_contents.append(data)
        return response


class _Lead:
    """How long before its deadline a request stops waiting for the members, so that its answer
    is ready by the deadline (reading the members' answers, combining them and shaping the
    response take time, more when many requests are due at once): the 99th percentile of how
    late the answers at a deadline were ready, tracked step by step (each late one moves it up
    a step, each one on time down a 99th of a step), never more than a tenth of the deadline."""

    _STEP_S = 0.0002

    def __init__(self) -> None:
        self._lead = 0.0

    def of(self, deadline: float) -> float:
        return min(self._lead, deadline / 10)

    def observe(self, late: float) -> None:
        """An answer at its deadline was ready ``late`` seconds after it (< 0: before)."""
        step = self._STEP_S if late > 0 else -self._STEP_S / 99
        self._lead = max(0.0, self._lead + step)


def _below_quorum(
    contributors: tuple[str, ...], members: tuple[str, ...], quorum: int, missing: dict[str, str]
) -> RequestError:
    why = format_missing(missing)
    late = any(is_late(reason) for reason in missing.values())
    return RequestError(
        grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.UNAVAILABLE,
        f"{len(contributors)} of {len(members)} members answered, below the quorum of "
        f"{quorum}; missing: {why}",
    )
