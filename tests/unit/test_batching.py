"""The batching stage's queueing, driven step by step: its seam is the coroutine it calls."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from combiner.batching import Batcher, Rows


def rows(values: list[float], width: int = 2) -> Rows:
    data = np.array([[v] * width for v in values], dtype=np.float32)
    return Rows.of(len(values), {"x": data.tobytes()}, {"x": data.shape})


class Members:
    """Stands for the fan-out: answers x * 10, holding each batch until released."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = asyncio.Event()

    async def run(self, batch: Rows, wanted: list[str], deadline: float | None):
        self.batches.append(batch.batch)
        await self.gate.wait()
        x = np.frombuffer(batch.data["x"], dtype=np.float32).reshape(batch.shapes["x"])
        return {"y": x * 10}, ["a"], {}


def test_requests_arriving_while_the_members_are_busy_share_one_batch():
    async def go():
        members = Members()
        batcher = Batcher(members.run, max_rows=64, max_in_flight=1)
        first = asyncio.create_task(batcher.submit(rows([1.0]), ["y"], None))
        await asyncio.sleep(0)  # the first goes straight through and holds the only slot
        others = [
            asyncio.create_task(batcher.submit(rows([float(i), i + 0.5]), ["y"], None))
            for i in range(2, 6)
        ]
        await asyncio.sleep(0.01)
        members.gate.set()
        answers = await asyncio.gather(first, *others)
        await batcher.close()
        return members.batches, answers

    batches, answers = asyncio.run(go())
    assert batches == [1, 8]  # the lone request, then the four that queued, joined
    np.testing.assert_allclose(answers[0][0]["y"], [[10.0, 10.0]])
    for i, (outputs, contributors, missing) in zip(range(2, 6), answers[1:], strict=True):
        np.testing.assert_allclose(outputs["y"], [[i * 10] * 2, [(i + 0.5) * 10] * 2])
        assert contributors == ["a"] and missing == {}


def test_incompatible_or_oversized_requests_wait_for_their_own_batch():
    async def go():
        members = Members()
        batcher = Batcher(members.run, max_rows=4, max_in_flight=1)
        tasks = [asyncio.create_task(batcher.submit(rows([0.0]), ["y"], None))]
        await asyncio.sleep(0)
        tasks += [
            asyncio.create_task(batcher.submit(rows([1.0, 2.0, 3.0]), ["y"], None)),
            asyncio.create_task(batcher.submit(rows([4.0], width=3), ["y"], None)),  # other shape
            asyncio.create_task(batcher.submit(rows([5.0, 6.0]), ["y"], None)),  # over 4 rows
            asyncio.create_task(batcher.submit(rows([7.0]), ["y"], None)),
        ]
        await asyncio.sleep(0.01)
        members.gate.set()
        answers = await asyncio.gather(*tasks)
        await batcher.close()
        return members.batches, answers

    batches, answers = asyncio.run(go())
    assert batches == [1, 4, 1, 2]  # [0]; [1,2,3]+[7]; [4] alone (width 3); [5,6]
    assert answers[2][0]["y"].shape == (1, 3)
    np.testing.assert_allclose(answers[4][0]["y"], [[70.0, 70.0]])


def test_an_error_reaches_every_request_of_the_batch():
    async def go():
        gate = asyncio.Event()

        async def failing(batch, wanted, deadline):
            await gate.wait()
            raise RuntimeError("members down")

        batcher = Batcher(failing, max_rows=64, max_in_flight=1)
        tasks = [
            asyncio.create_task(batcher.submit(rows([float(i)]), ["y"], None)) for i in range(3)
        ]
        await asyncio.sleep(0.01)
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.close()
        return results

    results = asyncio.run(go())
    assert all(isinstance(r, RuntimeError) and "members down" in str(r) for r in results)


