"""A cascade's exit rule: which rows the members so far may answer, without the later tiers.

One function, :func:`exits`, used where rows are answered (the prediction stage, after each
tier) and where a cascade is chosen (``chorus calibrate`` simulates the cascade on validation
rows with it), so that the two never disagree. Pure numpy.

The rule reads the cascade's output (one with a class axis, the last) of the members so far,
stacked as ``(members, rows, ..., classes)``:

* ``agreement``: the share of those members whose top class is the top class of their
  combination (the ensemble's rule and weights), at least ``threshold``;
* ``confidence``: the top value of their combination at least ``threshold`` (a probability
  when the members' outputs are, or with ``softmax``).

A row whose output has positions (``(rows, positions..., classes)``) exits only when every
position does. A row holding NaN in any member's output never exits early: it goes on to the
last tier, and its answer is then refused as any answer that is not finite is
(:mod:`combiner.stages.combination` names the member).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from combiner.stages.rules import Rule, combine

__all__ = ["EXITS", "exits", "scores"]

EXITS = ("agreement", "confidence")


def scores(
    stacked: np.ndarray,
    rule: str | Rule,
    weights: Sequence[float] | None,
    apply_softmax: bool,
    exit: str,
) -> np.ndarray:
    """Each row's score under the exit rule (``(rows,)``, the lowest over its positions; NaN
    where a member's output holds NaN): a row exits when its score is at least the threshold."""
    if exit not in EXITS:
        raise ValueError(f"unknown exit rule {exit!r}: use one of {', '.join(EXITS)}")
    rows = stacked.shape[1]
    combined = combine(stacked, rule, weights, apply_softmax)  # (rows, ..., classes)
    with np.errstate(invalid="ignore"):
        if exit == "confidence":
            score = np.max(combined, axis=-1)
        else:
            top = np.argmax(combined, axis=-1)  # (rows, ...)
            votes = np.argmax(stacked, axis=-1)  # (members, rows, ...)
            score = np.mean(votes == top[None], axis=0, dtype=np.float64)
    score = np.asarray(score, dtype=np.float64).reshape(rows, -1).min(axis=1)
    broken = np.isnan(stacked.reshape(len(stacked), rows, -1)).any(axis=(0, 2))
    broken |= np.isnan(np.asarray(combined, dtype=np.float64).reshape(rows, -1)).any(axis=1)
    return np.where(broken, np.nan, score)


def exits(
    stacked: np.ndarray,
    rule: str | Rule,
    weights: Sequence[float] | None,
    apply_softmax: bool,
    exit: str,
    threshold: float,
) -> np.ndarray:
    """``(rows,)`` bool: the rows the members in ``stacked`` answer on their own."""
    score = scores(stacked, rule, weights, apply_softmax, exit)
    with np.errstate(invalid="ignore"):
        return np.asarray(score >= threshold - 1e-9)  # NaN: never
