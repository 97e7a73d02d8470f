"""A cascade served by a real tritonserver: tier 0 is the toy's two linear ONNX members, tier 1 a
Python-backend member whose answer is a known function of the input (or one that sleeps). Each
row's answer is checked against onnxruntime and numpy, computed here: rows where tier 0 meets
the exit rule combine exactly tier 0's members, the others every member; ``chorus_tier`` says
which; ``cascade: false`` gets every member for every row; a deadline inside tier 1 answers
with tier 0."""

from __future__ import annotations

import asyncio
import urllib.request
from contextlib import ExitStack

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from combiner.sdk import AsyncEnsembleClient, EnsembleClient
from orchestrator.deploying.launch import free_port
from tests.integration.test_serving import softmax
from tests.integration.test_workers import metric
from tests.integration.toy import combiner, sleeping, toy_config, toy_triton

# tier 1's member: logits 2 * x[:, :3], a function the test computes itself
DOUBLED = (
    "responses.append(pb_utils.InferenceResponse([pb_utils.Tensor('y', "
    "(2.0 * x[:, :3]).astype(np.float32))]))"
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    odd = {"doubled": (DOUBLED, 1), "slow": (sleeping(1.5), 1)}
    metrics_port = free_port()
    with toy_triton(root, odd) as (ensemble, triton), ExitStack() as stack:

        def start(name: str, members: list[str], *args: str, **cascade) -> str:
            fields = {"deadline_ms": cascade.pop("deadline_ms", None)}
            fields.update(cascade.pop("serving", {}))
            config = toy_config(
                triton,
                root,
                members,
                cascade={"tiers": [["a", "b"], members[2:]], "output": "y", **cascade},
                **fields,
            )
            return stack.enter_context(combiner(root, name, config, *args))[1]

        urls = {
            "agreement": start(
                "agreement",
                ["a", "b", "doubled"],
                "--metrics-port",
                str(metrics_port),
                exit="agreement",
                threshold=1.0,
                serving={"shared_memory": True},  # tier 1's rows written into a region again
            ),
            "confidence": start(
                "confidence", ["a", "b", "doubled"], exit="confidence", threshold=0.6
            ),
            "deadline": start(
                "deadline", ["a", "b", "slow"], exit="agreement", threshold=1.0, deadline_ms=400
            ),
            "plain": stack.enter_context(
                combiner(root, "plain", toy_config(triton, root, ["a", "b"]))
            )[1],
        }
        urls["metrics"] = f"http://127.0.0.1:{metrics_port}/metrics"
        yield ensemble, urls


def member_probabilities(ensemble, x: np.ndarray) -> dict[str, np.ndarray]:
    """Each member's softmax, computed here: onnxruntime on the ONNX files, numpy for the
    Python member."""
    out = {
        m.name: softmax(ort.InferenceSession(str(m.path)).run(None, {"x": x})[0])
        for m in ensemble.members
    }
    out["doubled"] = softmax(2.0 * x[:, :3])
    return out


def rows(seed: int, n: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def test_rows_that_agree_are_answered_by_tier_0_alone_and_the_others_by_every_member(stack):
    ensemble, urls = stack
    x = rows(0)
    p = member_probabilities(ensemble, x)
    agree = p["a"].argmax(axis=1) == p["b"].argmax(axis=1)
    assert 0 < agree.sum() < len(x)  # the batch splits between the tiers
    with EnsembleClient(urls["agreement"]) as client:
        answer = client.infer(x)
    expected = np.where(agree[:, None], (p["a"] + p["b"]) / 2, (p["a"] + p["b"] + p["doubled"]) / 3)
    np.testing.assert_allclose(answer.outputs["y"], expected, rtol=1e-5, atol=1e-7)
    assert answer.tiers == tuple(np.where(agree, 0, 1).tolist())
    assert answer.contributors == ("a", "b", "doubled")
    assert not answer.partial


def test_the_metrics_count_the_rows_each_tier_answered(stack):
    ensemble, urls = stack
    x = rows(9)
    p = member_probabilities(ensemble, x)
    agree = int((p["a"].argmax(axis=1) == p["b"].argmax(axis=1)).sum())

    def counted() -> tuple[float, float]:
        text = urllib.request.urlopen(urls["metrics"], timeout=5).read().decode()
        return tuple(  # type: ignore[return-value]
            metric(text, "chorus_cascade_rows_total", tier=t) if f'tier="{t}"' in text else 0.0
            for t in "01"
        )

    before = counted()
    with EnsembleClient(urls["agreement"]) as client:
        client.infer(x)
    after = counted()
    assert (after[0] - before[0], after[1] - before[1]) == (agree, len(x) - agree)


def test_the_confidence_exit_reads_the_combination_of_tier_0(stack):
    ensemble, urls = stack
    x = rows(1)
    p = member_probabilities(ensemble, x)
    sure = ((p["a"] + p["b"]) / 2).max(axis=1) >= 0.6
    assert 0 < sure.sum() < len(x)
    with EnsembleClient(urls["confidence"]) as client:
        answer = client.infer(x)
    expected = np.where(sure[:, None], (p["a"] + p["b"]) / 2, (p["a"] + p["b"] + p["doubled"]) / 3)
    np.testing.assert_allclose(answer.outputs["y"], expected, rtol=1e-5, atol=1e-7)
    assert answer.tiers == tuple(np.where(sure, 0, 1).tolist())


def test_a_request_whose_rows_all_agree_names_only_tier_0(stack):
    ensemble, urls = stack
    x = rows(2, 64)
    p = member_probabilities(ensemble, x)
    x = x[p["a"].argmax(axis=1) == p["b"].argmax(axis=1)][:5]
    with EnsembleClient(urls["agreement"]) as client:
        answer = client.infer(x)
    assert answer.contributors == ("a", "b")
    assert answer.tiers == (0,) * len(x)
    assert not answer.partial  # the members no row reached are not missing


def test_cascade_false_gets_every_member_for_every_row(stack):
    ensemble, urls = stack
    x = rows(3)
    p = member_probabilities(ensemble, x)
    with EnsembleClient(urls["agreement"]) as client:
        answer = client.infer(x, cascade=False)
    np.testing.assert_allclose(
        answer.outputs["y"], (p["a"] + p["b"] + p["doubled"]) / 3, rtol=1e-5, atol=1e-7
    )
    assert answer.tiers == (1,) * len(x)
    assert answer.contributors == ("a", "b", "doubled")
    with EnsembleClient(urls["agreement"]) as client:
        everything = client.predict_all(np.concatenate([x, x]), chunk=5, cascade=False)
        with pytest.raises(TypeError, match="cascade must be True or False"):
            client.infer(x, cascade="false")  # type: ignore[arg-type]
    full = (p["a"] + p["b"] + p["doubled"]) / 3
    np.testing.assert_allclose(everything, np.concatenate([full, full]), rtol=1e-5, atol=1e-7)


def test_concurrent_single_rows_batched_together_each_get_their_own_tier(stack):
    """Requests of one row, many at once: they share batches, and each is answered by the
    tier its row exits at (a row leaving at tier 0 does not wait for tier 1)."""
    ensemble, urls = stack
    x = rows(4, 48)
    p = member_probabilities(ensemble, x)
    agree = p["a"].argmax(axis=1) == p["b"].argmax(axis=1)

    async def run():
        async with AsyncEnsembleClient(urls["agreement"]) as client:
            return await asyncio.gather(*(client.infer(x[i : i + 1]) for i in range(len(x))))

    answers = asyncio.run(run())
    for i, answer in enumerate(answers):
        full = (p["a"][i] + p["b"][i] + p["doubled"][i]) / 3
        expected = (p["a"][i] + p["b"][i]) / 2 if agree[i] else full
        np.testing.assert_allclose(answer.outputs["y"][0], expected, rtol=1e-5, atol=1e-7)
        assert answer.tiers == ((0,) if agree[i] else (1,))
        assert answer.contributors == (("a", "b") if agree[i] else ("a", "b", "doubled"))


def test_a_deadline_inside_tier_1_answers_those_rows_with_tier_0(stack):
    ensemble, urls = stack
    x = rows(5)
    p = member_probabilities(ensemble, x)
    agree = p["a"].argmax(axis=1) == p["b"].argmax(axis=1)
    assert 0 < agree.sum() < len(x)
    with EnsembleClient(urls["deadline"]) as client:
        answer = client.infer(x)
    np.testing.assert_allclose(answer.outputs["y"], (p["a"] + p["b"]) / 2, rtol=1e-5, atol=1e-7)
    assert answer.tiers == (0,) * len(x)
    assert answer.contributors == ("a", "b")
    assert answer.missing == ("slow",)
    assert answer.reasons["slow"] == "no answer within 400 ms"


def test_rows_that_exit_at_tier_0_do_not_wait_for_the_slow_tier(stack):
    """Requests of one row, those that agree and those that do not, sent together (they share
    batches): every one that agrees is answered before any that waits for tier 1's slow member
    (1.5 s), and with no member missing."""
    ensemble, urls = stack
    x = rows(6, 64)
    p = member_probabilities(ensemble, x)
    agree = p["a"].argmax(axis=1) == p["b"].argmax(axis=1)
    mixed = np.concatenate([x[agree][:6], x[~agree][:6]])
    order: list[int] = []

    async def one(client, i):
        answer = await client.infer(mixed[i : i + 1], deadline_ms=10_000)
        order.append(i)
        return answer

    async def run():
        async with AsyncEnsembleClient(urls["deadline"]) as client:
            return await asyncio.gather(*(one(client, i) for i in range(len(mixed))))

    answers = asyncio.run(run())
    assert sorted(order[:6]) == list(range(6))  # the agreeing ones came back first
    assert all(a.tiers == (0,) and not a.partial for a in answers[:6])
    late = [(a.tiers, a.contributors, a.partial) for a in answers[6:]]
    assert all(t[:2] == ((1,), ("a", "b", "slow")) for t in late), late


def test_a_later_tier_whose_queue_cannot_answer_in_time_leaves_the_rows_to_tier_0(stack):
    """Tier 1's slow member (1.5 s a batch) busy with two batches without a deadline: a request
    with a 400 ms deadline, whose rows go on to tier 1, is not queued there (it would not be
    answered in time) and gets tier 0's answer at once, naming the member and why, not an
    error for missing the quorum over every member."""
    ensemble, urls = stack
    x = rows(10, 64)
    p = member_probabilities(ensemble, x)
    hard = x[p["a"].argmax(axis=1) != p["b"].argmax(axis=1)]
    assert len(hard) >= 4

    async def run():
        async with AsyncEnsembleClient(urls["deadline"]) as client:
            await client.infer(hard[:1], deadline_ms=10_000)  # the lane learns 1.5 s a batch
            busy = [
                asyncio.create_task(client.infer(hard[i : i + 1], deadline_ms=10_000))
                for i in (1, 2)
            ]
            await asyncio.sleep(0.3)  # both on the slow member now
            answer = await client.infer(hard[3:4])  # the ensemble's 400 ms
            await asyncio.gather(*busy)
            return answer

    answer = asyncio.run(run())
    assert answer.tiers == (0,)
    assert answer.contributors == ("a", "b")
    assert answer.missing == ("slow",)
    assert "would not answer by the deadline" in answer.reasons["slow"]
    expected = (p["a"] + p["b"])[p["a"].argmax(axis=1) != p["b"].argmax(axis=1)][3] / 2
    np.testing.assert_allclose(answer.outputs["y"][0], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("value", ["maybe", 3])
def test_a_bad_cascade_parameter_is_refused(stack, value):
    _, urls = stack
    with grpcclient.InferenceServerClient(urls["agreement"]) as client:
        inp = grpcclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 4), np.float32))
        with pytest.raises(Exception, match="parameter 'cascade' must be true or false"):
            client.infer("toy", [inp], parameters={"cascade": value})
    with EnsembleClient(urls["agreement"]) as client:  # and the endpoint goes on serving
        assert client.infer(rows(7, 2)).tiers is not None


def test_an_ensemble_without_a_cascade_answers_no_tiers_and_ignores_cascade_false(stack):
    ensemble, urls = stack
    x = rows(8, 3)
    p = member_probabilities(ensemble, x)
    with EnsembleClient(urls["plain"]) as client:
        answer = client.infer(x, cascade=False)
    assert answer.tiers is None
    np.testing.assert_allclose(answer.outputs["y"], (p["a"] + p["b"]) / 2, rtol=1e-5, atol=1e-7)
