"""What a call takes and what it gives back: the types of the SDK's data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np

__all__ = ["Answer", "Inputs", "Outputs"]

Inputs: TypeAlias = np.ndarray | Mapping[str, np.ndarray]
"""A batch for the ensemble: one array of shape ``(batch, *input shape)`` in the dtype of the
ensemble's input (see ``metadata()``), or, for an ensemble of several inputs, a mapping of input
name to such an array (each with the same ``batch``)."""

Outputs: TypeAlias = np.ndarray | dict[str, np.ndarray]
"""The ensemble's answer: one array of shape ``(batch, *output shape)`` in the dtype of the
ensemble's output (e.g. float32 probabilities of shape ``(batch, classes)``) when it has one
output, else a dict of output name to such an array."""


@dataclass(frozen=True)
class Answer:
    """The ensemble's outputs, with the members that contributed and those that did not (a
    partial answer, under a deadline and quorum).

    ``outputs``: output name -> array of shape ``(batch, *output shape)``, the output's dtype;
    ``contributors``: the names of the members whose answers were combined, in the ensemble's
    order; ``missing``: the names of the others (``()`` when none is); ``reasons``: member name
    -> why it is missing (e.g. ``"no answer within 400 ms"``), for each name in ``missing``;
    ``tiers``: with a cascade, per row, the tier (from 0) that answered it (the row combines the
    contributors of tiers 0 to that one), else None.
    """

    outputs: dict[str, np.ndarray]
    contributors: tuple[str, ...]
    missing: tuple[str, ...] = ()
    reasons: Mapping[str, str] = field(default_factory=dict)
    tiers: tuple[int, ...] | None = None

    @property
    def partial(self) -> bool:
        """Whether some member is missing from the answer."""
        return bool(self.missing)

    def value(self) -> Outputs:
        """One output as an array, several as a dict of name to array."""
        return next(iter(self.outputs.values())) if len(self.outputs) == 1 else self.outputs
