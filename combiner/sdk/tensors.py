"""Requests built and answers read, without I/O: the ensemble's tensors (from its metadata),
the caller's arrays put in a request (in it, or in a shared-memory region of the client's),
and the response turned into an :class:`Answer`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from combiner.sdk.answer import Answer, Inputs, Outputs
from combiner.sdk.errors import InvalidRequest
from combiner.sdk.protocol import CONTRIBUTORS, MISSING, TIER, parse_missing
from combiner.sdk.regions import Region, aligned

__all__ = ["Request", "Signature", "join", "split"]


@dataclass(frozen=True)
class Request:
    inputs: list[InferInput]
    outputs: list[InferRequestedOutput]


@dataclass(frozen=True)
class _Output:
    name: str
    datatype: str  # Triton's name
    dims: tuple[int, ...]  # per row; -1 where variable

    @property
    def fixed(self) -> bool:
        return all(d >= 0 for d in self.dims)

    def nbytes(self, rows: int) -> int:
        return rows * math.prod(self.dims) * np.dtype(triton_to_np_dtype(self.datatype)).itemsize


@dataclass(frozen=True)
class Signature:
    """An ensemble's tensors, as its KServe v2 metadata names them."""

    model: str
    inputs: tuple[str, ...]
    outputs: tuple[_Output, ...]

    @classmethod
    def of(cls, model: str, metadata: Mapping[str, Any]) -> Signature:
        return cls(
            model,
            tuple(t["name"] for t in metadata["inputs"]),
            tuple(
                _Output(t["name"], t["datatype"], tuple(int(d) for d in t["shape"][1:]))
                for t in metadata["outputs"]
            ),
        )

    def arrays(self, x: Inputs) -> dict[str, np.ndarray]:
        """``x`` as input name -> C-contiguous array of numbers in this machine's byte order,
        with rows; what cannot be one is refused here (tritonclient raised a bare TypeError,
        or failed writing shared memory)."""
        if isinstance(x, Mapping):
            given = dict(x)
            if not given:
                raise InvalidRequest(
                    f"no inputs given; ensemble {self.model!r} takes {list(self.inputs)}"
                )
        elif len(self.inputs) == 1:
            given = {self.inputs[0]: x}
        else:
            raise InvalidRequest(
                f"ensemble {self.model!r} takes several inputs ({list(self.inputs)}); "
                "pass a mapping of name to array"
            )
        return {name: _rows(name, a) for name, a in given.items()}

    def request(self, arrays: dict[str, np.ndarray]) -> Request:
        """Inputs and outputs in the request and the response."""
        inputs = []
        for name, array in arrays.items():
            tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return Request(inputs, [InferRequestedOutput(t.name) for t in self.outputs])

    def region_size(self, arrays: dict[str, np.ndarray]) -> int:
        """The bytes a region needs for these inputs and the outputs of known size."""
        rows = len(next(iter(arrays.values())))
        size = sum(aligned(a.nbytes) for a in arrays.values())
        return size + sum(aligned(t.nbytes(rows)) for t in self.outputs if t.fixed)

    def request_in(self, arrays: dict[str, np.ndarray], region: Region) -> Request:
        """Inputs written into ``region``, and outputs asked there (those of known size; the
        others come in the response)."""
        inputs, outputs, offset = [], [], 0
        for name, array in arrays.items():
            shm.set_shared_memory_region(region.handle, [array], offset=offset)
            tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_shared_memory(region.name, array.nbytes, offset)
            inputs.append(tensor)
            offset += aligned(array.nbytes)
        rows = len(next(iter(arrays.values())))
        for t in self.outputs:
            requested = InferRequestedOutput(t.name)
            if t.fixed:
                size = t.nbytes(rows)
                requested.set_shared_memory(region.name, size, offset)
                region.outputs[t.name] = (offset, (rows, *t.dims), t.datatype)
                offset += aligned(size)
            outputs.append(requested)
        return Request(inputs, outputs)

    def answer(self, result: InferResult, region: Region | None = None) -> Answer:
        """The response read: outputs from it, or copied out of ``region`` (which serves the
        next call), with the contributing members and the missing ones."""
        placed = region.outputs if region is not None else {}
        params = result.get_response().parameters
        contributors = params[CONTRIBUTORS].string_param if CONTRIBUTORS in params else ""
        reasons = parse_missing(params[MISSING].string_param if MISSING in params else "")
        outputs = {}
        for t in self.outputs:
            if t.name in placed and region is not None:
                offset, shape, datatype = placed[t.name]
                contents = shm.get_contents_as_numpy(
                    region.handle, triton_to_np_dtype(datatype), shape, offset
                )
                outputs[t.name] = np.array(contents)  # a copy: the region serves the next call
            else:
                outputs[t.name] = result.as_numpy(t.name)
        tiers = params[TIER].string_param if TIER in params else None
        return Answer(
            outputs,
            tuple(c for c in contributors.split(",") if c),
            tuple(reasons),
            reasons,
            tuple(int(t) for t in tiers.split(",") if t) if tiers is not None else None,
        )


def _rows(name: str, value: Any) -> np.ndarray:
    try:
        array = np.asarray(value)
    except ValueError as e:  # a ragged list
        raise InvalidRequest(f"input {name!r} is not an array: {e}") from None
    if array.ndim == 0:
        raise InvalidRequest(
            f"input {name!r} is a single value; pass a batch, an array of shape (rows, ...)"
        )
    if len(array) == 0:
        raise InvalidRequest(f"input {name!r} has no rows")
    if array.dtype.kind not in "biuf":
        raise InvalidRequest(
            f"input {name!r} has dtype {array.dtype}; the ensemble takes numbers "
            "(see metadata() for its datatype)"
        )
    if not array.dtype.isnative:  # (big-endian data: tritonclient refused it)
        array = array.astype(array.dtype.newbyteorder("="))
    return np.ascontiguousarray(array)


def split(x: Inputs, size: int) -> list[Inputs]:
    """``x`` in pieces of at most ``size`` rows."""
    if isinstance(x, Mapping):
        rows = len(next(iter(x.values())))
        return [{n: a[i : i + size] for n, a in x.items()} for i in range(0, rows, size)]
    return [x[i : i + size] for i in range(0, len(x), size)]


def join(parts: list[Outputs]) -> Outputs:
    """The pieces' answers, in order, as one."""
    first = parts[0]
    if isinstance(first, dict):
        return {n: np.concatenate([p[n] for p in parts]) for n in first}  # type: ignore[index]
    return np.concatenate(parts)  # type: ignore[arg-type]
