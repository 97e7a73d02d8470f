"""The profile measures with the serving policy set aside: an ensemble whose deadline is shorter
than its slowest member's batch (a quorum that serves without that member) must still be
measured, so that ``chorus up`` can start it, and measured whole: partial answers are what such
an ensemble serves, but they must neither stop a measurement nor stand in for one."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from combiner.sdk import Answer, AsyncEnsembleClient
from orchestrator.deploying import render
from orchestrator.measuring import measure
from orchestrator.measuring.measure import measure_profile
from orchestrator.planning.hardware import discover
from orchestrator.planning.spec import load_ensemble
from tests.integration.toy import PYTHON_MEMBER, sleeping
from tests.onnx_models import linear

SLOW_S = 0.3  # a batch of the slow member, twice the deadline (150 ms)


def make_member_slow(monkeypatch: pytest.MonkeyPatch, name: str, seconds: float) -> None:
    """Every repository Chorus renders (the profile's, each deployment's) runs ``name`` as a
    Python-backend member that sleeps ``seconds`` a batch, instead of its ONNX file."""
    original = render.render_repository

    def rendered(ensemble, repo: Path, *args, **kwargs):  # type: ignore[no-untyped-def]
        changed = original(ensemble, repo, *args, **kwargs)
        model = repo / name / "1" / "model.py"
        if model.parent.is_dir():
            model.write_text(PYTHON_MEMBER.format(body=sleeping(seconds)))
        return changed

    monkeypatch.setattr(render, "render_repository", rendered)
    monkeypatch.setattr(measure, "render_repository", rendered)


def answers_seen(monkeypatch: pytest.MonkeyPatch) -> list[Answer]:
    """Every answer that the SDK's asyncio client (the profile's load) gets from now on."""
    seen: list[Answer] = []
    original = AsyncEnsembleClient.infer

    async def infer(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        answer = await original(self, *args, **kwargs)
        seen.append(answer)
        return answer

    monkeypatch.setattr(AsyncEnsembleClient, "infer", infer)
    return seen


def test_a_deadline_shorter_than_the_slowest_member_does_not_stop_the_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for seed, name in enumerate(("a", "b", "slow")):
        linear(tmp_path / f"{name}.onnx", seed=seed)
    spec = {
        "name": "toy",
        "members": [{"name": n, "path": f"{n}.onnx"} for n in ("a", "b", "slow")],
        "serving": {"max_batch_size": 1, "deadline_ms": 150, "quorum": 2},
    }
    (tmp_path / "ensemble.yaml").write_text(yaml.safe_dump(spec))
    ensemble = load_ensemble(tmp_path / "ensemble.yaml")
    make_member_slow(monkeypatch, "slow", SLOW_S)
    cpus = tuple(d for d in discover() if d.kind == "cpu")
    answers = answers_seen(monkeypatch)

    profile = measure_profile(
        ensemble, tmp_path / "work", cpus, seconds_per_point=0.02, show_progress=False
    )

    slow = profile.members["slow"]["cpu"]
    assert all(ms >= 1000 * SLOW_S for _, ms in slow.latency_ms)  # it really is that slow
    assert profile.host is not None and profile.host.rows == 1
    # measured through the combiner: every request answered by all three members
    contributors = {answer.contributors for answer in answers}
    assert contributors == {("a", "b", "slow")}
