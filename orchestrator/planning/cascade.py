"""Cascades: choosing the tiers and the threshold, the calibration file, and what serving reads.

``chorus calibrate`` gives each member's output on validation rows; this module simulates every
candidate cascade on them with the combiner's own exit rule (:func:`combiner.exits`, the
function the prediction stage runs after each tier, so that the simulation and the server never
disagree) and keeps the cheapest whose answers match the full ensemble's often enough
(:func:`candidates`, :func:`choose`). The choice is saved as a :class:`Calibration`
(``calibration.json``); ``chorus plan`` and ``chorus up`` read it back with
:func:`resolve_cascade`: the combiner's :class:`~combiner.CascadeRoute`, and each member's share
of the rows (:func:`member_shares`), which the planner sizes it for.

A candidate is scored by:

* ``answered``: the share of rows answered after each tier (the last answers the rest);
* ``reach``: the share of rows that reach each tier (``reach[0]`` is 1);
* ``fidelity``: the share of rows whose answer's top class is the full ensemble's (every
  position, for an output with positions);
* ``accuracy``: the share answered right, when labels are given;
* ``cost``: the expected cost of a row relative to the full ensemble,
  ``sum_k reach[k] * cost(tier k) / cost(all members)``, from the members' profiled costs
  (:func:`member_costs`).

Pure: no Triton, no files but the calibration's.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from combiner import CascadeRoute, combine, exits, scores
from orchestrator.errors import ChorusError, SpecError, from_validation
from orchestrator.planning.files import read_json
from orchestrator.planning.hardware import Device
from orchestrator.planning.profile import Profile
from orchestrator.planning.spec import Ensemble

__all__ = [
    "MAX_SPLITS",
    "MAX_THRESHOLDS",
    "Calibration",
    "Candidate",
    "Combining",
    "calibration",
    "candidates",
    "choose",
    "ensemble_accuracy",
    "frontier",
    "load_calibration",
    "meets",
    "member_costs",
    "member_shares",
    "resolve_cascade",
    "save_calibration",
    "simulate",
    "splits",
]

Tiers = tuple[tuple[str, ...], ...]
Rule = Callable[[np.ndarray, np.ndarray], np.ndarray]

# With many members, every split into contiguous tiers is too many to simulate (2^(n-1) - 1):
# the splits then have at most as many tiers as keep their count under this. Each tier beyond
# the first few adds a round trip to the rows that go on, so deep cascades rarely pay anyway.
MAX_SPLITS = 256
# The confidence thresholds tried when the file sets none: the distinct scores of the
# validation rows, thinned to this many (evenly over their ranks).
MAX_THRESHOLDS = 64


@dataclass(frozen=True)
class Combining:
    """How the ensemble combines a set of its members (its rule, their weights, softmax), and
    the exit rule that reads the combination: what the combiner does after each tier."""

    rule: str | Rule
    weights: Mapping[str, float]
    softmax: bool
    exit: Literal["agreement", "confidence"]

    def stacked(self, outputs: Mapping[str, np.ndarray], members: Sequence[str]) -> np.ndarray:
        return np.stack([outputs[m] for m in members])

    def combined(self, outputs: Mapping[str, np.ndarray], members: Sequence[str]) -> np.ndarray:
        return combine(
            self.stacked(outputs, members), self.rule, self._weights(members), self.softmax
        )

    def scores(self, outputs: Mapping[str, np.ndarray], members: Sequence[str]) -> np.ndarray:
        stacked = self.stacked(outputs, members)
        return scores(stacked, self.rule, self._weights(members), self.softmax, self.exit)

    def exits(
        self, outputs: Mapping[str, np.ndarray], members: Sequence[str], threshold: float
    ) -> np.ndarray:
        stacked = self.stacked(outputs, members)
        return exits(stacked, self.rule, self._weights(members), self.softmax, self.exit, threshold)

    def _weights(self, members: Sequence[str]) -> list[float]:
        return [self.weights[m] for m in members]


@dataclass(frozen=True)
class Candidate:
    """One cascade (tiers and threshold) as it did on the validation rows (the module's
    docstring says what each score means)."""

    tiers: Tiers
    threshold: float
    answered: tuple[float, ...]
    reach: tuple[float, ...]
    fidelity: float
    accuracy: float | None
    cost: float


def member_costs(
    profile: Profile, members: Sequence[str], devices: Sequence[Device]
) -> dict[str, float]:
    """Each member's cost of a row: the least time an instance is busy per row (its service
    time over the batch size, at the best measured batch size), on the first of ``devices``
    that the profile has a curve of every member for.

    The best batch size because the planner batches the rows a member gets to run it at its
    most efficient; busy time, not the round trip, because that is what a row takes of the
    instance that the planner buys; one device for all, because only times on the same device
    compare (a GPU speeds a CNN up far more than an MLP), and the first, because that is the
    kind the plan puts the members on first (GPUs come before the CPU)."""
    for device in devices:
        curves = {m: profile.curve(m, device) for m in members}
        found = {m: c for m, c in curves.items() if c is not None}
        if len(found) == len(members):
            return {
                m: min(ms / batch for batch, ms in (c.service_ms or c.latency_ms))
                for m, c in found.items()
            }
    kinds = ", ".join(dict.fromkeys(d.kind for d in devices)) or "none"
    raise ChorusError(
        f"the profile has no device with a curve for every member ({', '.join(members)}) "
        f"among this machine's ({kinds}): measure them with 'chorus profile'"
    )


def splits(members: Sequence[str]) -> list[Tiers]:
    """Every split of ``members`` (in order, cheapest first) into 2 or more contiguous tiers;
    for many members, those of at most as many tiers as keep the count within
    :data:`MAX_SPLITS` (always every split into 2)."""
    gaps = len(members) - 1
    most, total = 1, gaps
    while most < gaps and total + math.comb(gaps, most + 1) <= MAX_SPLITS:
        most += 1
        total += math.comb(gaps, most)
    out = []
    for count in range(1, most + 1):
        for cuts in itertools.combinations(range(1, len(members)), count):
            bounds = (0, *cuts, len(members))
            out.append(tuple(tuple(members[a:b]) for a, b in itertools.pairwise(bounds)))
    return out


@dataclass
class _Rows:
    """The validation rows and what every candidate reads of them, computed once per set of
    members so far (many candidates share a prefix)."""

    outputs: Mapping[str, np.ndarray]
    combining: Combining
    costs: Mapping[str, float]
    labels: np.ndarray | None
    _cache: dict[tuple[object, ...], np.ndarray] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(next(iter(self.outputs.values())))

    @property
    def order(self) -> list[str]:
        return list(self.outputs)

    def prefix(self, tiers: Tiers, k: int) -> tuple[str, ...]:
        """The members of tiers 0..k, in the ensemble's order (as the combiner stacks them)."""
        chosen = {m for tier in tiers[: k + 1] for m in tier}
        return tuple(m for m in self.order if m in chosen)

    def top(self, members: tuple[str, ...]) -> np.ndarray:
        """``(rows, positions)``: the top class of these members' combination."""
        return self._cached(
            ("top", members),
            lambda: _flat_top(self.combining.combined(self.outputs, members)),
        )

    def scores(self, members: tuple[str, ...]) -> np.ndarray:
        return self._cached(
            ("scores", members), lambda: self.combining.scores(self.outputs, members)
        )

    def exits(self, members: tuple[str, ...], threshold: float) -> np.ndarray:
        return self._cached(
            ("exits", members, threshold),
            lambda: self.combining.exits(self.outputs, members, threshold),
        )

    def _cached(self, key: tuple[object, ...], make: Callable[[], np.ndarray]) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


