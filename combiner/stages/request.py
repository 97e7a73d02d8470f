"""Reading a KServe v2 inference request against the ensemble's tensors.

:class:`RequestReader` checks a request before any member is called: a bad one raises
:class:`RequestError` with INVALID_ARGUMENT and a message naming the problem (unknown, missing
or repeated input, wrong datatype or shape, batch over the maximum, data of the wrong size,
unknown output, a bad deadline, a shared-memory region unknown or too small). An input in a
client's registered shared-memory region (:mod:`combiner.endpoints.client_shm`) is copied out
of it here.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2
from tritonclient.utils import triton_to_np_dtype

from combiner.config import CombinerConfig, TensorInfo
from combiner.endpoints.client_shm import NOBODY, Caller, ClientRegion, ClientRegions
from combiner.errors import RequestError
from combiner.sdk.protocol import CASCADE, DEADLINE_MS
from combiner.stages.batching import Rows

__all__ = ["RequestError", "RequestReader"]

# A deadline longer than a day is a day (and never a timer past what the loop can schedule).
_LONGEST_DEADLINE_MS = 86_400_000.0

# Where a request may carry a tensor's values without raw_input_contents.
_TYPED_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


class RequestReader:
    def __init__(
        self,
        config: CombinerConfig,
        outputs: dict[str, TensorInfo],
        regions: ClientRegions | None = None,
    ) -> None:
        self.config = config
        self.regions = regions if regions is not None else ClientRegions(enabled=False)
        self._inputs = {t.name: t for t in config.inputs}
        self._itemsize = {
            t.name: np.dtype(triton_to_np_dtype(t.dtype)).itemsize for t in config.inputs
        }
        self._outputs = outputs

    def deadline(
        self, request: service_pb2.ModelInferRequest, remaining: float | None = None
    ) -> float | None:
        """Seconds to wait for the members: the request's ``deadline_ms`` parameter, else the
        ensemble's default, and never past ``remaining``, the client's own deadline."""
        ms: float | None = self.config.deadline_ms
        if DEADLINE_MS in request.parameters:
            param = request.parameters[DEADLINE_MS]
            kind = param.WhichOneof("parameter_choice")
            if kind not in ("int64_param", "uint64_param", "double_param"):
                raise _invalid("parameter 'deadline_ms' must be a number of milliseconds")
            ms = float(getattr(param, kind))
            if not math.isfinite(ms) or ms <= 0:
                raise _invalid(
                    f"parameter 'deadline_ms' must be a positive, finite number of "
                    f"milliseconds, got {ms!r}"
                )
        seconds = None if ms is None else min(ms, _LONGEST_DEADLINE_MS) / 1000.0
        if remaining is not None:
            seconds = remaining if seconds is None else min(seconds, remaining)
        return seconds

    def cascade(self, request: service_pb2.ModelInferRequest) -> bool:
        """Whether the ensemble's cascade may answer the request from its first tiers: yes
        unless its ``cascade`` parameter is false (a bool; the text "true"/"false" from
        clients that send only strings)."""
        if CASCADE not in request.parameters:
            return True
        param = request.parameters[CASCADE]
        kind = param.WhichOneof("parameter_choice")
        if kind == "bool_param":
            return param.bool_param
        if kind == "string_param" and param.string_param.lower() in ("true", "false"):
            return param.string_param.lower() == "true"
        raise _invalid("parameter 'cascade' must be true or false")

    def parse(self, request: service_pb2.ModelInferRequest, caller: Caller = NOBODY) -> Rows:
        """The request's inputs; ``caller``: whose shared-memory regions it may name."""
        expected = ", ".join(self._inputs)
        raw = list(request.raw_input_contents)
        in_band = [t for t in request.inputs if "shared_memory_region" not in t.parameters]
        if raw and len(raw) != len(in_band):
            raise _invalid(
                f"the request has {len(in_band)} inputs outside shared memory but {len(raw)} "
                "raw_input_contents"
            )
        data: dict[str, bytes] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        batch = None
        next_raw = 0
        for tensor in request.inputs:
            info = self._inputs.get(tensor.name)
            if info is None:
                raise _invalid(f"unknown input {tensor.name!r}; this ensemble takes: {expected}")
            if tensor.name in data:
                raise _invalid(f"input {tensor.name!r} is given twice")
            if tensor.datatype != info.dtype:
                raise _invalid(
                    f"input {tensor.name!r} has datatype {tensor.datatype}; "
                    f"the ensemble expects {info.dtype}"
                )
            shape = tuple(tensor.shape)
            if not _shape_fits(shape, info):
                want = [-1, *info.shape]
                raise _invalid(
                    f"input {tensor.name!r} has shape {list(shape)}; the ensemble expects "
                    f"{want} (first dimension: batch)"
                )
            if shape[0] > self.config.max_batch_size:
                raise _invalid(
                    f"batch size {shape[0]} of input {tensor.name!r} exceeds the maximum "
                    f"batch size {self.config.max_batch_size}; split the batch"
                )
            if batch is not None and shape[0] != batch:
                raise _invalid(f"inputs disagree on the batch size ({batch} and {shape[0]})")
            batch = shape[0]
            need = math.prod(shape) * self._itemsize[tensor.name]
            content: bytes
            if "shared_memory_region" in tensor.parameters:
                region, offset, size = _placement(tensor.parameters, f"input {tensor.name!r}")
                if size is not None and size != need:
                    raise _invalid(
                        f"input {tensor.name!r}: shared_memory_byte_size is {size}; shape "
                        f"{list(shape)} of {info.dtype} needs {need}"
                    )
                if need > self.config.request_limit():  # bounded before it is read
                    raise RequestError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"input {tensor.name!r}: shape {list(shape)} of {info.dtype} is "
                        f"{need} bytes, over this endpoint's limit of "
                        f"{self.config.request_limit()} bytes a request",
                    )
                content = self.regions.get(caller, region).read(
                    offset, need, f"input {tensor.name!r}"
                )
            else:
                if raw and tensor.HasField("contents") and tensor.contents.ListFields():
                    raise _invalid(
                        f"input {tensor.name!r} is sent both in raw_input_contents and in "
                        "contents: send one"
                    )
                content = raw[next_raw] if raw else _typed_bytes(tensor, info)
                next_raw += 1
            if len(content) != need:
                raise _invalid(
                    f"input {tensor.name!r} carries {len(content)} bytes; shape {list(shape)} "
                    f"of {info.dtype} needs {need}"
                )
            _check_finite(tensor.name, content, info, shape)
            data[tensor.name] = content
            shapes[tensor.name] = shape
        missing = [n for n in self._inputs if n not in data]
        if missing:
            raise _invalid(
                f"missing input {', '.join(map(repr, missing))}; this ensemble takes: {expected}"
            )
        assert batch is not None
        return Rows.of(batch, data, shapes)

    def requested_outputs(
        self, request: service_pb2.ModelInferRequest, caller: Caller = NOBODY
    ) -> tuple[list[str], dict[str, tuple[ClientRegion, int, int]]]:
        """The outputs asked for (all, if none is named), and where in shared memory those
        asked there go: name -> (region, offset, byte size available). The caller holds those
        regions (:meth:`ClientRegion.held`) until it has written them, before any wait."""
        if not request.outputs:
            return list(self._outputs), {}
        names = []
        placed = {}
        for out in request.outputs:
            if out.name not in self._outputs:
                raise _invalid(
                    f"unknown output {out.name!r}; this ensemble gives: {', '.join(self._outputs)}"
                )
            if out.name in names:
                raise _invalid(f"output {out.name!r} is asked for twice")
            _check_not_classification(out)
            if "shared_memory_region" in out.parameters:
                what = f"output {out.name!r}"
                region_name, offset, size = _placement(out.parameters, what)
                region = self.regions.get(caller, region_name)
                if size is None:
                    size = region.byte_size - offset
                region.check(offset, size, what)
                placed[out.name] = (region, offset, size)
            names.append(out.name)
        return names, placed


