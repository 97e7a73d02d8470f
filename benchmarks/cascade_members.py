"""Members for the cascade benchmark: two cheap DNNs and two that cost over ten times as much a
sample, trained in seconds on real data.

A cascade pays when its first tier is much cheaper than the rest and agrees with it on most
rows. scikit-learn's digits (8x8, shipped with it: no download) are upscaled to 32x32
(bilinear, with torch) so that a convolution has pixels to work on: two small MLPs (different
widths and seeds) are the cheap tier, two CNNs the expensive one. Seeded split: train (60%),
validation (20%, for ``chorus calibrate``) and held-out test (20%, for the benchmark's
fidelity and accuracy).

    python -m benchmarks.cascade_members [OUT_DIR]

writes ``OUT_DIR/models/*.onnx``, ``OUT_DIR/ensemble.yaml`` (with the cascade section:
cheap tier first; the confidence exit, its threshold left to ``chorus calibrate``: with two
members, agreement has one useful threshold, and where both MLPs agree they are still wrong
together on about one held-out row in a hundred) and the validation and held-out rows as
``.npy``, then prints each member's accuracy on the held-out rows, the full ensemble's, and
each member's cost per sample measured with onnxruntime on the CPU at batch 16 (one thread, as
the bundled Triton runs a member).
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "CHEAP",
    "COST_BATCH",
    "EXPENSIVE",
    "SIZE",
    "Built",
    "Split",
    "build",
    "cost_per_sample_ms",
    "load_split",
    "logits",
    "main",
]

SIZE = 32  # the digits' side after upscaling
CHEAP = ("small_a", "small_b")
EXPENSIVE = ("big_a", "big_b")
COST_BATCH = 16


@dataclass(frozen=True)
class Split:
    """Rows ``(n, 1, SIZE, SIZE)`` float32 in [0, 1]; labels ``(n,)`` int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_split(seed: int = 0, size: int = SIZE) -> Split:
    """The digits, scaled to [0, 1], upscaled to ``size`` x ``size``, split 60 / 20 / 20
    (stratified, seeded)."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    small = torch.from_numpy((digits.images / 16.0).astype(np.float32)[:, None, :, :])
    upscaled = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear")
    x = upscaled.clamp(0.0, 1.0).numpy()
    y = digits.target.astype(np.int64)
    x_tr, x_rest, y_tr, y_rest = train_test_split(
        x, y, test_size=0.4, random_state=seed, stratify=y
    )
    x_val, x_te, y_val, y_te = train_test_split(
        x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest
    )
    return Split(x_tr, y_tr, x_val, y_val, x_te, y_te)


def _mlp(hidden: int) -> Callable[[], object]:
    def build() -> object:
        import torch.nn as nn

        return nn.Sequential(
            nn.Flatten(), nn.Linear(SIZE * SIZE, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    return build


def _cnn(first: int, second: int) -> Callable[[], object]:
    """Three convolutions, the second and third at full and half resolution: wide enough that
    one sample costs about half a millisecond on a CPU core, hundreds of times an MLP's."""

    def build() -> object:
        import torch.nn as nn

        return nn.Sequential(
            nn.Conv2d(1, first, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(first, second, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(second, 2 * second, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * second * (SIZE // 4) ** 2, 10),
        )

    return build


@dataclass(frozen=True)
class Recipe:
    name: str
    build: Callable[[], object]
    seed: int
    epochs: int
    shift: int  # each batch moved by up to this many pixels: where a digit sits matters less


RECIPES = (
    Recipe("small_a", _mlp(64), seed=4, epochs=30, shift=2),
    Recipe("small_b", _mlp(96), seed=5, epochs=30, shift=2),
    Recipe("big_a", _cnn(48, 96), seed=2, epochs=10, shift=3),
    Recipe("big_b", _cnn(64, 96), seed=3, epochs=10, shift=3),
)


def _train(recipe: Recipe, split: Split) -> object:
    import torch

    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    x = torch.from_numpy(split.x_train)
    y = torch.from_numpy(split.y_train)
    model = recipe.build()
    assert isinstance(model, torch.nn.Module)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = recipe.epochs * -(-len(y) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(recipe.epochs):
        order = torch.from_numpy(rng.permutation(len(y)))
        for start in range(0, len(y), 64):
            batch = order[start : start + 64]
            rows = x[batch]
            if recipe.shift:
                dx, dy = (int(d) for d in rng.integers(-recipe.shift, recipe.shift + 1, 2))
                rows = torch.roll(rows, (dx, dy), (2, 3))
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(rows), y[batch], label_smoothing=0.1)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return model


def _export(model: object, path: Path) -> None:
    import torch

    assert isinstance(model, torch.nn.Module)
    with warnings.catch_warnings():  # the exporter of orchestrator/examples/digits, on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(2, 1, SIZE, SIZE),),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )


def _session(path: Path) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # as the bundled Triton runs each member
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    """The member's answer to ``x``, through onnxruntime (what Triton serves)."""
    session = _session(path)
    return np.asarray(session.run(None, {"image": x})[0])  # type: ignore[attr-defined]


def cost_per_sample_ms(path: Path, x: np.ndarray, batch: int = COST_BATCH) -> float:
    """Milliseconds of one sample at ``batch``: the median of repeated timed calls (after a
    warm-up), divided by the batch."""
    session = _session(path)
    feed = {"image": np.ascontiguousarray(x[:batch])}
    for _ in range(20):
        session.run(None, feed)  # type: ignore[attr-defined]
    times: list[float] = []
    deadline = time.perf_counter() + 0.5
    while len(times) < 50 or time.perf_counter() < deadline:
        start = time.perf_counter()
        session.run(None, feed)  # type: ignore[attr-defined]
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000.0 / batch


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return np.asarray(e / e.sum(-1, keepdims=True))


ENSEMBLE_YAML = """\
# Written by benchmarks/cascade_members.py: two cheap MLPs, then two CNNs costing over ten
# times as much a sample, on scikit-learn's digits upscaled to {size}x{size}.
name: cascade_digits
members:
{members}outputs:
  - {{name: probabilities, dtype: FP32, shape: [10]}}
combine:
  rule: mean
  softmax: true
  cascade:
    tiers: [[{cheap}], [{expensive}]]
    exit: confidence
serving:
  max_batch_size: 64
"""


@dataclass(frozen=True)
class Built:
    """What :func:`build` wrote and measured."""

    ensemble: Path  # ensemble.yaml, with the cascade section
    val_inputs: Path
    val_labels: Path
    test_inputs: Path
    test_labels: Path
    accuracy: dict[str, float]  # per member, and "ensemble": the full ensemble's, held out
    cost_ms: dict[str, float]  # per member: one sample's cost at batch 16
    train_s: float  # seconds spent training (all members)

    @property
    def cost_ratio(self) -> float:
        """The cheapest expensive member's cost over the dearest cheap member's."""
        return min(self.cost_ms[m] for m in EXPENSIVE) / max(self.cost_ms[m] for m in CHEAP)


def build(out: Path | str, seed: int = 0) -> Built:
    """Train the four members, export them and write the ensemble and the rows into ``out``
    (``seed``: the split's; each member has its own)."""
    import torch

    out = Path(out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))  # the same sums on a bigger host
    split = load_split(seed)
    paths: dict[str, Path] = {}
    start = time.perf_counter()
    for recipe in RECIPES:
        model = _train(recipe, split)
        paths[recipe.name] = out / "models" / f"{recipe.name}.onnx"
        _export(model, paths[recipe.name])
    train_s = time.perf_counter() - start
    members = "".join(f"  - {{name: {m}, path: models/{m}.onnx}}\n" for m in paths)
    ensemble = out / "ensemble.yaml"
    ensemble.write_text(
        ENSEMBLE_YAML.format(
            size=SIZE, members=members, cheap=", ".join(CHEAP), expensive=", ".join(EXPENSIVE)
        )
    )
    files = {
        "val_inputs": (out / "val_inputs.npy", split.x_val),
        "val_labels": (out / "val_labels.npy", split.y_val),
        "test_inputs": (out / "test_inputs.npy", split.x_test),
        "test_labels": (out / "test_labels.npy", split.y_test),
    }
    for path, array in files.values():
        np.save(path, array)

    answers = {m: _softmax(logits(p, split.x_test)) for m, p in paths.items()}
    full = np.mean(list(answers.values()), axis=0).argmax(-1)
    accuracy = {m: float(np.mean(p.argmax(-1) == split.y_test)) for m, p in answers.items()}
    accuracy["ensemble"] = float(np.mean(full == split.y_test))
    return Built(
        ensemble,
        val_inputs=files["val_inputs"][0],
        val_labels=files["val_labels"][0],
        test_inputs=files["test_inputs"][0],
        test_labels=files["test_labels"][0],
        accuracy=accuracy,
        cost_ms={m: cost_per_sample_ms(p, split.x_test) for m, p in paths.items()},
        train_s=train_s,
    )


def main(argv: list[str] | None = None) -> Built:
    """Build into the folder given (else a new temporary one) and print what was measured."""
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else Path(tempfile.mkdtemp(prefix="chorus-cascade-members-"))
    built = build(out)
    print(f"wrote {built.ensemble} and the rows beside it; training took {built.train_s:.1f} s")
    for name, acc in built.accuracy.items():
        cost = f", {built.cost_ms[name] * 1000:.1f} us a sample" if name in built.cost_ms else ""
        print(f"  {name}: held-out accuracy {acc:.2%}{cost}")
    print(
        f"cost per sample at batch {COST_BATCH} (onnxruntime, 1 thread), cheapest expensive "
        f"over dearest cheap member: {built.cost_ratio:.1f}x"
        + ("" if built.cost_ratio >= 10 else "  [below the 10x this benchmark needs]")
    )
    return built


if __name__ == "__main__":
    main()
