"""The ensemble's KServe v2 gRPC endpoint (requests are checked by :mod:`combiner.request`).

Per request: validate it against the ensemble's tensors (a bad one gets INVALID_ARGUMENT naming
the problem, and touches no member), forward the input bytes to every member on Triton at once,
gather, combine with numpy, answer. Health and metadata calls answer truthfully: the ensemble
is ready only while every member is ready on Triton.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import triton_to_np_dtype

from . import __version__, metrics
from .batching import Batcher, Rows
from .config import CombinerConfig, MemberRoute, TensorInfo
from .errors import RequestError
from .fanout import fan_out
from .request import RequestReader
from .rules import combine, load_rule, uncertainty
from .shm import ClientRegions, Region, ShmPool, reclaim_stale
from .upstream import GRPC_OPTIONS, MemberError, Upstream

__all__ = ["EnsembleService", "RequestError", "serve"]

log = logging.getLogger("chorus.combiner")

# KServe/Triton protocol extensions both endpoints implement
EXTENSIONS = ("binary_tensor_data", "system_shared_memory")


class EnsembleService(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, config: CombinerConfig, upstream: Upstream) -> None:
        self.config = config
        self.upstream = upstream
        self._member_names = [m.name for m in config.members]
        self._inputs = {t.name: t for t in config.inputs}
        self._derived = config.uncertainty_outputs()  # name -> (info, base output, measure)
        self._base = {t.name: t for t in config.outputs}  # what the members answer
        self.outputs = {**self._base, **{n: d[0] for n, d in self._derived.items()}}
        self._rule = load_rule(config.rule, config.rule_path)
        self._quorum = config.quorum_count()
        self._shm: ShmPool | None = None
        self.regions = ClientRegions()
        self._reader = RequestReader(config, self.outputs, self.regions)
        self._fanout = (
            MemberRoute(
                name=config.fanout_model,
                inputs={t.name: t.name for t in config.inputs},
                outputs={},
                max_batch_size=config.fanout_max_batch_size,
            )
            if config.fanout_model
            else None
        )
        self._batcher = (
            Batcher(
                lambda rows, wanted, deadline: self._fan_out("", rows, wanted, deadline),
                config.max_batch_size,
                config.max_in_flight,
                config.batch_fill_ms / 1000.0,
            )
            if config.batching
            else None
        )

    async def start(self) -> None:
        """Reclaim what stopped processes left in shared memory; make this one's pool."""
        if self.config.shared_memory:
            await reclaim_stale(self.upstream)
            self._shm = ShmPool(self.upstream)

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()
        if self._shm is not None:
            await self._shm.close()
        self.regions.unregister()

    # -- health and metadata ------------------------------------------------------------------

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=await self.ready())

    async def ModelReady(self, request, context):
        if not self.is_ours(request.name, request.version):
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=await self.ready())

    async def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(
            name="chorus", version=__version__, extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(self, request, context):
        await self._check_model(request.name, request.version, context)
        return service_pb2.ModelMetadataResponse(
            name=self.config.name,
            versions=["1"],
            platform="chorus_ensemble",
            inputs=[_metadata(t) for t in self.config.inputs],
            outputs=[_metadata(t) for t in self.outputs.values()],
        )

    async def ModelConfig(self, request, context):
        await self._check_model(request.name, request.version, context)
        config = model_config_pb2.ModelConfig(
            name=self.config.name,
            platform="chorus_ensemble",
            max_batch_size=self.config.max_batch_size,
            input=[
                model_config_pb2.ModelInput(
                    name=t.name, data_type=_config_dtype(t.dtype), dims=list(t.shape)
                )
                for t in self.config.inputs
            ],
            output=[
                model_config_pb2.ModelOutput(
                    name=t.name, data_type=_config_dtype(t.dtype), dims=list(t.shape)
                )
                for t in self.outputs.values()
            ],
        )
        return service_pb2.ModelConfigResponse(config=config)

    # -- system shared memory (KServe extension): a co-located client's own regions -----------

    async def SystemSharedMemoryRegister(self, request, context):
        try:
            self.regions.register(request.name, request.key, request.offset, request.byte_size)
        except RequestError as e:
            await context.abort(e.code, str(e))
        return service_pb2.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request, context):
        self.regions.unregister(request.name or None)
        return service_pb2.SystemSharedMemoryUnregisterResponse()

    async def SystemSharedMemoryStatus(self, request, context):
        try:
            found = self.regions.status(request.name or None)
        except RequestError as e:
            await context.abort(e.code, str(e))
        response = service_pb2.SystemSharedMemoryStatusResponse()
        for r in found:
            response.regions[r.name].CopyFrom(
                service_pb2.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size
                )
            )
        return response

    async def RepositoryIndex(self, request, context):
        state = "READY" if await self.ready() else "UNAVAILABLE"
        model = service_pb2.RepositoryIndexResponse.ModelIndex(
            name=self.config.name, version="1", state=state
        )
        return service_pb2.RepositoryIndexResponse(models=[model])

    # -- inference ------------------------------------------------------------------------------

    async def ModelInfer(self, request, context):
        try:
            return await self.infer(request, context.time_remaining())
        except RequestError as e:
            await context.abort(e.code, str(e))

    async def infer(
        self, request: service_pb2.ModelInferRequest, remaining: float | None = None
    ) -> service_pb2.ModelInferResponse:
        """Answer one request; shared by the gRPC and HTTP endpoints. ``remaining``: seconds
        the client still waits, if it said. Every refusal or failure is a RequestError
        carrying the status to answer with."""
        began = time.perf_counter()
        metrics.IN_FLIGHT.inc()
        code = grpc.StatusCode.OK
        try:
            return await self._infer(request, remaining)
        except RequestError as e:
            code = e.code
            raise
        except MemberError as e:
            code = (
                grpc.StatusCode.UNAVAILABLE
                if e.code == grpc.StatusCode.UNAVAILABLE
                else grpc.StatusCode.INTERNAL
            )
            log.warning("%s", e)
            raise RequestError(code, str(e)) from e
        except Exception:
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            metrics.IN_FLIGHT.dec()
            metrics.REQUESTS.labels(code.name).inc()
            metrics.LATENCY.observe(time.perf_counter() - began)

    async def _infer(
        self, request: service_pb2.ModelInferRequest, remaining: float | None
    ) -> service_pb2.ModelInferResponse:
        if not self.is_ours(request.model_name, request.model_version):
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                self.not_found(request.model_name, request.model_version),
            )
        inputs = self._reader.parse(request)
        wanted, placed = self._reader.requested_outputs(request)
        deadline = self._reader.deadline(request, remaining)
        if self._batcher is not None:
            outputs, contributors, missing = await self._batcher.submit(inputs, wanted, deadline)
        else:
            outputs, contributors, missing = await self._fan_out(
                request.id, inputs, wanted, deadline
            )
        if missing:
            metrics.PARTIAL.inc()
        response = service_pb2.ModelInferResponse(
            model_name=self.config.name, model_version="1", id=request.id
        )
        response.parameters["chorus_contributors"].string_param = ",".join(contributors)
        if missing:
            response.parameters["chorus_missing"].string_param = "; ".join(
                f"{name} ({reason})" for name, reason in missing.items()
            )
        for name, array in outputs.items():
            info = self.outputs[name]
            out = response.outputs.add(name=name, datatype=info.dtype, shape=array.shape)
            if name in placed:  # into the client's shared memory, not the response
                region, offset, size = placed[name]
                if array.nbytes > size:
                    raise RequestError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"output {name!r} needs {array.nbytes} bytes; shared-memory region "
                        f"{region.name!r} offers {size} at offset {offset}",
                    )
                region.view(offset, array.nbytes, f"output {name!r}")[:] = array.tobytes()
                out.parameters["shared_memory_region"].string_param = region.name
                out.parameters["shared_memory_offset"].int64_param = offset
                out.parameters["shared_memory_byte_size"].int64_param = array.nbytes
                response.raw_output_contents.append(b"")
            else:
                response.raw_output_contents.append(array.tobytes())
        return response

    async def _fan_out(
        self, request_id: str, inputs: Rows, wanted: list[str], deadline: float | None
    ) -> tuple[dict[str, np.ndarray], list[str], dict[str, str]]:
        """Call every member at once (in chunks of its max batch size) within the deadline and
        combine the answers of those that made it, if they meet the quorum. Returns the
        outputs, the contributing members and why the others are missing."""

        one_call = (
            self._fanout is not None
            and deadline is None
            and (self._quorum == len(self.config.members) and self.config.fan_out == "concurrent")
        )
        region = None
        placed: _Placed | None = None
        if self._shm is not None:
            names = list(inputs.pieces)
            size = sum(inputs.nbytes(n) for n in names)
            # outputs too, where that pays; only on the one-call path, where every call has
            # ended before the region is reused (a call given up at a deadline may still write)
            out_rows = self._output_rows(wanted) if one_call else None
            out_size = inputs.batch * sum(out_rows.values()) if out_rows else 0
            least = self.config.output_shared_memory_min_bytes
            if least is None or out_size < least:
                out_rows, out_size = None, 0
            region = await self._shm.acquire(_aligned(size) + out_size)
            # the batch's bytes go straight from the requests to the region
            offsets = region.write([inputs.pieces[n] for n in names])
            outs = {}
            at = _aligned(size)
            for name, row in (out_rows or {}).items():
                outs[name] = (at, row)
                at += inputs.batch * row
            placed = _Placed(region.name, dict(zip(names, offsets, strict=True)), outs)
            metrics.SHARED_BYTES.labels("input").inc(size)
            if out_size:
                metrics.SHARED_BYTES.labels("output").inc(out_size)
        try:
            return await self._call_and_combine(
                request_id, inputs, wanted, deadline, one_call, placed, region
            )
        finally:
            if region is not None and self._shm is not None:
                self._shm.release(region)

    async def _call_and_combine(
        self,
        request_id: str,
        inputs: Rows,
        wanted: list[str],
        deadline: float | None,
        one_call: bool,
        placed: _Placed | None,
        region: Region | None,
    ) -> tuple[dict[str, np.ndarray], list[str], dict[str, str]]:
        def calls_of(
            member: MemberRoute, output_names: list[str] | None = None
        ) -> Callable[[], Awaitable[list[Any]]]:
            step = member.max_batch_size or inputs.batch
            requests = [
                self._member_request(
                    member,
                    request_id,
                    inputs,
                    wanted,
                    start,
                    min(start + step, inputs.batch),
                    placed,
                    output_names,
                )
                for start in range(0, inputs.batch, step)
            ]

            async def call() -> list[Any]:
                began = time.perf_counter()
                if len(requests) == 1:
                    answers = [await self.upstream.infer(requests[0])]
                else:
                    answers = await asyncio.gather(*(self.upstream.infer(r) for r in requests))
                metrics.MEMBER_LATENCY.labels(member.name).observe(time.perf_counter() - began)
                return answers

            return call

        if one_call:  # every member must answer anyway: let Triton fan out in one call
            assert self._fanout is not None
            names = [
                self._fanout_output(m, b) for m in self.config.members for b in self._bases(wanted)
            ]
            answers, missing = {}, {}
            try:  # nothing to wait for but this one call: no task, no timer
                got = await calls_of(self._fanout, names)()
                answers = {m.name: got for m in self.config.members}
            except MemberError as e:
                missing = {m.name: f"{e.code.name}: {e.details}" for m in self.config.members}
        else:
            answers, missing = await fan_out(
                [(m.name, calls_of(m)) for m in self.config.members],
                deadline,
                sequential=self.config.fan_out == "sequential",
            )
        members = [m for m in self.config.members if m.name in answers]
        if len(members) < self._quorum:
            why = "; ".join(f"{name} ({reason})" for name, reason in missing.items())
            code = (
                grpc.StatusCode.DEADLINE_EXCEEDED
                if any(reason.startswith("no answer") for reason in missing.values())
                else grpc.StatusCode.UNAVAILABLE
            )
            raise RequestError(
                code,
                f"{len(members)} of {len(self.config.members)} members answered, below the "
                f"quorum of {self._quorum}; missing: {why}",
            )
        weights = [m.weight for m in members]
        stacked = {}
        for base in self._bases(wanted):
            info = self._base[base]
            dtype = triton_to_np_dtype(info.dtype)
            per_member = []
            for member in members:
                name = self._fanout_output(member, base) if one_call else member.outputs[base]
                if placed is not None and region is not None and name in placed.outputs:
                    offset, _ = placed.outputs[name]
                    per_member.append(region.read(offset, dtype, (inputs.batch, *info.shape)))
                    continue
                parts = [_output(r, name, info) for r in answers[member.name]]
                per_member.append(parts[0] if len(parts) == 1 else np.concatenate(parts))
            stacked[base] = np.stack(per_member)  # a copy: the region can be reused after
        if sum(a.nbytes for a in stacked.values()) >= _OFFLOAD_BYTES:
            # large: numpy releases the GIL, so the loop keeps serving while a thread combines
            outputs = await asyncio.to_thread(self._combine, stacked, wanted, weights)
        else:
            outputs = self._combine(stacked, wanted, weights)
        return outputs, [m.name for m in members], missing

    def _combine(
        self, stacked: dict[str, np.ndarray], wanted: list[str], weights: list[float]
    ) -> dict[str, np.ndarray]:
        """The wanted ensemble outputs from the members' stacked outputs."""
        outputs = {}
        for name in wanted:
            if name in self._derived:
                info, base, measure = self._derived[name]
                result = uncertainty(stacked[base], measure, self.config.softmax)
            else:
                info = self._base[name]
                result = combine(stacked[name], self._rule, weights, self.config.softmax)
                if result.shape != stacked[name].shape[1:]:
                    raise MemberError(
                        "(combination rule)",
                        grpc.StatusCode.INTERNAL,
                        f"rule {self.config.rule!r} returned shape {list(result.shape)} for "
                        f"{name!r}; expected {list(stacked[name].shape[1:])}",
                    )
            outputs[name] = np.ascontiguousarray(
                result.astype(triton_to_np_dtype(info.dtype), copy=False)
            )
        return outputs

    def _output_rows(self, wanted: list[str]) -> dict[str, int] | None:
        """Bytes per row of each fan-out model output these ensemble outputs need; None if
        a shape is variable."""
        rows = {}
        for base in self._bases(wanted):
            info = self._base[base]
            if any(d < 0 for d in info.shape):
                return None
            row = math.prod(info.shape) * np.dtype(triton_to_np_dtype(info.dtype)).itemsize
            for m in self.config.members:
                rows[self._fanout_output(m, base)] = row
        return rows

    @staticmethod
    def _fanout_output(member: MemberRoute, base: str) -> str:
        return f"{member.name}__{base}"

    def _bases(self, wanted: list[str]) -> list[str]:
        """The members' outputs needed for these ensemble outputs."""
        return list(dict.fromkeys(self._derived[n][1] if n in self._derived else n for n in wanted))

    def _member_request(
        self,
        member: MemberRoute,
        request_id: str,
        inputs: Rows,
        wanted: list[str],
        start: int,
        stop: int,
        placed: _Placed | None = None,
        output_names: list[str] | None = None,
    ) -> service_pb2.ModelInferRequest:
        """The request for rows [start, stop) of the inputs, in the member's tensor names: the
        bytes in the request, or, when ``placed`` in shared memory, pointers to them there
        (and to where its outputs go, for those placed too)."""
        req = service_pb2.ModelInferRequest(model_name=member.name, id=request_id)
        whole = start == 0 and stop == inputs.batch
        for ens_name in inputs.pieces:
            shape = inputs.shapes[ens_name]
            tensor = req.inputs.add(
                name=member.inputs[ens_name],
                datatype=self._inputs[ens_name].dtype,
                shape=(stop - start, *shape[1:]),
            )
            row = inputs.nbytes(ens_name) // inputs.batch
            if placed is not None:
                _point(tensor.parameters, placed.region, placed.inputs[ens_name], row, start, stop)
            else:
                content = inputs.data[ens_name]
                req.raw_input_contents.append(
                    content if whole else content[start * row : stop * row]
                )
        for name in output_names or [member.outputs[b] for b in self._bases(wanted)]:
            out = req.outputs.add(name=name)
            if placed is not None and name in placed.outputs:
                offset, row = placed.outputs[name]
                _point(out.parameters, placed.region, offset, row, start, stop)
        return req

    # -- helpers --------------------------------------------------------------------------------

    def is_ours(self, name: str, version: str) -> bool:
        return name == self.config.name and version in ("", "1")

    async def _check_model(
        self, name: str, version: str, context: grpc.aio.ServicerContext
    ) -> None:
        """Abort the call with NOT_FOUND unless it names this ensemble."""
        if not self.is_ours(name, version):
            await context.abort(grpc.StatusCode.NOT_FOUND, self.not_found(name, version))

    def not_found(self, name: str, version: str) -> str:
        shown = f"{name!r}" + (f" version {version!r}" if version else "")
        return f"unknown model {shown}; this endpoint serves {self.config.name!r} (version 1)"

    async def ready(self) -> bool:
        return await self.upstream.models_ready(self._member_names)