def _flat_top(combined: np.ndarray) -> np.ndarray:
    return np.argmax(combined, axis=-1).reshape(len(combined), -1)


def simulate(
    outputs: Mapping[str, np.ndarray],
    costs: Mapping[str, float],
    combining: Combining,
    tiers: Tiers,
    threshold: float,
    labels: np.ndarray | None = None,
) -> Candidate:
    """One cascade on the validation rows, as the combiner serves it: after each tier but
    the last, the rows still going whose members so far meet the exit rule at ``threshold``
    are answered with those members' combination; the last tier answers the rest.
    ``outputs``: member -> ``(rows, ..., classes)``, in the ensemble's order; ``labels``: the
    true class of each row (and position), ``(rows, ...)``."""
    return _simulate(_Rows(outputs, combining, costs, labels), tiers, threshold)


def _simulate(rows: _Rows, tiers: Tiers, threshold: float) -> Candidate:
    going = np.ones(rows.count, dtype=bool)
    answer = np.zeros_like(rows.top(tuple(rows.order)))
    answered, reach = [], []
    for k in range(len(tiers)):
        members = rows.prefix(tiers, k)
        reach.append(np.count_nonzero(going) / rows.count)
        leaving = going.copy() if k == len(tiers) - 1 else going & rows.exits(members, threshold)
        answer[leaving] = rows.top(members)[leaving]
        answered.append(np.count_nonzero(leaving) / rows.count)
        going &= ~leaving
    fidelity = float(np.mean(np.all(answer == rows.top(tuple(rows.order)), axis=1)))
    accuracy = None if rows.labels is None else _accuracy(answer, rows.labels)
    tier_costs = [sum(rows.costs[m] for m in tier) for tier in tiers]
    cost = sum(r * c for r, c in zip(reach, tier_costs, strict=True)) / sum(tier_costs)
    return Candidate(tiers, threshold, tuple(answered), tuple(reach), fidelity, accuracy, cost)


