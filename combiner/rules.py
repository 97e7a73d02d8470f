"""Combination rules and uncertainty measures: pure, vectorised numpy over the member axis.

Every rule takes the members' outputs stacked as ``(members, batch, ..., classes)`` and the
members' weights, and returns ``(batch, ..., classes)``:

* ``mean``, ``weighted_mean`` (weights normalised to sum 1), ``geometric_mean`` (of
  probabilities, renormalised over the last axis; weighted), ``median``, ``max``;
* ``vote``: each member votes for its arg-max class; the result is the (weighted) fraction of
  votes per class, so its arg-max is the plurality class. Ties between classes go to the lowest
  class index (``numpy.argmax``), wherever a single class is taken;
* a user rule, ``"module:function"``, called as ``function(stacked, weights)``.

With ``softmax``, each member's output is turned into probabilities (over the last axis) first.

Uncertainty measures, per sample, from the members' probabilities ``p`` (``(members, batch,
..., classes)``; the softmax of the outputs when ``softmax`` is on, else the outputs as given):

* ``entropy``: predictive entropy, ``H(mean_m p)``;
* ``mutual_information``: the epistemic part, ``H(mean_m p) - mean_m H(p)``;
* ``variance``: the members' variance, averaged over classes;
* ``agreement``: the fraction of members whose arg-max is the plurality vote's class.

Each returns ``(batch, ...)`` (the class axis reduced). Entropies are in nats.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "RULES",
    "UNCERTAINTY",
    "Rule",
    "combine",
    "load_rule",
    "softmax",
    "uncertainty",
]

Rule = Callable[[np.ndarray, np.ndarray], np.ndarray]
_TINY = 1e-12


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)


def _normalised(weights: np.ndarray) -> np.ndarray:
    return weights / weights.sum()


def mean(stacked: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.mean(stacked, axis=0)


def weighted_mean(stacked: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.tensordot(_normalised(weights), stacked, axes=(0, 0))


def geometric_mean(stacked: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """exp(sum_m w_m log p_m), renormalised over classes: needs non-negative outputs."""
    logs = np.log(np.clip(stacked, _TINY, None))
    combined = np.exp(np.tensordot(_normalised(weights), logs, axes=(0, 0)))
    return combined / combined.sum(axis=-1, keepdims=True)


def median(stacked: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.median(stacked, axis=0)


def maximum(stacked: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.max(stacked, axis=0)


def vote(stacked: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weighted fraction of members voting for each class."""
    classes = stacked.shape[-1]
    ballots = np.eye(classes, dtype=np.float64)[np.argmax(stacked, axis=-1)]
    return np.tensordot(_normalised(weights), ballots, axes=(0, 0)).astype(stacked.dtype)


RULES: dict[str, Rule] = {
    "mean": mean,
    "weighted_mean": weighted_mean,
    "geometric_mean": geometric_mean,
    "median": median,
    "max": maximum,
    "vote": vote,
}


def load_rule(name: str, search_path: Sequence[str] = ()) -> Rule:
    """A built-in rule by name, or a user rule given as ``"module:function"``, its module
    looked for first in ``search_path`` (the ensemble file's folder), then on sys.path."""
    if name in RULES:
        return RULES[name]
    for folder in reversed(search_path):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    module, sep, function = name.partition(":")
    if not sep or not module or not function:
        raise ValueError(
            f"unknown rule {name!r}: use one of {', '.join(RULES)} or 'module:function'"
        )
    try:
        rule = getattr(importlib.import_module(module), function)
    except ImportError as e:
        raise ValueError(f"rule {name!r}: cannot import module {module!r} ({e})") from e
    except AttributeError:
        raise ValueError(f"rule {name!r}: module {module!r} has no {function!r}") from None
    if not callable(rule):
        raise ValueError(f"rule {name!r}: {function!r} is not callable")
    return rule  # type: ignore[no-any-return]


def _working(stacked: np.ndarray, apply_softmax: bool) -> np.ndarray:
    work = stacked.astype(np.promote_types(stacked.dtype, np.float32), copy=False)
    return softmax(work, axis=-1) if apply_softmax else work


def combine(
    stacked: np.ndarray,
    rule: str | Rule,
    weights: Sequence[float] | None = None,
    apply_softmax: bool = False,
) -> np.ndarray:
    """Combine ``(members, batch, ...)`` into ``(batch, ...)``, computing in float32 at least."""
    work = _working(stacked, apply_softmax)
    w = np.asarray(weights if weights is not None else np.ones(len(stacked)), dtype=work.dtype)
    fn = load_rule(rule) if isinstance(rule, str) else rule
    return np.asarray(fn(work, w))


def _entropy(p: np.ndarray) -> np.ndarray:
    return -np.sum(p * np.log(np.clip(p, _TINY, None)), axis=-1)


def entropy(p: np.ndarray) -> np.ndarray:
    return _entropy(p.mean(axis=0))


def mutual_information(p: np.ndarray) -> np.ndarray:
    return _entropy(p.mean(axis=0)) - _entropy(p).mean(axis=0)


def variance(p: np.ndarray) -> np.ndarray:
    return p.var(axis=0).mean(axis=-1)


def agreement(p: np.ndarray) -> np.ndarray:
    votes = np.argmax(p, axis=-1)  # (members, batch, ...)
    plurality = np.argmax(vote(p, np.ones(len(p))), axis=-1)
    return np.mean(votes == plurality[None], axis=0).astype(p.dtype)


UNCERTAINTY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "entropy": entropy,
    "mutual_information": mutual_information,
    "variance": variance,
    "agreement": agreement,
}


def uncertainty(stacked: np.ndarray, measure: str, apply_softmax: bool = False) -> np.ndarray:
    """One uncertainty measure of ``(members, batch, ..., classes)``, as ``(batch, ...)``."""
    return np.asarray(UNCERTAINTY[measure](_working(stacked, apply_softmax)))