def _placement(params: Any, what: str) -> tuple[str, int, int | None]:
    """(region, offset, byte size or None) from a tensor's shared_memory_* parameters."""
    region = params["shared_memory_region"].string_param
    offset = size = None
    for key in ("shared_memory_offset", "shared_memory_byte_size"):
        if key in params:
            param = params[key]
            kind = param.WhichOneof("parameter_choice")
            if kind not in ("int64_param", "uint64_param"):
                raise _invalid(f"{what}: parameter {key!r} must be an integer")
            value = int(getattr(param, kind))
            if key == "shared_memory_offset":
                offset = value
            else:
                size = value
    return region, offset or 0, size


def _check_finite(name: str, content: bytes, info: TensorInfo, shape: tuple[int, ...]) -> None:
    """A floating-point input holds only finite numbers: NaN and inf are refused, whichever way
    they came (so that no answer is made of them)."""
    dtype = _numpy_dtype(info.dtype)
    bfloat16 = info.dtype == "BF16"  # numpy sees ml_dtypes' bfloat16 as kind "V"
    if (dtype.kind != "f" and not bfloat16) or not content:
        return
    values = np.frombuffer(content, dtype=dtype)
    if bfloat16:
        values = values.astype(np.float32)
    if finite(values):
        return
    flat = int(np.flatnonzero(~np.isfinite(values))[0])
    where = np.unravel_index(flat, shape)
    raise _invalid(
        f"input {name!r} is not finite: {values[flat]} at row {where[0]} (index "
        f"{list(map(int, where))}); inputs must be finite numbers"
    )


