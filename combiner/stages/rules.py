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

Non-finite values, because a member may overflow on a large input (the combiner refuses non-finite
inputs, and refuses an answer that is not finite: :mod:`combiner.stages.combination`). The rules
never make a non-finite value out of finite ones: the means are taken in float64 (a mean of float32
values near the float32 maximum is not infinite), the geometric mean is a softmax of the weighted
log-probabilities. ``softmax`` is the limit of the finite case: the classes at ``+inf`` share the
probability equally, those at ``-inf`` get none, a row all ``-inf`` is uniform (equal logits); a row
holding NaN is NaN. A NaN in a member's row makes that row NaN for every rule but ``vote``, where
that member casts no vote on that row: the row's fractions then sum to less than 1 (to 0 when no
member voted), and it does not count as agreeing.

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
from types import ModuleType

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
    """exp(x) / sum(exp(x)) over ``axis``, shifted by the row's maximum (no overflow), and its
    limit where the maximum is infinite (see the module's docstring)."""
    x = np.asarray(x)
    top = np.max(x, axis=axis, keepdims=True)  # NaN where the row holds NaN
    infinite = np.isinf(top)
    with np.errstate(over="ignore"):  # -3e38 - 3e38: -inf, whose exp is 0
        if not infinite.any():
            shifted = x - top
        else:  # where the maximum is infinite, the entries at it share the row, others get 0
            at_top = np.where(x == top, 0, -np.inf).astype(x.dtype)
            shifted = np.where(infinite, at_top, x - np.where(infinite, 0, top).astype(x.dtype))
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)


def _normalised(weights: np.ndarray) -> np.ndarray:
    return weights / weights.sum()


