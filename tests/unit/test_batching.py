"""The batching stage's queueing, driven step by step: its seam is the function that starts a
batch's flight (the prediction stage, stood for here by a flight the test finishes by hand)."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from combiner.errors import RequestError
from combiner.stages.batching import Batcher, Rows


def rows(values: list[float], width: int = 2) -> Rows:
    data = np.array([[v] * width for v in values], dtype=np.float32)
    return Rows.of(len(values), {"x": data.tobytes()}, {"x": data.shape})


class Flight:
    def __init__(self, batch: Rows, has_deadline: bool) -> None:
        self.x = np.frombuffer(batch.data["x"], dtype=np.float32).reshape(batch.shapes["x"])
        self.has_deadline = has_deadline
        self.requests = 0
        self.settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def expect(self, requests: int) -> None:
        self.requests = requests


class Members:
    """Stands for the prediction stage: records each batch; flights end when released."""

    def __init__(self) -> None:
        self.flights: list[Flight] = []

    def start(
        self, batch: Rows, wanted: tuple[str, ...], deadlines: tuple, cascade: bool = True
    ) -> Flight:
        self.flights.append(Flight(batch, any(d is not None for d in deadlines)))
        return self.flights[-1]

    @property
    def batches(self) -> list[int]:
        return [len(f.x) for f in self.flights]

    def finish(self) -> None:
        for f in self.flights:
            if not f.settled.done():
                f.settled.set_result(None)


async def steps(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def answer(placement) -> np.ndarray:
    """What the members would answer for a request: its rows of the batch, times ten."""
    return placement.flight.x[placement.start : placement.stop] * 10


def test_requests_arriving_while_the_members_are_busy_share_one_batch():
    async def go():
        members = Members()
        batcher = Batcher(members.start, max_rows=64, max_in_flight=1)
        first = asyncio.create_task(batcher.submit(rows([1.0]), ("y",), None))
        await steps()  # the first goes straight through and holds the only slot
        others = [
            asyncio.create_task(batcher.submit(rows([float(i), i + 0.5]), ("y",), None))
            for i in range(2, 6)
        ]
        await steps()
        batches_while_busy = list(members.batches)
        members.finish()  # the slot frees: the four queued requests leave together
        placements = await asyncio.gather(first, *others)
        await batcher.close()
        return batches_while_busy, members.batches, placements, members

    while_busy, batches, placements, members = asyncio.run(go())
    assert while_busy == [1]
    assert batches == [1, 8]
    assert [f.requests for f in members.flights] == [1, 4]  # each knows who waits for it
    np.testing.assert_allclose(answer(placements[0]), [[10.0, 10.0]])
    for i, placement in zip(range(2, 6), placements[1:], strict=True):
        np.testing.assert_allclose(answer(placement), [[i * 10] * 2, [(i + 0.5) * 10] * 2])


def test_incompatible_or_oversized_requests_wait_for_their_own_batch():
    async def go():
        members = Members()
        batcher = Batcher(members.start, max_rows=4, max_in_flight=1)
        tasks = [asyncio.create_task(batcher.submit(rows([0.0]), ("y",), None))]
        await steps()
        tasks += [
            asyncio.create_task(batcher.submit(rows([1.0, 2.0, 3.0]), ("y",), None)),
            asyncio.create_task(batcher.submit(rows([4.0], width=3), ("y",), None)),  # shape
            asyncio.create_task(batcher.submit(rows([5.0, 6.0]), ("y",), None)),  # over 4 rows
            asyncio.create_task(batcher.submit(rows([7.0]), ("y",), None)),
        ]
        for _ in range(4):  # each batch leaves when the one before it has finished
            await steps()
            members.finish()
        placements = await asyncio.gather(*tasks)
        await batcher.close()
        return members.batches, placements

    batches, placements = asyncio.run(go())
    assert batches == [1, 4, 1, 2]  # [0]; [1,2,3]+[7]; [4] alone (width 3); [5,6]
    assert answer(placements[2]).shape == (1, 3)
    np.testing.assert_allclose(answer(placements[4]), [[70.0, 70.0]])


def test_a_slot_stays_taken_until_its_flight_is_settled():
    """A batch whose members are slow (or hung, until the member timeout or its requests'
    deadlines settle it) holds its slot; the queue waits, and moves once it is settled."""

    async def go():
        members = Members()
        batcher = Batcher(members.start, max_rows=64, max_in_flight=1)
        first = asyncio.create_task(batcher.submit(rows([1.0]), ("y",), None))
        await steps()
        queued = asyncio.create_task(batcher.submit(rows([2.0]), ("y",), None))
        await asyncio.sleep(0.05)
        held = list(members.batches)
        members.flights[0].settled.set_result(None)
        await steps()
        after = list(members.batches)
        members.finish()
        await asyncio.gather(first, queued)
        await batcher.close()
        return held, after

    held, after = asyncio.run(go())
    assert held == [1]
    assert after == [1, 1]


def test_a_request_queued_past_its_own_deadline_leaves_alone_and_its_neighbours_stay():
    async def go():
        members = Members()
        batcher = Batcher(members.start, max_rows=64, max_in_flight=1)
        loop = asyncio.get_running_loop()
        busy = asyncio.create_task(batcher.submit(rows([0.0]), ("y",), None))
        await steps()
        hurried = asyncio.create_task(batcher.submit(rows([1.0]), ("y",), loop.time() + 0.01))
        patient = asyncio.create_task(batcher.submit(rows([2.0]), ("y",), None))
        with pytest.raises(RequestError) as refused:
            await hurried
        members.finish()
        placement = await patient
        await busy
        members.finish()
        await batcher.close()
        return refused.value, members.flights, placement

    refused, flights, placement = asyncio.run(go())
    assert refused.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "still queued" in str(refused)
    assert [len(f.x) for f in flights] == [1, 1]  # the hurried one never joined a batch
    np.testing.assert_allclose(answer(placement), [[20.0, 20.0]])
    assert not flights[1].has_deadline  # the batch does not carry anyone's deadline


def test_a_batch_knows_whether_a_request_in_it_has_a_deadline():
    async def go():
        members = Members()
        batcher = Batcher(members.start, max_rows=64, max_in_flight=1)
        loop = asyncio.get_running_loop()
        busy = asyncio.create_task(batcher.submit(rows([0.0]), ("y",), None))
        await steps()
        mixed = [
            asyncio.create_task(batcher.submit(rows([1.0]), ("y",), loop.time() + 60)),
            asyncio.create_task(batcher.submit(rows([2.0]), ("y",), None)),
        ]
        await steps()
        members.finish()
        await asyncio.gather(busy, *mixed)
        members.finish()
        await batcher.close()
        return [(len(f.x), f.has_deadline) for f in members.flights]

    assert asyncio.run(go()) == [(1, False), (2, True)]


def test_a_request_whose_client_went_away_is_dropped_from_the_queue():
    async def go():
        members = Members()
        batcher = Batcher(members.start, max_rows=64, max_in_flight=1)
        busy = asyncio.create_task(batcher.submit(rows([0.0]), ("y",), None))
        await steps()
        gone = asyncio.create_task(batcher.submit(rows([1.0]), ("y",), None))
        kept = asyncio.create_task(batcher.submit(rows([2.0]), ("y",), None))
        await steps()
        gone.cancel()
        await steps()
        members.finish()
        placement = await kept
        await busy
        members.finish()
        await batcher.close()
        return members.batches, placement, gone.cancelled()

    batches, placement, cancelled = asyncio.run(go())
    assert cancelled
    assert batches == [1, 1]
    np.testing.assert_allclose(answer(placement), [[20.0, 20.0]])


@pytest.mark.parametrize("fill", [True, False], ids=["fill", "no-fill"])
def test_under_load_a_freed_slot_waits_for_the_batch_to_fill_while_requests_arrive(fill):
    """With a fill time, a request queued behind a busy slot waits for the requests arriving
    after it, up to twice the last batch; without, it leaves alone when the slot frees."""

    async def go():
        members = Members()
        batcher = Batcher(
            members.start,
            max_rows=64,
            max_in_flight=1,
            max_fill_s=60.0 if fill else 0.0,
            max_gap_s=60.0,
        )

        def submit(v):
            return asyncio.create_task(batcher.submit(rows([v]), ("y",), None))

        first = submit(1.0)  # straight through; holds the slot
        await steps()
        pair = [submit(2.0), submit(3.0)]
        await steps()
        members.finish()
        await asyncio.gather(first, *pair)  # batches: [1], [2, 3]: the last had 2 requests
        await steps()
        members.finish()
        busy = submit(4.0)  # straight through again
        await steps()
        alone = submit(5.0)  # queued behind the busy slot
        await steps()
        members.finish()  # the slot frees; then three more requests arrive, one by one
        await steps()
        members.finish()  # without the fill, 5.0 went out alone: it ends too
        await steps()
        later = []
        for v in (6.0, 7.0, 8.0):
            later.append(submit(v))
            await steps()
        for _ in range(3):
            members.finish()
            await steps()
        placements = await asyncio.gather(busy, alone, *later)
        members.finish()
        await batcher.close()
        return members.batches, placements

    batches, placements = asyncio.run(go())
    # with the fill, 5.0 waits for 6.0, 7.0 and 8.0 (twice the last batch: 4 requests);
    # without, 5.0 leaves alone, 6.0 finds the combiner idle, and 7.0 and 8.0 queue behind it
    assert batches == ([1, 2, 1, 4] if fill else [1, 2, 1, 1, 1, 2])
    for v, placement in zip((4.0, 5.0, 6.0, 7.0, 8.0), placements, strict=True):
        np.testing.assert_allclose(answer(placement), [[v * 10] * 2])


def test_a_full_batch_goes_out_beside_the_busy_one_but_no_further():
    async def go():
        members = Members()
        batcher = Batcher(members.start, max_rows=2, max_in_flight=1)

        def submit(values):
            return asyncio.create_task(batcher.submit(rows(values), ("y",), None))

        tasks = [submit([1.0, 2.0])]  # full, and the combiner is idle: straight through
        await steps()
        tasks.append(submit([3.0, 4.0]))  # full: waiting cannot grow it, so it goes out too
        await steps()
        tasks += [submit([5.0]), submit([6.0, 7.0])]  # one not full, one full: both wait
        await steps()
        out_while_busy = list(members.batches)
        for _ in range(3):
            members.finish()
            await steps()
        placements = await asyncio.gather(*tasks)
        members.finish()
        await batcher.close()
        return out_while_busy, members.batches, placements

    out_while_busy, batches, placements = asyncio.run(go())
    assert out_while_busy == [2, 2]
    assert batches == [2, 2, 1, 2]
    for values, placement in zip(
        ([1.0, 2.0], [3.0, 4.0], [5.0], [6.0, 7.0]), placements, strict=True
    ):
        np.testing.assert_allclose(answer(placement), [[v * 10] * 2 for v in values])


def test_closing_refuses_what_is_still_queued():
    async def go():
        members = Members()
        batcher = Batcher(members.start, max_rows=64, max_in_flight=1)
        busy = asyncio.create_task(batcher.submit(rows([0.0]), ("y",), None))
        await steps()
        queued = asyncio.create_task(batcher.submit(rows([1.0]), ("y",), None))
        await steps()
        await batcher.close()
        await busy
        return await asyncio.gather(queued, return_exceptions=True)

    (refused,) = asyncio.run(go())
    assert isinstance(refused, RequestError) and refused.code == grpc.StatusCode.UNAVAILABLE
