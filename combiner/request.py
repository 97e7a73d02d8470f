"""Reading a KServe v2 inference request against the ensemble's tensors.

:class:`RequestReader` checks a request before any member is called: a bad one raises
:class:`RequestError` with INVALID_ARGUMENT and a message naming the problem (unknown, missing
or repeated input, wrong datatype or shape, batch over the maximum, data of the wrong size,
unknown output, a bad deadline).
"""

from __future__ import annotations

import math

import grpc
import numpy as np
from tritonclient.grpc import service_pb2
from tritonclient.utils import triton_to_np_dtype

from .batching import Rows
from .config import CombinerConfig, TensorInfo

__all__ = ["RequestError", "RequestReader"]

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


class RequestError(Exception):
    """A request the endpoint refuses; carries the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        super().__init__(message)


class RequestReader:
    def __init__(self, config: CombinerConfig, outputs: dict[str, TensorInfo]) -> None:
        self.config = config
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
        if "deadline_ms" in request.parameters:
            param = request.parameters["deadline_ms"]
            kind = param.WhichOneof("parameter_choice")
            if kind not in ("int64_param", "uint64_param", "double_param"):
                raise _invalid("parameter 'deadline_ms' must be a number of milliseconds")
            ms = float(getattr(param, kind))
            if ms <= 0:
                raise _invalid(f"parameter 'deadline_ms' must be positive, got {ms:g}")
        seconds = None if ms is None else ms / 1000.0
        if remaining is not None:
            seconds = remaining if seconds is None else min(seconds, remaining)
        return seconds

    def parse(self, request: service_pb2.ModelInferRequest) -> Rows:
        expected = ", ".join(self._inputs)
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise _invalid(
                f"the request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents"
            )
        data: dict[str, bytes] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        batch = None
        for i, tensor in enumerate(request.inputs):
            info = self._inputs.get(tensor.name)
            if info is None:
                raise _invalid(f"unknown input {tensor.name!r}; this ensemble takes: {expected}")
            if tensor.name in data:
                raise _invalid(f"input {tensor.name!r} is given twice")
            if "shared_memory_region" in tensor.parameters:
                raise _invalid(
                    f"input {tensor.name!r} is in shared memory; this endpoint takes inputs "
                    "in the request only"
                )
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
            content = raw[i] if raw else _typed_bytes(tensor, info)
            need = math.prod(shape) * self._itemsize[tensor.name]
            if len(content) != need:
                raise _invalid(
                    f"input {tensor.name!r} carries {len(content)} bytes; shape {list(shape)} "
                    f"of {info.dtype} needs {need}"
                )
            data[tensor.name] = content
            shapes[tensor.name] = shape
        missing = [n for n in self._inputs if n not in data]
        if missing:
            raise _invalid(
                f"missing input {', '.join(map(repr, missing))}; this ensemble takes: {expected}"
            )
        assert batch is not None
        return Rows.of(batch, data, shapes)

    def requested_outputs(self, request: service_pb2.ModelInferRequest) -> list[str]:
        if not request.outputs:
            return list(self._outputs)
        names = []
        for out in request.outputs:
            if out.name not in self._outputs:
                raise _invalid(
                    f"unknown output {out.name!r}; this ensemble gives: {', '.join(self._outputs)}"
                )
            if "shared_memory_region" in out.parameters:
                raise _invalid(
                    f"output {out.name!r} asks for shared memory; this endpoint "
                    "returns outputs in the response only"
                )
            names.append(out.name)
        return names


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
    return np.asarray(values, dtype=triton_to_np_dtype(info.dtype)).tobytes()