def _accuracy(top: np.ndarray, labels: np.ndarray) -> float:
    """The share of rows whose every position is answered with its label."""
    return float(np.mean(np.all(top == labels.reshape(len(labels), -1), axis=1)))


def ensemble_accuracy(
    outputs: Mapping[str, np.ndarray], combining: Combining, labels: np.ndarray
) -> float:
    """The full ensemble's accuracy on the validation rows."""
    return _accuracy(_flat_top(combining.combined(outputs, list(outputs))), labels)


def candidates(
    outputs: Mapping[str, np.ndarray],
    costs: Mapping[str, float],
    combining: Combining,
    tiers: Tiers | None = None,
    threshold: float | None = None,
    labels: np.ndarray | None = None,
) -> list[Candidate]:
    """Every cascade worth trying, simulated (:func:`simulate`): the file's tiers, else every
    split of the members sorted by cost (:func:`splits`); at the file's threshold, else at
    every one that makes a difference on these rows (:func:`_agreement_shares`,
    :func:`_confidence_grid`)."""
    rows = _Rows(outputs, combining, costs, labels)
    if tiers is None:
        by_cost = sorted(rows.order, key=lambda m: (costs[m], rows.order.index(m)))
        options = splits(by_cost)
    else:
        options = [tiers]
    grid = None
    if threshold is None and combining.exit == "confidence":
        grid = _confidence_grid(rows, options)
    found = []
    for option in options:
        if threshold is not None:
            tried = [threshold]
        else:
            tried = grid if grid is not None else _agreement_shares(rows, option)
        found += [_simulate(rows, option, t) for t in tried]
    return found


def _early(rows: _Rows, tiers: Tiers) -> list[tuple[str, ...]]:
    """The members so far at each tier that may answer early (all but the last)."""
    return [rows.prefix(tiers, k) for k in range(len(tiers) - 1)]


def _agreement_shares(rows: _Rows, tiers: Tiers) -> list[float]:
    """Every share of votes the members so far can reach at a tier that may answer early:
    k/n for n of them, k = 1..n (0 would let every row out at the first tier)."""
    early = _early(rows, tiers)
    return sorted({k / len(members) for members in early for k in range(1, len(members) + 1)})


def _confidence_grid(rows: _Rows, options: Sequence[Tiers]) -> list[float]:
    """The distinct scores of the rows at every tier that may answer early, thinned evenly
    over their ranks to :data:`MAX_THRESHOLDS`: the same grid for every split, so that each set
    of members so far is judged once per threshold, however many splits share it."""
    early = {members for tiers in options for members in _early(rows, tiers)}
    values = np.unique(np.concatenate([rows.scores(members) for members in sorted(early)]))
    values = values[np.isfinite(values)]
    if len(values) > MAX_THRESHOLDS:
        ranks = np.linspace(0, len(values) - 1, MAX_THRESHOLDS).round().astype(int)
        values = values[np.unique(ranks)]
    return [float(v) for v in values]


