"""Which members answer which rows of a cascade's batch, when a request stops waiting
(:meth:`combiner.stages.prediction.Prediction.parts`): the rows a tier decided, the rows a
deadline caught inside a tier or before its exit decision, and the quorum over the tiers in
time."""

from __future__ import annotations

import asyncio

import numpy as np

from combiner.stages.prediction import Prediction, Tiers

MEMBERS = ("a", "b", "c", "d")
TIERS = Tiers((("a", "b"), ("c", "d")))


def prediction(quorum: int = 4) -> Prediction:
    return Prediction(4, MEMBERS, ("y",), quorum, None, lambda _: None, TIERS)


def answer(p: Prediction, *members: str) -> None:
    for m in members:
        p.answers[m] = {"y": np.zeros((p.batch, 3), np.float32)}


def test_rows_decided_at_each_tier_name_only_the_tiers_they_reached():
    async def run():
        p = prediction()
        answer(p, "a", "b")
        p.reach(1, np.array([2, 3]))
        p.decide(0, np.array([0, 1]))
        answer(p, "c", "d")
        p.decide(1, np.array([2, 3]))
        return p.parts(0, 4, "no answer within 50 ms")

    first, second = asyncio.run(run())
    assert (first.contributors, first.rows.tolist(), first.lost, first.needed) == (
        ("a", "b"),
        [0, 1],
        {},
        2,
    )
    assert (second.contributors, second.rows.tolist(), second.needed) == (MEMBERS, [2, 3], 4)


def test_a_row_caught_before_its_exit_decision_misses_the_next_tier():
    """Tier 0 answered, the exit rule not run yet: the row has not exited, so its answer names
    tier 1 as missing (it is not a tier-0 exit), and the quorum counts tier 0 only."""

    async def run():
        p = prediction()
        answer(p, "a", "b")
        return p.parts(0, 4, "no answer within 5 ms")

    (part,) = asyncio.run(run())
    assert part.contributors == ("a", "b")
    assert part.lost == {"c": "no answer within 5 ms", "d": "no answer within 5 ms"}
    assert part.needed == 2


def test_a_late_later_tier_leaves_the_quorum_to_the_earlier_one_but_an_error_does_not():
    async def run():
        late, failed = prediction(), prediction()
        for p, why in (
            (late, "not called: it is still running 2 earlier batches, and it would not..."),
            (failed, "INTERNAL: the call failed in the combiner (the error is in its log)"),
        ):
            answer(p, "a", "b")
            p.reach(1, np.arange(4))
            p.decide(0, np.array([], dtype=int))
            answer(p, "c")
            p.miss("d", why)
            p.decide(1, np.arange(4))
        return late.parts(0, 4, None), failed.parts(0, 4, None)

    (late,), (failed,) = asyncio.run(run())
    assert late.contributors == ("a", "b", "c") and late.needed == 2  # answered: partial
    assert failed.contributors == ("a", "b", "c") and failed.needed == 4  # below: an error
    assert set(late.lost) == set(failed.lost) == {"d"}


def test_without_a_cascade_one_part_over_every_member():
    async def run():
        p = Prediction(2, MEMBERS, ("y",), 3, None, lambda _: None)
        answer(p, "a", "c", "d")
        return p.parts(0, 2, "no answer within 9 ms")

    (part,) = asyncio.run(run())
    assert (part.contributors, part.needed, part.lost) == (
        ("a", "c", "d"),
        3,
        {"b": "no answer within 9 ms"},
    )