def finite(values: np.ndarray) -> bool:
    """Whether a floating-point array holds only finite numbers (never a warning)."""
    return bool(np.isfinite(values).all())


@functools.cache
def _numpy_dtype(datatype: str) -> np.dtype:
    return np.dtype(triton_to_np_dtype(datatype))


def _check_not_classification(
    out: service_pb2.ModelInferRequest.InferRequestedOutputTensor,
) -> None:
    """Triton's classification extension (``class_count``) is not served: an answer is the
    full output, so asking for its top classes is refused rather than silently ignored."""
    if "classification" not in out.parameters:
        return
    param = out.parameters["classification"]
    kind = param.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param") and getattr(param, kind) == 0:
        return  # 0: no classification, as in Triton
    raise _invalid(
        f"output {out.name!r}: parameter 'classification' (class_count) is not supported; "
        "ask for the full output and take its top classes"
    )


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _shape_fits(shape: tuple[int, ...], info: TensorInfo) -> bool:
    return (
        len(shape) == 1 + len(info.shape)
        and shape[0] >= 1
        and all(
            d >= 0 and (want == -1 or d == want)
            for d, want in zip(shape[1:], info.shape, strict=True)
        )
    )


def _typed_bytes(tensor: service_pb2.ModelInferRequest.InferInputTensor, info: TensorInfo) -> bytes:
    field = _TYPED_FIELD.get(info.dtype)
    if field is None:
        raise _invalid(f"input {tensor.name!r} of {info.dtype} must be sent as raw bytes")
    values = getattr(tensor.contents, field)
    other = [f.name for f, _ in tensor.contents.ListFields() if f.name != field]
    if other:  # (alone, or beside the right one: either way not read)
        raise _invalid(
            f"input {tensor.name!r} of {info.dtype} takes its values in contents.{field}; the "
            f"request sets contents.{other[0]}"
        )
    return np.asarray(values, dtype=triton_to_np_dtype(info.dtype)).tobytes()