@pytest.mark.parametrize("deadline", [None, 5.0])
def test_a_batch_gets_the_earliest_deadline_of_its_requests(deadline):
    async def go():
        seen = []
        gate = asyncio.Event()

        async def run(batch, wanted, d):
            seen.append(d)
            await gate.wait()
            return {"y": np.zeros(batch.shapes["x"], np.float32)}, ["a"], {}

        batcher = Batcher(run, max_rows=64, max_in_flight=1)
        first = asyncio.create_task(batcher.submit(rows([0.0]), ["y"], None))
        await asyncio.sleep(0)
        late = [
            asyncio.create_task(batcher.submit(rows([1.0]), ["y"], deadline)),
            asyncio.create_task(batcher.submit(rows([2.0]), ["y"], 60.0)),
        ]
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(first, *late)
        await batcher.close()
        return seen

    seen = asyncio.run(go())
    assert seen[0] is None
    assert seen[1] <= (deadline if deadline is not None else 60.0)


@pytest.mark.parametrize("fill", [True, False], ids=["fill", "no-fill"])
def test_under_load_a_freed_slot_waits_for_the_batch_to_fill_while_requests_arrive(fill):
    """With a fill time, a request queued behind a busy slot waits for the requests arriving
    after it, up to twice the last batch; without, it leaves alone when the slot frees."""

    async def go():
        members = Members()
        batcher = Batcher(
            members.run,
            max_rows=64,
            max_in_flight=1,
            max_fill_s=60.0 if fill else 0.0,
            max_gap_s=60.0,
        )

        async def submit(v):
            return await batcher.submit(rows([v]), ["y"], None)

        async def steps(n=5):
            for _ in range(n):
                await asyncio.sleep(0)

        first = asyncio.create_task(submit(1.0))  # straight through; holds the slot
        await steps()
        pair = [asyncio.create_task(submit(v)) for v in (2.0, 3.0)]
        await steps()
        members.gate.set()
        await asyncio.gather(first, *pair)  # batches: [1], [2, 3]: the last had 2 requests
        members.gate.clear()
        busy = asyncio.create_task(submit(4.0))  # straight through again
        await steps()
        alone = asyncio.create_task(submit(5.0))  # queued behind the busy slot
        await steps()
        members.gate.set()  # the slot frees; then three more requests arrive, one by one
        await steps()
        members.gate.clear()
        later = []
        for v in (6.0, 7.0, 8.0):
            later.append(asyncio.create_task(submit(v)))
            await steps()
        members.gate.set()
        answers = await asyncio.gather(busy, alone, *later)
        await batcher.close()
        return members.batches, answers

    batches, answers = asyncio.run(go())
    # with the fill, 5.0 waits for 6.0, 7.0 and 8.0 (twice the last batch: 4 requests);
    # without, 5.0 leaves alone, 6.0 finds the combiner idle, and 7.0 and 8.0 queue behind it
    assert batches == ([1, 2, 1, 4] if fill else [1, 2, 1, 1, 1, 2])
    for v, (outputs, _, _) in zip((4.0, 5.0, 6.0, 7.0, 8.0), answers, strict=True):
        np.testing.assert_allclose(outputs["y"], [[v * 10] * 2])


def test_a_full_batch_goes_out_beside_the_busy_one_but_no_further():
    async def go():
        members = Members()
        batcher = Batcher(members.run, max_rows=2, max_in_flight=1)

        async def steps(n=5):
            for _ in range(n):
                await asyncio.sleep(0)

        def submit(values):
            return asyncio.create_task(batcher.submit(rows(values), ["y"], None))

        tasks = [submit([1.0, 2.0])]  # full, and the combiner is idle: straight through
        await steps()
        tasks.append(submit([3.0, 4.0]))  # full: waiting cannot grow it, so it goes out too
        await steps()
        tasks += [submit([5.0]), submit([6.0, 7.0])]  # one not full, one full: both wait
        await steps()
        out_while_busy = list(members.batches)
        members.gate.set()
        answers = await asyncio.gather(*tasks)
        await batcher.close()
        return out_while_busy, members.batches, answers

    out_while_busy, batches, answers = asyncio.run(go())
    assert out_while_busy == [2, 2]
    assert batches == [2, 2, 1, 2]
    for values, (outputs, _, _) in zip(
        ([1.0, 2.0], [3.0, 4.0], [5.0], [6.0, 7.0]), answers, strict=True
    ):
        np.testing.assert_allclose(outputs["y"], [[v * 10] * 2 for v in values])
