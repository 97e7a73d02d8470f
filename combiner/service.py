"""The ensemble behind both endpoints: one request through the paper's three stages.

Per request: check it against the ensemble's tensors (:mod:`combiner.request`: a bad one gets
INVALID_ARGUMENT naming the problem, and touches no member), put it in a batch
(:mod:`combiner.batching`), wait for the batch's members (:mod:`combiner.predict`) until the
request's own deadline, combine the answers of those that made it
(:mod:`combiner.combination`) if they meet the quorum, and shape the response. The gRPC and
HTTP endpoints (:mod:`combiner.server`, :mod:`combiner.http`) only translate to and from it.

A request that gives up (its deadline, or its client went away) stops its own wait; the
batch's calls go on, owned by the prediction stage. While Triton is down (:mod:`combiner.watch`;
with several nodes, while some member has no node up: :mod:`combiner.nodes`) requests get
UNAVAILABLE at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from . import metrics
from .batching import Batcher, Placement, Rows
from .client_shm import ClientRegion, ClientRegions
from .combination import Combination
from .config import CombinerConfig, TensorInfo
from .errors import RequestError
from .nodes import Nodes
from .predict import Prediction, Predictor
from .request import RequestReader

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
        self._member_names = tuple(m.name for m in config.members)
        self._in_flight = 0  # requests being served (not those parked while stopping)
        self._draining = False
        self._idle = asyncio.Event()  # no request in flight, while draining
        self._released = asyncio.Event()  # parked requests may be refused now
        self._last_arrival = 0.0  # loop time of the last request parked while draining

    async def start(self) -> None:
        """Reclaim what stopped processes left in shared memory; start watching Triton."""
        await self.nodes.start()

    async def close(self, drain_s: float) -> None:
        """After the endpoints stopped taking requests: let the batches and the calls still
        running end (up to ``drain_s`` in all: a call may still write into the shared memory),
        then give the shared memory back."""
        loop = asyncio.get_running_loop()
        until = loop.time() + drain_s
        if self._batcher is not None:
            await self._batcher.close()
        await self.predictor.close(max(0.0, until - loop.time()))
        await self.nodes.drain_calls(max(0.0, until - loop.time()))
        await self.nodes.close()
        self.regions.close()

    def ready(self) -> bool:
        return self.nodes.ready and not self._draining

    async def drain(self, timeout: float) -> bool:
        """Stop taking requests: a new one is parked (and refused with UNAVAILABLE once the
        endpoints have stopped listening, see :meth:`release`); wait up to ``timeout`` for
        those in flight to be answered, then until no new request has come for a moment (a
        client that got its answer sends its next one: it is parked, not left in transit).
        Whether every request in flight was answered."""
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
        """Refuse the requests parked while draining (the endpoints have stopped listening, so
        their clients' retries go elsewhere rather than into this closing server)."""
        self._released.set()

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
        peer: str = "",
    ) -> service_pb2.ModelInferResponse:
        """Answer one request. ``remaining``: seconds the client still waits, if it said;
        ``peer``: the connection it came on (its shared-memory regions are that
        connection's). Every refusal or failure is a RequestError carrying its status."""
        if self._draining:
            self._last_arrival = asyncio.get_running_loop().time()
            await self._released.wait()
            metrics.REQUESTS.labels(grpc.StatusCode.UNAVAILABLE.name).inc()
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the endpoint is stopping; retry")
        began = time.perf_counter()
        code = grpc.StatusCode.OK
        self._in_flight += 1
        metrics.IN_FLIGHT.inc()
        try:
            return await self._infer(request, remaining, peer)
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
        self, request: service_pb2.ModelInferRequest, remaining: float | None, peer: str
    ) -> service_pb2.ModelInferResponse:
        if not self.is_ours(request.model_name, request.model_version):
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                self.not_found(request.model_name, request.model_version),
            )
        if self._in_flight > self.config.max_requests_in_flight:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.config.max_requests_in_flight} requests are in flight on this worker, "
                "the most it takes; retry later",
            )
        inputs = self.reader.parse(request, peer)
        wanted, placed = self.reader.requested_outputs(request, peer)
        deadline = self.reader.deadline(request, remaining)
        reason = self.nodes.reason  # a bad request is bad whether Triton is there or not
        if reason is not None:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE, f"the members are not reachable: {reason}"
            )
        loop = asyncio.get_running_loop()
        deadline_at = None if deadline is None else loop.time() + deadline
        where = await self._place(inputs, tuple(wanted), deadline_at)
        prediction = where.flight
        try:
            async with asyncio.timeout_at(deadline_at):
                await asyncio.shield(prediction.finished)
        except TimeoutError:
            pass  # answer with the members that made it
        finally:
            prediction.leave()  # also when the client went away: it stops only its own wait
        contributors = tuple(m for m in self._member_names if m in prediction.answers)
        missing = dict(prediction.missing)
        for name in prediction.pending():
            assert deadline is not None
            missing[name] = f"no answer within {deadline * 1000:.0f} ms"
        if len(contributors) < self._quorum:
            raise _below_quorum(contributors, self._member_names, self._quorum, missing)
        outputs = await self.combination.outputs(
            prediction, contributors, where.start, where.stop, tuple(wanted)
        )
        if missing:
            metrics.PARTIAL.inc()
        return self._response(request.id, outputs, contributors, missing, placed)

    async def _place(
        self, inputs: Rows, wanted: tuple[str, ...], deadline_at: float | None
    ) -> Placement[Prediction]:
        if self._batcher is not None:
            return await self._batcher.submit(inputs, wanted, deadline_at)
        prediction = self.predictor.start(inputs, wanted, deadline_at is not None)
        prediction.expect(1)
        return Placement(prediction, 0, inputs.batch)

    def _response(
        self,
        request_id: str,
        outputs: dict[str, np.ndarray],
        contributors: tuple[str, ...],
        missing: dict[str, str],
        placed: dict[str, tuple[ClientRegion, int, int]],
    ) -> service_pb2.ModelInferResponse:
        response = service_pb2.ModelInferResponse(
            model_name=self.config.name, model_version="1", id=request_id
        )
        response.parameters["chorus_contributors"].string_param = ",".join(contributors)
        if missing:
            response.parameters["chorus_missing"].string_param = "; ".join(
                f"{name} ({reason})" for name, reason in missing.items()
            )
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


def _below_quorum(
    contributors: tuple[str, ...], members: tuple[str, ...], quorum: int, missing: dict[str, str]
) -> RequestError:
    why = "; ".join(f"{name} ({reason})" for name, reason in missing.items())
    late = any(reason.startswith(("no answer", "not called")) for reason in missing.values())
    return RequestError(
        grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.UNAVAILABLE,
        f"{len(contributors)} of {len(members)} members answered, below the quorum of "
        f"{quorum}; missing: {why}",
    )
