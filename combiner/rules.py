"""Combination rules: pure numpy functions over the member axis (axis 0).

``combine(stacked, rule, weights, softmax)`` takes the members' outputs stacked as
``(members, batch, ...)`` and returns ``(batch, ...)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["RULES", "combine", "softmax"]


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)


def mean(stacked: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.mean(stacked, axis=0)


def weighted_mean(stacked: np.ndarray, weights: np.ndarray) -> np.ndarray:
    w = weights / weights.sum()
    return np.tensordot(w, stacked, axes=(0, 0))


RULES = {"mean": mean, "weighted_mean": weighted_mean}


def combine(
    stacked: np.ndarray,
    rule: str,
    weights: Sequence[float] | None = None,
    apply_softmax: bool = False,
) -> np.ndarray:
    """Combine ``(members, batch, ...)`` into ``(batch, ...)``, computing in float32 at least."""
    work = stacked.astype(np.promote_types(stacked.dtype, np.float32), copy=False)
    if apply_softmax:
        work = softmax(work, axis=-1)
    w = np.asarray(weights if weights is not None else np.ones(len(stacked)), dtype=work.dtype)
    return RULES[rule](work, w)