@dataclass(frozen=True)
class _Placed:
    """Where a batch lives in a shared-memory region: each input's offset, and each output
    placed there as (offset, bytes per row)."""

    region: str
    inputs: dict[str, int]
    outputs: dict[str, tuple[int, int]]


# Stacked member outputs from this size up are combined in a worker thread.
_OFFLOAD_BYTES = 1 << 18


def _point(params: Any, region: str, offset: int, row: int, start: int, stop: int) -> None:
    """Point a tensor at rows [start, stop) of a block at ``offset`` in ``region``."""
    params["shared_memory_region"].string_param = region
    params["shared_memory_offset"].int64_param = offset + start * row
    params["shared_memory_byte_size"].int64_param = (stop - start) * row


def _aligned(size: int) -> int:
    return (size + 63) // 64 * 64


def _output(response: service_pb2.ModelInferResponse, name: str, info: TensorInfo) -> np.ndarray:
    for i, out in enumerate(response.outputs):
        if out.name == name:
            dtype = triton_to_np_dtype(out.datatype)
            return np.frombuffer(response.raw_output_contents[i], dtype=dtype).reshape(out.shape)
    raise MemberError(
        response.model_name, grpc.StatusCode.INTERNAL, f"its response has no output {name!r}"
    )


def _metadata(t: TensorInfo) -> service_pb2.ModelMetadataResponse.TensorMetadata:
    return service_pb2.ModelMetadataResponse.TensorMetadata(
        name=t.name, datatype=t.dtype, shape=[-1, *t.shape]
    )