def meets(candidate: Candidate, target: float, full_accuracy: float | None = None) -> bool:
    """Whether the candidate is good enough: its fidelity at least ``target``; with labels
    (``full_accuracy`` given), its accuracy within ``1 - target`` of the full ensemble's
    instead (a cascade may then differ from the full ensemble where both are wrong)."""
    if full_accuracy is None or candidate.accuracy is None:
        return candidate.fidelity >= target - 1e-12
    return candidate.accuracy >= full_accuracy - (1 - target) - 1e-12


def choose(
    found: Sequence[Candidate], target: float, full_accuracy: float | None = None
) -> Candidate | None:
    """The cheapest candidate that :func:`meets` the target (ties: the higher fidelity, then
    fewer tiers); None when none does."""
    good = [c for c in found if meets(c, target, full_accuracy)]
    return min(good, key=_cheapest_first, default=None)


def _cheapest_first(c: Candidate) -> tuple[float, float, int, float]:
    return (round(c.cost, 12), -c.fidelity, len(c.tiers), -c.threshold)


def frontier(found: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no other beats on both cost and fidelity, cheapest first: the ones worth
    showing (a cheaper one has a lower fidelity)."""
    best: list[Candidate] = []
    for c in sorted(found, key=_cheapest_first):
        if not best or c.fidelity > best[-1].fidelity + 1e-12:
            best.append(c)
    return best


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Calibration(_Strict):
    """The file ``chorus calibrate`` writes (``calibration.json``): the cascade it chose for an
    ensemble, and how that did on the validation rows."""

    ensemble: str = Field(description="the ensemble's name")
    members: list[str] = Field(description="the members calibrated (a changed ensemble is stale)")
    output: str = Field(description="the output the exit rule read")
    exit: Literal["agreement", "confidence"]
    tiers: list[list[str]] | None = Field(
        description="the tiers chosen, cheapest first; None: no cascade met the target, the "
        "full ensemble is served"
    )
    threshold: float | None = Field(ge=0, le=1, description="the exit rule's threshold")
    reach: list[float] = Field(
        min_length=1, description="the share of the validation rows that reach each tier"
    )
    fidelity: float = Field(
        ge=0, le=1, description="the share of rows answered with the full ensemble's top class"
    )
    accuracy: float | None = Field(None, ge=0, le=1, description="with labels: right answers")
    full_accuracy: float | None = Field(None, ge=0, le=1, description="the full ensemble's")
    cost: float = Field(ge=0, description="the expected cost of a row, relative to all members")
    target: float = Field(gt=0, le=1, description="the fidelity asked for")
    rows: int = Field(ge=1, description="validation rows")
    best_fidelity: float | None = Field(
        None, ge=0, le=1, description="with tiers None: the best fidelity any cascade reached"
    )
    combination: dict[str, object] = Field(
        description="how the members were combined and what they were (the rule, softmax, "
        "the weights, each member file's SHA-256): another is a stale calibration"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Calibration:
        if self.tiers is None:
            if self.threshold is not None or len(self.reach) != 1:
                raise ValueError("without tiers (the full ensemble), no threshold and reach [1]")
            return self
        if self.threshold is None:
            raise ValueError("tiers need a threshold")
        if len(self.reach) != len(self.tiers):
            raise ValueError(f"reach has {len(self.reach)} values for {len(self.tiers)} tiers")
        if self.reach[0] != 1 or any(not 0 <= r <= 1 for r in self.reach):
            raise ValueError(
                f"reach {self.reach}: every row reaches the first tier (1), and a "
                "share of them each later one (0 to 1)"
            )
        if any(later > earlier for earlier, later in itertools.pairwise(self.reach)):
            raise ValueError(
                f"reach {self.reach}: a row reaches a tier only through the one "
                "before, so the shares cannot grow"
            )
        placed = sorted(m for tier in self.tiers for m in tier)
        if placed != sorted(self.members) or not all(self.tiers):
            raise ValueError("the tiers must hold every member exactly once, in non-empty tiers")
        return self


def calibration(
    ensemble: Ensemble,
    chosen: Candidate | None,
    found: Sequence[Candidate],
    target: float,
    rows: int,
    full_accuracy: float | None = None,
) -> Calibration:
    """The calibration file for ``chosen`` (None: the full ensemble is kept, and the file says
    the best fidelity reached)."""
    assert ensemble.cascade is not None
    common = {
        "ensemble": ensemble.name,
        "members": [m.name for m in ensemble.members],
        "output": ensemble.cascade.output,
        "exit": ensemble.cascade.exit,
        "full_accuracy": full_accuracy,
        "target": target,
        "rows": rows,
        "combination": combination_of(ensemble),
    }
    if chosen is None:
        best = max((c.fidelity for c in found), default=None)
        return Calibration.model_validate(
            {
                **common,
                "tiers": None,
                "threshold": None,
                "reach": [1.0],
                "fidelity": 1.0,
                "accuracy": full_accuracy,
                "cost": 1.0,
                "best_fidelity": best,
            }
        )
    return Calibration.model_validate(
        {
            **common,
            "tiers": [list(t) for t in chosen.tiers],
            "threshold": chosen.threshold,
            "reach": list(chosen.reach),
            "fidelity": chosen.fidelity,
            "accuracy": chosen.accuracy,
            "cost": chosen.cost,
        }
    )


def combination_of(ensemble: Ensemble) -> dict[str, object]:
    """What a calibration holds for: the rule, softmax, each member's weight and the SHA-256
    of its file (a retrained member answers differently, so its shares and threshold are)."""
    return {
        "rule": ensemble.rule,
        "softmax": ensemble.softmax,
        "weights": {m.name: m.weight for m in ensemble.members},
        "files": {m.name: _digest(m.path) for m in ensemble.members},
    }


def _digest(path: Path) -> str | None:
    """The file's SHA-256; None where it is not here (planning from a profile alone)."""
    if not path.is_file():
        return None
    hashed = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            hashed.update(block)
    return hashed.hexdigest()


def load_calibration(path: str | Path) -> Calibration:
    file = Path(path)
    if not file.exists():
        raise SpecError(file, "", "no such file (write it with 'chorus calibrate')")
    try:
        return Calibration.model_validate_json(read_json(file))
    except ValidationError as e:
        raise from_validation(file, e) from None


def save_calibration(found: Calibration, path: str | Path) -> None:
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(found.model_dump_json(indent=2) + "\n")


def member_shares(found: Calibration) -> dict[str, float]:
    """Each member's share of the rows: the reach of its tier (1 for every member when the
    full ensemble is served). A tier that no validation row reached gets one row's share:
    rows in serving may still reach it, and the planner sizes nothing for no rows."""
    if found.tiers is None:
        return {m: 1.0 for m in found.members}
    least = 1.0 / found.rows
    return {
        m: max(least, reach)
        for tier, reach in zip(found.tiers, found.reach, strict=True)
        for m in tier
    }


def resolve_cascade(
    ensemble: Ensemble,
    found: Calibration | None,
    source: str | Path = "the calibration",
    say: Callable[[str], None] | None = None,
) -> tuple[CascadeRoute | None, dict[str, float] | None]:
    """The combiner's cascade for the ensemble file's ``combine.cascade`` and the calibration
    ``found`` (read from ``source``), and each member's share of the rows for the planner
    (None: every row reaches every member). The file's tiers and threshold win; what it
    leaves out comes from the calibration. ``say`` hears what the caller should tell the
    user."""
    cascade = ensemble.cascade
    if cascade is None:
        return None, None
    tell = say or (lambda _: None)
    if found is not None:
        _check_current(ensemble, found, source)
        if found.tiers is None:
            reached = found.best_fidelity
            best = "" if reached is None else f" (the best reached {reached:.2%})"
            if cascade.tiers is None or cascade.threshold is None:
                tell(
                    f"{source}: no cascade met the fidelity {found.target:g}{best}: serving "
                    "the full ensemble"
                )
                return None, None
            tell(
                f"{source}: no cascade met the fidelity {found.target:g}{best}; the file sets "
                "its tiers and threshold: serving them"
            )
            found = None
    tiers = cascade.tiers or _calibrated_tiers(ensemble, found)
    threshold = cascade.threshold
    if threshold is None:
        if found is None or found.threshold is None:
            raise _uncalibrated(ensemble, "threshold", "it")
        threshold = found.threshold
    route = CascadeRoute(
        tiers=tiers, exit=cascade.exit, threshold=threshold, output=_output(ensemble)
    )
    shares = None if found is None else member_shares(found)
    if found is not None and abs((found.threshold or 0.0) - threshold) > 1e-9:
        tell(
            f"{source} was calibrated at threshold {found.threshold}, the file sets "
            f"{threshold}: the plan assumes every row reaches every member"
        )
        shares = None
    elif found is None:
        tell("no calibration: the plan assumes every row reaches every member")
    return route, shares


def _check_current(ensemble: Ensemble, found: Calibration, source: str | Path) -> None:
    """Refuse a calibration made for another ensemble, other members, tiers or exit rule."""
    cascade = ensemble.cascade
    assert cascade is not None
    members = [m.name for m in ensemble.members]
    problems = []
    if found.ensemble != ensemble.name:
        problems.append(("ensemble", f"is for ensemble {found.ensemble!r}, not {ensemble.name!r}"))
    if sorted(found.members) != sorted(members):
        problems.append(
            ("members", f"is for members {', '.join(found.members)}, not {', '.join(members)}")
        )
    now = combination_of(ensemble)
    files, kept = now.get("files"), found.combination.get("files")
    if isinstance(files, dict) and isinstance(kept, dict):
        # a member file that is not here (planning from a profile alone) cannot be compared
        now["files"] = {m: d if d is not None else kept.get(m) for m, d in files.items()}
    for key, value in found.combination.items():
        if now.get(key) != value:
            current = now.get(key)
            changed = (
                "of " + ", ".join(m for m in value if current.get(m) != value[m])
                if isinstance(value, dict) and isinstance(current, dict)
                else f"{value!r}, now {current!r}"
            )
            problems.append((f"combination.{key}", f"was made with another {key} ({changed})"))
    if set(found.combination) != set(now):
        problems.append(("combination", "was made by another version of chorus calibrate"))
    if found.exit != cascade.exit:
        problems.append(("exit", f"is for exit {found.exit!r}, the file says {cascade.exit!r}"))
    if cascade.output and found.output != cascade.output:
        problems.append(
            ("output", f"read output {found.output!r}, the file's cascade reads {cascade.output!r}")
        )
    if (
        cascade.tiers is not None
        and found.tiers is not None
        and _same_tiers(cascade.tiers) != _same_tiers(found.tiers)
    ):
        problems.append(("tiers", f"has tiers {found.tiers}, the file {_listed(cascade.tiers)}"))
    if problems:
        again = f"run 'chorus calibrate {ensemble.file.name}' again"
        (where, what), *more = problems
        raise SpecError(source, where, f"{what}: {again}", [(f, f"{p}: {again}") for f, p in more])


def _calibrated_tiers(ensemble: Ensemble, found: Calibration | None) -> Tiers:
    if found is None or found.tiers is None:
        raise _uncalibrated(ensemble, "tiers", "them")
    return tuple(tuple(t) for t in found.tiers)


def _uncalibrated(ensemble: Ensemble, field: str, them: str) -> SpecError:
    """The file leaves ``field`` to a calibration there is none of."""
    return SpecError(
        ensemble.file,
        f"combine.cascade.{field}",
        f"not set, and there is no calibration to take {them} from: run 'chorus calibrate "
        f"{ensemble.file.name} --inputs X.npy' (or pass --calibration FILE), or set {them}",
    )


def _output(ensemble: Ensemble) -> str:
    assert ensemble.cascade is not None
    return ensemble.cascade.output or (ensemble.outputs[0].name if ensemble.outputs else "")


def _same_tiers(tiers: Sequence[Sequence[str]]) -> list[list[str]]:
    return [sorted(t) for t in tiers]


def _listed(tiers: Tiers) -> list[list[str]]:
    return [list(t) for t in tiers]
