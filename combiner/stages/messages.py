"""The messages of a model's calls for a batch, and what is read back from them.

A model is called in chunks of its batch limit (:func:`chunks`). Each chunk's
:func:`request` carries the rows' bytes, or, when the batch is placed in shared memory
(:mod:`combiner.stages.batch_shm`), points at them there, and at where its outputs go for those
placed too (:func:`placed_outputs`: fixed-size ones only). The fan-out model returns each
member's outputs under :func:`fanout_output` names. :func:`answer` reads one member's output for
the whole batch back, from the responses or the region, and checks first that every response
answered its chunk's rows in the output's shape: a short answer in the region would leave an
earlier batch's bytes there. A wrong answer raises :class:`BadAnswer`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2
from tritonclient.utils import triton_to_np_dtype

from combiner.config import MemberRoute, TensorInfo
from combiner.stages.batch_shm import Placed
from combiner.stages.batching import Rows

__all__ = ["BadAnswer", "answer", "chunks", "fanout_output", "placed_outputs", "request"]


class BadAnswer(Exception):
    """A model's answer does not say what its outputs should (shape, datatype, bytes)."""


def fanout_output(member: str, base: str) -> str:
    """The name under which the fan-out model returns a member's output."""
    return f"{member}__{base}"


def chunks(route: MemberRoute, batch: int) -> list[tuple[int, int]]:
    """The rows [start, stop) of each call to ``route`` for a batch of ``batch`` rows."""
    step = route.max_batch_size or batch
    return [(start, min(start + step, batch)) for start in range(0, batch, step)]


def placed_outputs(
    outputs: Mapping[str, TensorInfo],
    members: Iterable[MemberRoute],
    fanout: MemberRoute | None,
    bases: tuple[str, ...],
    one_call: bool,
    models: set[str],
) -> dict[tuple[str, str], int]:
    """(model, output) -> bytes per row, for every output the calls to ``models`` return
    (``outputs``: the ensemble's, by name); empty if a shape is variable."""
    rows = {}
    for base in bases:
        info = outputs[base]
        if any(d < 0 for d in info.shape):
            return {}
        row = math.prod(info.shape) * np.dtype(triton_to_np_dtype(info.dtype)).itemsize
        for m in members:
            if one_call:
                assert fanout is not None
                if fanout.name in models:
                    rows[(fanout.name, fanout_output(m.name, base))] = row
            elif m.name in models:
                rows[(m.name, m.outputs[base])] = row
    return rows


def request(
    route: MemberRoute,
    inputs: Mapping[str, TensorInfo],
    rows: Rows,
    start: int,
    stop: int,
    placed: Placed | None,
    output_names: list[str],
) -> service_pb2.ModelInferRequest:
    """The request for rows [start, stop) of the batch, in the model's tensor names
    (``inputs``: the ensemble's, by name): the bytes in the request, or, when ``placed`` in
    shared memory, pointers to them there (and to where its outputs go, for those placed too)."""
    req = service_pb2.ModelInferRequest(model_name=route.name)
    whole = start == 0 and stop == rows.batch
    for ens_name in rows.pieces:
        shape = rows.shapes[ens_name]
        tensor = req.inputs.add(
            name=route.inputs[ens_name],
            datatype=inputs[ens_name].dtype,
            shape=(stop - start, *shape[1:]),
        )
        row = rows.nbytes(ens_name) // rows.batch
        if placed is not None:
            _point(tensor.parameters, placed.region.name, placed.inputs[ens_name], row, start, stop)
        else:
            content = rows.data[ens_name]
            req.raw_input_contents.append(content if whole else content[start * row : stop * row])
    for name in output_names:
        out = req.outputs.add(name=name)
        key = (route.name, name)
        if placed is not None and key in placed.outputs:
            offset, row = placed.outputs[key]
            _point(out.parameters, placed.region.name, offset, row, start, stop)
    return req


def answer(
    route: MemberRoute,
    placed: Placed | None,
    responses: list[Any],
    name: str,
    info: TensorInfo,
    batch: int,
) -> np.ndarray:
    """The output ``name`` (described by ``info``) for the whole batch, from the responses of
    the calls to ``route`` or the region. Each response (one per chunk of rows) must answer its
    chunk's rows in the output's shape; the region is read only then (a short answer there
    leaves an earlier batch's bytes)."""
    sizes = [stop - start for start, stop in chunks(route, batch)]
    if placed is not None and (route.name, name) in placed.outputs:
        for rows, response in zip(sizes, responses, strict=True):
            shape, datatype = _described(response, name)
            if shape != (rows, *info.shape) or datatype != info.dtype:
                raise BadAnswer(
                    f"answered {name!r} with shape {list(shape)} of {datatype} in shared "
                    f"memory; expected {[rows, *info.shape]} of {info.dtype}"
                )
        offset, _ = placed.outputs[(route.name, name)]
        dtype = np.dtype(triton_to_np_dtype(info.dtype))
        return placed.region.read(offset, dtype, (batch, *info.shape))
    parts = [_output(r, name) for r in responses]
    for rows, part in zip(sizes, parts, strict=True):
        if part.shape[0] != rows or not _fits(part.shape[1:], info.shape):
            raise BadAnswer(
                f"answered {name!r} with shape {list(part.shape)}; expected {[rows, *info.shape]}"
            )
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _point(params: Any, region: str, offset: int, row: int, start: int, stop: int) -> None:
    """Point a tensor at rows [start, stop) of a block at ``offset`` in ``region``."""
    params["shared_memory_region"].string_param = region
    params["shared_memory_offset"].int64_param = offset + start * row
    params["shared_memory_byte_size"].int64_param = (stop - start) * row


def _fits(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return len(shape) == len(expected) and all(
        e == -1 or d == e for d, e in zip(shape, expected, strict=True)
    )


def _described(response: service_pb2.ModelInferResponse, name: str) -> tuple[tuple[int, ...], str]:
    """The shape and datatype a response says its output ``name`` has."""
    for out in response.outputs:
        if out.name == name:
            return tuple(out.shape), out.datatype
    raise BadAnswer(f"its response has no output {name!r}")


def _output(response: service_pb2.ModelInferResponse, name: str) -> np.ndarray:
    for i, out in enumerate(response.outputs):
        if out.name != name:
            continue
        dtype = triton_to_np_dtype(out.datatype)
        if dtype is None or dtype is np.object_ or i >= len(response.raw_output_contents):
            raise BadAnswer(f"answered {name!r} as {out.datatype}, not raw numbers")
        raw = response.raw_output_contents[i]
        shape = tuple(out.shape)
        if len(raw) != math.prod(shape) * np.dtype(dtype).itemsize:
            raise BadAnswer(f"answered {name!r} with {len(raw)} bytes for shape {list(shape)}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    raise BadAnswer(f"its response has no output {name!r}")