def mean(stacked: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """In float64: a float32 sum can overflow where the mean does not."""
    return np.mean(stacked, axis=0, dtype=np.float64).astype(stacked.dtype)


def weighted_mean(stacked: np.ndarray, weights: np.ndarray) -> np.ndarray:
    combined = np.tensordot(
        _normalised(weights.astype(np.float64)), stacked.astype(np.float64), axes=(0, 0)
    )
    return combined.astype(stacked.dtype)


def geometric_mean(stacked: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """exp(sum_m w_m log p_m), renormalised over classes: needs non-negative outputs. That is
    the softmax of the weighted log-probabilities, computed as one (no overflow, no 0/0)."""
    logs = np.log(np.clip(stacked.astype(np.float64), _TINY, None))
    combined = np.tensordot(_normalised(weights.astype(np.float64)), logs, axes=(0, 0))
    return softmax(combined).astype(stacked.dtype)


def median(stacked: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.median(stacked, axis=0)


def maximum(stacked: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.max(stacked, axis=0)


def _ballots(stacked: np.ndarray) -> np.ndarray:
    """Each member's vote, one-hot over the classes: none where its row holds NaN."""
    classes = stacked.shape[-1]
    ballots = np.eye(classes, dtype=np.float64)[np.argmax(stacked, axis=-1)]
    ballots[np.isnan(stacked).any(axis=-1)] = 0.0
    return ballots


def vote(stacked: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weighted fraction of members voting for each class (a NaN row casts no vote)."""
    ballots = _ballots(stacked)
    return np.tensordot(_normalised(weights.astype(np.float64)), ballots, axes=(0, 0)).astype(
        stacked.dtype
    )


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
    looked for first in ``search_path`` (the ensemble file's folder: loaded from its file,
    :func:`_load_beside`), then imported from sys.path. sys.path is left as it is: a file
    beside the rule (a ``json.py``) must not stand in for a module imported later."""
    if name in RULES:
        return RULES[name]
    module, sep, function = name.partition(":")
    if not sep or not module or not function:
        raise ValueError(
            f"unknown rule {name!r}: use one of {', '.join(RULES)} or 'module:function'"
        )
    try:
        found = _load_beside(module, search_path) or importlib.import_module(module)
        rule = getattr(found, function)
    except ImportError as e:
        raise ValueError(f"rule {name!r}: cannot import module {module!r} ({e})") from e
    except AttributeError:
        raise ValueError(f"rule {name!r}: module {module!r} has no {function!r}") from None
    if not callable(rule):
        raise ValueError(f"rule {name!r}: {function!r} is not callable")
    return rule  # type: ignore[no-any-return]


def _load_beside(module: str, folders: Sequence[str]) -> ModuleType | None:
    """``module`` loaded from the first of ``folders`` that has it (``m.py``, or a package
    ``m/__init__.py``, a dotted name then being one of its modules), or None. It is kept in
    sys.modules under a name of its own, made from its path, so that it stands in for no
    installed module of the same name either; a package's relative imports work, and
    nothing else in the folder becomes importable."""
    import hashlib
    import importlib.util
    from pathlib import Path

    top, _, rest = module.partition(".")
    if not top.isidentifier():
        return None
    for folder in folders:
        package = Path(folder) / top / "__init__.py"
        path = package if package.is_file() else Path(folder) / f"{top}.py"
        if not path.is_file():
            continue
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        alias = f"_chorus_rule_{digest}"
        if alias not in sys.modules:
            inside = [str(package.parent)] if path == package else None
            spec = importlib.util.spec_from_file_location(
                alias, path, submodule_search_locations=inside
            )
            if spec is None or spec.loader is None:
                raise ImportError(f"{path} cannot be loaded as a module")
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[alias] = loaded
            try:
                spec.loader.exec_module(loaded)
            except BaseException:
                del sys.modules[alias]
                raise
        return importlib.import_module(f"{alias}.{rest}") if rest else sys.modules[alias]
    return None


def _working(stacked: np.ndarray, apply_softmax: bool) -> np.ndarray:
    work = stacked.astype(np.promote_types(stacked.dtype, np.float32), copy=False)
    return softmax(work, axis=-1) if apply_softmax else work


def combine(
    stacked: np.ndarray,
    rule: str | Rule,
    weights: Sequence[float] | None = None,
    apply_softmax: bool = False,
) -> np.ndarray:
    """Combine ``(members, batch, ...)`` into ``(batch, ...)``, computing in float32 at least
    (non-finite values are handled as the module's docstring says, not warned about)."""
    fn = load_rule(rule) if isinstance(rule, str) else rule
    with np.errstate(all="ignore"):
        work = _working(stacked, apply_softmax)
        w = np.asarray(weights if weights is not None else np.ones(len(stacked)), dtype=work.dtype)
        return np.asarray(fn(work, w))


def _entropy(p: np.ndarray) -> np.ndarray:
    return -np.sum(p * np.log(np.clip(p, _TINY, None)), axis=-1)


def entropy(p: np.ndarray) -> np.ndarray:
    return _entropy(p.mean(axis=0))


def mutual_information(p: np.ndarray) -> np.ndarray:
    return _entropy(p.mean(axis=0)) - _entropy(p).mean(axis=0)


def variance(p: np.ndarray) -> np.ndarray:
    return p.var(axis=0, dtype=np.float64).mean(axis=-1)


def agreement(p: np.ndarray) -> np.ndarray:
    ballots = _ballots(p)  # (members, batch, ..., classes)
    plurality = np.argmax(ballots.sum(axis=0), axis=-1)
    agrees = np.take_along_axis(ballots, plurality[None, ..., None], axis=-1)[..., 0]
    return np.mean(agrees, axis=0).astype(p.dtype)


UNCERTAINTY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "entropy": entropy,
    "mutual_information": mutual_information,
    "variance": variance,
    "agreement": agreement,
}


def uncertainty(stacked: np.ndarray, measure: str, apply_softmax: bool = False) -> np.ndarray:
    """One uncertainty measure of ``(members, batch, ..., classes)``, as ``(batch, ...)``."""
    with np.errstate(all="ignore"):
        return np.asarray(UNCERTAINTY[measure](_working(stacked, apply_softmax)))
