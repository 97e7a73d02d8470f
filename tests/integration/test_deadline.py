"""Deadline and quorum against real Python-backend members: one sleeps past the deadline, one
raises. A partial answer names its contributors; below the quorum, DEADLINE_EXCEEDED; the server
keeps serving and never mixes a late answer into another request."""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import onnxruntime as ort
import pytest

from combiner.sdk import DeadlineExceeded, EnsembleClient
from tests.integration.test_serving import softmax
from tests.integration.toy import BROKEN, combiner, sleeping, toy_config, toy_triton


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("deadline")
    names = ["a", "b", "slow", "broken"]
    with (
        toy_triton(root, {"slow": (sleeping(1.5), 1), "broken": (BROKEN, 1)}) as (
            ensemble,
            triton,
        ),
        ExitStack() as stack,
    ):
        combiners = {
            quorum: stack.enter_context(
                combiner(
                    root,
                    f"combiner-{quorum}",
                    toy_config(triton, root, names, deadline_ms=400, quorum=quorum),
                )
            )
            for quorum in (2, 3)
        }
        yield ensemble, combiners


def reference(ensemble, x, members=("a", "b")):
    outs = [
        softmax(ort.InferenceSession(str(m.path)).run(None, {"x": x})[0])
        for m in ensemble.members
        if m.name in members
    ]
    return np.mean(outs, axis=0)


def test_a_partial_answer_names_its_contributors_and_why_others_are_missing(stack):
    ensemble, combiners = stack
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    with EnsembleClient(combiners[2][1]) as client:
        answer = client.infer(x)
    assert answer.contributors == ("a", "b")  # answered at its deadline, before 'slow' did
    assert answer.partial
    assert set(answer.missing) == {"slow", "broken"}
    assert answer.reasons["slow"] == "no answer within 400 ms"
    assert answer.reasons["broken"].startswith("INTERNAL: ")  # its text is in the combiner's log
    assert "broken on purpose" not in answer.reasons["broken"]
    np.testing.assert_allclose(answer.outputs["y"], reference(ensemble, x), rtol=1e-5)


def test_below_quorum_the_request_gets_deadline_exceeded_naming_the_missing(stack):
    _, combiners = stack
    with EnsembleClient(combiners[3][1]) as client, pytest.raises(DeadlineExceeded) as e:
        client.infer(np.zeros((1, 4), dtype=np.float32))
    assert "2 of 4 members answered, below the quorum of 3" in str(e.value)
    assert "slow (no answer" in str(e.value)


def test_a_longer_per_request_deadline_lets_the_slow_member_in(stack):
    ensemble, combiners = stack
    x = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
    with EnsembleClient(combiners[3][1]) as client:
        answer = client.infer(x, deadline_ms=5000)
    assert answer.contributors == ("a", "b", "slow")
    assert answer.missing == ("broken",)
    slow = softmax(np.full((2, 3), 99.0))
    expected = (2 * reference(ensemble, x) + slow) / 3
    np.testing.assert_allclose(answer.outputs["y"], expected, rtol=1e-5)


def test_late_answers_never_reach_later_requests_and_serving_goes_on(stack):
    ensemble, combiners = stack
    with EnsembleClient(combiners[2][1]) as client:
        for seed in range(4):  # the slow member's answers to earlier requests arrive meanwhile
            x = np.random.default_rng(10 + seed).normal(size=(seed + 1, 4)).astype(np.float32)
            answer = client.infer(x)
            assert answer.contributors == ("a", "b")
            np.testing.assert_allclose(answer.outputs["y"], reference(ensemble, x), rtol=1e-5)


def test_a_bad_deadline_parameter_is_refused(stack):
    _, combiners = stack
    from combiner.sdk import InvalidRequest

    with EnsembleClient(combiners[2][1]) as client, pytest.raises(InvalidRequest, match="positive"):
        client.infer(np.zeros((1, 4), dtype=np.float32), deadline_ms=-5)
