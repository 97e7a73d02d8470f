"""``chorus calibrate`` as a user runs it (``python -m orchestrator calibrate``), on a real
tritonserver, on a case whose answer is known by reasoning alone.

Four ONNX members, each a 0/1 matrix picking its own 4 columns of the 16-column input as its
logits (so each member's answer is written into the input, exactly): ``cheap1`` columns 0-3,
``cheap2`` 4-7, ``exp1`` 8-11, ``exp2`` 12-15. The profile (by hand: no profiling runs) costs
the cheap ones 1 ms a row and the expensive ones 10 ms; the ensemble is the plain mean of the
logits (no softmax), the exit rule ``agreement``. Classes 0-3; the rows, shuffled:

* AGREE (80 rows): every member votes one class ``a`` (logit 1): the full ensemble answers
  ``a``, and so does any subset of the members, unanimously.
* SPLIT (20 rows): cheap1 votes ``p`` (logit 2), cheap2 ``q`` (logit 1), both expensive ones
  ``r`` (logit 3), p, q, r distinct: the full mean is p 2/4, q 1/4, r 6/4: ``r``. cheap1 alone
  answers ``p``; the mean of the cheap pair answers ``p`` (2/2 against 1/2), with agreement 1/2;
  cheap1, cheap2 and exp1 answer ``r`` (3/3 against 2/3 and 1/3) with agreement 1/3.

The candidates (the members sorted by cost: cheap1, cheap2, exp1, exp2; every split into
contiguous tiers; the agreement thresholds k/n of each early tier), 22 ms the full cost:

* a first tier of cheap1 alone (3 splits): one member always agrees with itself, so every row
  leaves at tier 0 with cheap1's class: wrong on every SPLIT row, fidelity 0.80.
* [[cheap1, cheap2], ...] at a threshold <= 1/2: every row leaves at tier 0 (SPLIT rows score
  1/2) with ``p``: fidelity 0.80.
* [[cheap1, cheap2], [exp1, exp2]] at 1: the AGREE rows leave at tier 0, the SPLIT rows go on
  to every member: fidelity 1, reach [1, 0.2], cost (2 + 0.2 * 20) / 22 = 6/22.
* [[cheap1, cheap2], [exp1], [exp2]] at 2/3 or 1: the SPLIT rows reach tier 1 and stay (their
  three votes p, q, r agree 1/3 with ``r``), so they reach exp2 too: fidelity 1, the same cost
  6/22, but one tier more: the documented tie-break (fewer tiers) leaves it out.
* a first tier holding exp1 costs at least 12/22.

So with the default fidelity (0.995) the one answer is [[cheap1, cheap2], [exp1, exp2]] at 1.

For the refusal, 2 of the AGREE rows are replaced by FOOLED rows: cheap1, cheap2 and exp1 vote
``s`` (logit 1), exp2 votes ``t`` (logit 5): the full mean is s 3/4, t 5/4: ``t``. Every
candidate's first tier is a subset of cheap1, cheap2, exp1 (exp2 sorts last, and a cascade has
2 tiers at least), unanimous for ``s``: every candidate answers them wrong at tier 0, so none
reaches more than 0.98 (the one above does: the SPLIT rows still go on to every member).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

CLASSES = 4
MEMBERS = ("cheap1", "cheap2", "exp1", "exp2")
COST_MS = {"cheap1": 1.0, "cheap2": 1.0, "exp1": 10.0, "exp2": 10.0}
ROWS = 100
CHOSEN = [["cheap1", "cheap2"], ["exp1", "exp2"]]
CHOSEN_COST = (2 * 1 + 0.2 * 2 * 10) / (2 * 1 + 2 * 10)  # 6/22


def picking(path: Path, first: int, width: int = CLASSES, columns: int = 4 * CLASSES) -> Path:
    """An ONNX member whose logits are its input's columns ``first .. first + width - 1``
    (x @ a 0/1 matrix: exactly those values)."""
    w = np.zeros((columns, width), np.float32)
    w[np.arange(first, first + width), np.arange(width)] = 1.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "picking",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", columns])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def one_hot(cls: int, value: float) -> np.ndarray:
    out = np.zeros(CLASSES, np.float32)
    out[cls] = value
    return out


def rows(fooled: int = 0, seed: int = 0) -> np.ndarray:
    """ROWS rows of 16 columns: 20 SPLIT rows, ``fooled`` FOOLED rows, the rest AGREE (the
    module's docstring), shuffled."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(ROWS - 20 - fooled):  # AGREE
        out.append(np.concatenate([one_hot(i % CLASSES, 1.0)] * 4))
    for _ in range(20):  # SPLIT
        p, q, r = rng.permutation(CLASSES)[:3]
        out.append(np.concatenate([one_hot(p, 2), one_hot(q, 1), one_hot(r, 3), one_hot(r, 3)]))
    for _ in range(fooled):  # FOOLED
        s, t = rng.permutation(CLASSES)[:2]
        out.append(np.concatenate([one_hot(s, 1), one_hot(s, 1), one_hot(s, 1), one_hot(t, 5)]))
    x = np.stack(out).astype(np.float32)
    return x[rng.permutation(len(x))]


def full_top(x: np.ndarray) -> np.ndarray:
    """The full ensemble's class, by numpy: the mean of the four members' logits."""
    return x.reshape(len(x), 4, CLASSES).mean(axis=1).argmax(axis=1)


def member_top(x: np.ndarray, k: int) -> np.ndarray:
    return x[:, CLASSES * k : CLASSES * (k + 1)].argmax(axis=1)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The members, an ensemble file with free tiers and one fixing them, the profile, and the
    inputs (checked here to be what the module's docstring says)."""
    root = tmp_path_factory.mktemp("calibrate")
    for k, name in enumerate(MEMBERS):
        picking(root / f"{name}.onnx", CLASSES * k)
    members = [{"name": n, "path": f"{n}.onnx"} for n in MEMBERS]
    for name, cascade in {
        "free": {"exit": "agreement"},
        "fixed": {"exit": "agreement", "tiers": CHOSEN},
    }.items():
        spec = {
            "name": "calib",
            "members": members,
            "combine": {"rule": "mean", "softmax": False, "cascade": cascade},
        }
        (root / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    curve = {"memory_bytes": 1_000_000, "memory_per_sample_bytes": 0}
    profile = {
        "members": {
            # ms per row at batch 1 and 8 alike: the cost of a row is COST_MS on any device
            n: {kind: {**curve, "latency_ms": {"1": ms, "8": 8 * ms}} for kind in ("cpu", "gpu")}
            for n, ms in COST_MS.items()
        }
    }
    (root / "profile.json").write_text(json.dumps(profile))

    good, fooling = rows(), rows(fooled=2, seed=1)
    for x, fooled in ((good, 0), (fooling, 2)):
        agree = member_top(x, 0) == member_top(x, 1)
        assert agree.sum() == ROWS - 20
        # where the cheap pair agrees, the full ensemble agrees with it, but on the FOOLED rows
        assert np.sum(member_top(x, 0)[agree] != full_top(x)[agree]) == fooled
        # where it does not, neither cheap member alone nor their mean gives the full answer
        assert np.all(member_top(x, 0)[~agree] != full_top(x)[~agree])
        assert np.all(member_top(x, 1)[~agree] != full_top(x)[~agree])
    np.save(root / "good.npy", good)
    np.save(root / "fooling.npy", fooling)
    np.save(root / "bad_shape.npy", good[:, :15])
    return root


def calibrate(case: Path, ensemble: str, inputs: str, workdir: Path, *args: str):
    argv = [
        sys.executable,
        "-m",
        "orchestrator",
        "calibrate",
        str(case / f"{ensemble}.yaml"),
        "--inputs",
        str(case / inputs),
        "--profile",
        str(case / "profile.json"),
        "--workdir",
        str(workdir),
        *args,
    ]
    # wide enough that rich wraps no line (a long path would be folded mid-word)
    env = {**os.environ, "COLUMNS": "500"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)


def table(done: subprocess.CompletedProcess[str]) -> list[list[str]]:
    """The rows of the candidates' table (stdout), as their cells."""
    lines = [line for line in done.stdout.splitlines() if line.count("\u2502") >= 6]
    return [[cell.strip() for cell in line.split("\u2502")[1:-1]] for line in lines]


def said(done: subprocess.CompletedProcess[str]) -> str:
    """Everything the command printed, on one line (rich wraps at its terminal width)."""
    return " ".join((done.stdout + done.stderr).split())


@pytest.mark.parametrize("ensemble", ["free", "fixed"])
def test_the_cheap_pair_answers_the_rows_it_agrees_on_and_the_rest_go_to_every_member(
    case, tmp_path, ensemble
):
    work = tmp_path / "work"
    done = calibrate(case, ensemble, "good.npy", work)
    text = said(done)
    assert done.returncode == 0, text
    found = json.loads((work / "calibration.json").read_text())
    assert found["tiers"] == CHOSEN
    assert found["threshold"] == pytest.approx(1.0)
    assert found["reach"] == pytest.approx([1.0, 0.2])
    assert found["fidelity"] == pytest.approx(1.0)
    assert found["cost"] == pytest.approx(CHOSEN_COST)
    assert found["members"] == list(MEMBERS)
    assert found["exit"] == "agreement"
    assert found["output"] == "y"
    assert found["rows"] == ROWS
    assert found["target"] == pytest.approx(0.995)
    assert found["accuracy"] is None and found["best_fidelity"] is None
    assert (
        f"chosen: cheap1, cheap2 -> exp1, exp2 at agreement >= 1: 80.0% of the rows answered by "
        f"the first tier, fidelity 100.00%, cost {CHOSEN_COST:.1%} of the full ensemble's; "
        f"wrote {work / 'calibration.json'}"
    ) in text
    # the cheaper candidates shown, which the fidelity rules out
    beaten = (
        ["", "cheap1 -> cheap2, exp1, exp2", "1", "100.0% / 0.0%", "80.00%", f"{1 / 22:.1%}"]
        if ensemble == "free"
        else ["", "cheap1, cheap2 -> exp1, exp2", "0.5", "100.0% / 0.0%", "80.00%", f"{2 / 22:.1%}"]
    )
    chosen = ["chosen", "cheap1, cheap2 -> exp1, exp2", "1", "80.0% / 20.0%", "100.00%"]
    assert table(done) == [beaten, [*chosen, f"{CHOSEN_COST:.1%}"]], done.stdout
    # free tiers: the 7 splits at 1, 2, 3, 2, 3, 4 and 4 thresholds; fixed: theirs at 1/2 and 1
    assert f"{19 if ensemble == 'free' else 2} simulated" in text


def test_no_cascade_meets_a_fidelity_none_reaches_and_the_full_ensemble_is_kept(case, tmp_path):
    out = tmp_path / "out" / "calibration.json"
    done = calibrate(
        case, "free", "fooling.npy", tmp_path / "work", "--fidelity", "0.999", "-o", str(out)
    )
    text = said(done)
    assert done.returncode == 1, text
    assert "no cascade reaches the fidelity 0.999: the best reaches 98.00%" in text
    assert f"wrote {out} with tiers null" in text
    assert "chosen:" not in text
    found = json.loads(out.read_text())
    assert found["tiers"] is None and found["threshold"] is None
    assert found["reach"] == [1.0]
    assert found["cost"] == 1.0 and found["fidelity"] == 1.0
    assert found["best_fidelity"] == pytest.approx(0.98)
    assert found["target"] == pytest.approx(0.999)
    assert not (tmp_path / "work" / "calibration.json").exists()


def test_inputs_of_the_wrong_shape_are_named_and_nothing_starts_or_is_written(case, tmp_path):
    out = tmp_path / "out.json"
    done = calibrate(case, "free", "bad_shape.npy", tmp_path / "work", "-o", str(out))
    text = said(done)
    assert done.returncode == 2, text
    assert "error:" in text and "bad_shape.npy" in text
    assert "holds shape [100, 15]" in text and "takes rows of shape [16]" in text
    assert "Traceback" not in text
    assert not out.exists()
    assert not (tmp_path / "work").exists()  # no Triton was started there