def _config_dtype(dtype: str) -> int:
    return int(model_config_pb2.DataType.Value(f"TYPE_{dtype}"))


async def serve(
    config: CombinerConfig,
    host: str,
    port: int,
    stop: asyncio.Event | None = None,
    reuse_port: bool = False,
    http_port: int | None = None,
) -> None:
    """Serve the ensemble over gRPC on ``host:port`` and, with ``http_port``, over HTTP/REST,
    until ``stop`` is set (or forever); with ``reuse_port``, other workers may listen on the
    same ports."""
    from aiohttp import web

    from .http import make_app

    upstream = Upstream(config.triton_url)
    server = grpc.aio.server(options=[*GRPC_OPTIONS, ("grpc.so_reuseport", int(reuse_port))])
    service = EnsembleService(config, upstream)
    await service.start()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    address = f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    runner = web.AppRunner(make_app(service), access_log=None)
    await runner.setup()
    try:
        await server.start()
        if http_port is not None:
            await web.TCPSite(runner, host, http_port, reuse_port=reuse_port or None).start()
        log.info(
            "serving ensemble %r on %s%s (Triton at %s)",
            config.name,
            address,
            f" and http://{host}:{http_port}" if http_port is not None else "",
            config.triton_url,
        )
        if stop is None:
            await server.wait_for_termination()
        else:
            await stop.wait()
    finally:
        await runner.cleanup()
        await server.stop(grace=2.0)
        await service.close()
        await upstream.close()
