"""The combination stage: the members' answers for a request's rows, combined into its outputs.

A request combines the members that answered its batch by the time it stopped waiting. When it
takes every member that answered a finished batch, that combination is the same for the whole
batch: it is computed once, by the first request that needs it, and each request slices its
rows. A request that stopped at its own deadline combines just its rows from the members that
made it. Large combinations run in a worker thread (numpy releases the GIL), so the event loop
keeps serving. The rules themselves are pure numpy functions (:mod:`combiner.stages.rules`).

The ensemble never answers a non-finite value, on any path (gRPC, HTTP JSON or binary, shared
memory): inputs must be finite (:mod:`combiner.stages.request`), and the rules make no non-finite
value out of finite ones, but a member may overflow on a large input and answer inf or NaN. A
request whose rows of an output are not finite then gets INTERNAL, naming the output, its rows and
the members whose outputs there are not finite; the other requests of its batch are answered.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
from tritonclient.utils import triton_to_np_dtype

from combiner.config import CombinerConfig
from combiner.errors import RequestError
from combiner.stages.predict import Prediction
from combiner.stages.request import finite
from combiner.stages.rules import combine, load_rule, uncertainty
from combiner.tasks import Owner

__all__ = ["Combination"]

# Stacked member outputs from this size up are combined in a worker thread.
_OFFLOAD_BYTES = 1 << 18


class Combination:
    def __init__(self, config: CombinerConfig) -> None:
        self._rule_name = config.rule
        self._rule = load_rule(config.rule, config.rule_path)
        self._softmax = config.softmax
        self._derived = config.uncertainty_outputs()  # name -> (info, base output, measure)
        self._base = {t.name: t for t in config.outputs}
        self._weights = {m.name: m.weight for m in config.members}
        self._tasks = Owner("combination")

    async def outputs(
        self,
        prediction: Prediction,
        contributors: tuple[str, ...],
        start: int,
        stop: int,
        wanted: tuple[str, ...],
    ) -> dict[str, np.ndarray]:
        """The wanted outputs for rows [start, stop) of the batch, from ``contributors``."""
        outputs, finite = await self._outputs(prediction, contributors, start, stop, wanted)
        if not finite:  # (not known to be: look at the request's rows)
            _check_finite(outputs, prediction, contributors, slice(start, stop))
        return outputs

    async def outputs_by_rows(
        self,
        prediction: Prediction,
        parts: list[tuple[tuple[str, ...], np.ndarray]],
        start: int,
        stop: int,
        wanted: tuple[str, ...],
    ) -> dict[str, np.ndarray]:
        """The wanted outputs for rows [start, stop) of the batch, each part of them (its
        contributors, its rows' positions in the batch) combined from its own contributors (a
        cascade's rows, answered at different tiers)."""
        answer: dict[str, np.ndarray] = {}
        for contributors, rows in parts:
            stacked = self._stack(prediction, contributors, rows)
            if _large(stacked):
                part = await asyncio.to_thread(self._combine, stacked, wanted, contributors)
            else:
                part = self._combine(stacked, wanted, contributors)
            _check_finite(part, prediction, contributors, rows, rows - start)
            for name, array in part.items():
                if name not in answer:
                    answer[name] = np.empty((stop - start, *array.shape[1:]), array.dtype)
                answer[name][rows - start] = array
        return answer

    async def _outputs(
        self,
        prediction: Prediction,
        contributors: tuple[str, ...],
        start: int,
        stop: int,
        wanted: tuple[str, ...],
    ) -> tuple[dict[str, np.ndarray], bool]:
        """The outputs, and whether they are known to be finite (the batch's combination, shared
        by its requests, is checked once for them all)."""
        shared = (
            prediction.finished.done()
            and len(contributors) == len(prediction.answers)
            and (start, stop) != (0, prediction.batch)
        )
        if not shared:
            stacked = self._stack(prediction, contributors, slice(start, stop))
            if _large(stacked):
                return await asyncio.to_thread(self._combine, stacked, wanted, contributors), False
            return self._combine(stacked, wanted, contributors), False
        cached = prediction.combined.get(contributors)
        if cached is None:
            stacked = self._stack(prediction, contributors, slice(0, prediction.batch))
            if _large(stacked):
                cached = self._tasks.spawn(
                    asyncio.to_thread(self._combine, stacked, wanted, contributors)
                )
            else:
                cached = self._combine(stacked, wanted, contributors)
            prediction.combined[contributors] = cached
        whole = await asyncio.shield(cached) if isinstance(cached, asyncio.Task) else cached
        finite = prediction.finite.get(contributors)
        if finite is None:
            finite = prediction.finite[contributors] = all(map(_finite, whole.values()))
        return {name: array[start:stop] for name, array in whole.items()}, finite

    def _stack(
        self, prediction: Prediction, contributors: tuple[str, ...], rows: slice | np.ndarray
    ) -> dict[str, np.ndarray]:
        """Each needed output of the contributors at ``rows`` of the batch, stacked on a new
        member axis (a copy)."""
        stacked = {}
        for base in prediction.bases:
            try:
                stacked[base] = np.stack([prediction.answers[m][base][rows] for m in contributors])
            except ValueError:
                shapes = {m: list(prediction.answers[m][base].shape) for m in contributors}
                raise RequestError(
                    grpc.StatusCode.INTERNAL,
                    f"the members answered {base!r} in shapes that do not stack: {shapes}",
                ) from None
        return stacked

    def _combine(
        self, stacked: dict[str, np.ndarray], wanted: tuple[str, ...], contributors: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        """The wanted ensemble outputs from the members' stacked outputs."""
        weights = [self._weights[m] for m in contributors]
        outputs = {}
        for name in wanted:
            try:
                if name in self._derived:
                    info, base, measure = self._derived[name]
                    result = uncertainty(stacked[base], measure, self._softmax)
                else:
                    info = self._base[name]
                    result = combine(stacked[name], self._rule, weights, self._softmax)
            except Exception as e:  # a user rule's bug is the server's error, not the client's
                raise RequestError(
                    grpc.StatusCode.INTERNAL,
                    f"combining {name!r} with rule {self._rule_name!r} failed: "
                    f"{type(e).__name__}: {e}",
                ) from e
            expected = stacked[name if name in stacked else self._derived[name][1]].shape[1:]
            if name not in self._derived and result.shape != expected:
                raise RequestError(
                    grpc.StatusCode.INTERNAL,
                    f"rule {self._rule_name!r} returned shape {list(result.shape)} for "
                    f"{name!r}; expected {list(expected)}",
                )
            with np.errstate(over="ignore", invalid="ignore"):  # checked per request
                typed = result.astype(triton_to_np_dtype(info.dtype), copy=False)
            outputs[name] = np.ascontiguousarray(typed)
        return outputs


def _large(stacked: dict[str, np.ndarray]) -> bool:
    return sum(a.nbytes for a in stacked.values()) >= _OFFLOAD_BYTES


def _finite(array: np.ndarray) -> bool:
    """Whether an output holds no NaN or inf (True for outputs that are not numbers that can)."""
    kind = array.dtype.kind
    if kind == "f":
        return finite(array)
    if kind == "c":
        return bool(np.isfinite(array).all())
    if array.dtype.name == "bfloat16":  # numpy sees ml_dtypes' bfloat16 as kind "V"
        return finite(array.astype(np.float32))
    return True


def _check_finite(
    outputs: dict[str, np.ndarray],
    prediction: Prediction,
    contributors: tuple[str, ...],
    rows: slice | np.ndarray,
    numbers: np.ndarray | None = None,
) -> None:
    """Refuse a request's answer (its ``rows`` of the batch; ``numbers``: their numbers in the
    request, when they are some of its rows) that holds NaN or inf, saying where it came
    from."""
    for name, array in outputs.items():
        if _finite(array):
            continue
        if array.dtype.kind not in "fc":  # bfloat16
            array = array.astype(np.float32)
        bad_rows = np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))
        named = bad_rows if numbers is None else numbers[bad_rows]
        shown = ", ".join(map(str, named[:8])) + (", ..." if len(bad_rows) > 8 else "")
        members = [
            m
            for m in contributors
            if any(
                not np.isfinite(prediction.answers[m][base][rows][bad_rows]).all()
                for base in prediction.bases
                if prediction.answers[m][base].dtype.kind in "fc"
            )
        ]
        why = (
            f"the outputs of {', '.join(members)} there are not finite (an input outside the "
            "range they compute in?)"
            if members
            else "the members' outputs there are finite: the combination overflowed"
        )
        raise RequestError(
            grpc.StatusCode.INTERNAL,
            f"output {name!r} is not finite in row(s) {shown} of this request; {why}",
        )
