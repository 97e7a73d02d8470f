"""Train the digits ensemble: four small, different DNNs on scikit-learn's digits, exported to ONNX.

Members differ in architecture, seed and data: an MLP, a bagged deeper MLP (trained on a
bootstrap sample), a small two-layer CNN and a wide one-layer CNN (whose output tensor is named
``scores``, to show the ensemble mapping differing names). Everything runs on the CPU in seconds
and needs no download: the data set ships with scikit-learn.

    python -m orchestrator.examples.digits.train [OUT_DIR]
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["MEMBERS", "Split", "load_split", "train_members", "write_example"]

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray  # (n, 1, 8, 8) float32 in [0, 1]
    y_train: np.ndarray  # (n,) int64
    x_test: np.ndarray
    y_test: np.ndarray


def load_split(seed: int = 0) -> Split:
    """The digits data set, scaled to [0, 1], with a quarter held out."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return Split(x_tr, y_tr, x_te, y_te)


def _mlp(hidden: tuple[int, ...]) -> Callable[[], object]:
    def build() -> object:
        import torch.nn as nn

        layers: list[nn.Module] = [nn.Flatten()]
        width = 64
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 10))
        return nn.Sequential(*layers)

    return build


def _small_cnn() -> object:
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )


def _wide_cnn() -> object:
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 96, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(96 * 16, 10),
    )


@dataclass(frozen=True)
class MemberRecipe:
    name: str
    build: Callable[[], object]
    seed: int
    bootstrap: bool
    output: str = "logits"


MEMBERS = (
    MemberRecipe("mlp", _mlp((128,)), seed=0, bootstrap=False),
    MemberRecipe("mlp_bagged", _mlp((256, 128)), seed=1, bootstrap=True),
    MemberRecipe("cnn", _small_cnn, seed=2, bootstrap=False),
    MemberRecipe("wide_cnn", _wide_cnn, seed=3, bootstrap=True, output="scores"),
)


def train_members(
    out_dir: Path | str = HERE / "models", split: Split | None = None, epochs: int = 20
) -> dict[str, Path]:
    """Train every member and export it to ``OUT_DIR/<name>.onnx``; returns the paths."""
    import torch

    split = split or load_split()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for recipe in MEMBERS:
        torch.manual_seed(recipe.seed)
        rng = np.random.default_rng(recipe.seed)
        idx = np.arange(len(split.y_train))
        if recipe.bootstrap:
            idx = rng.choice(idx, size=len(idx), replace=True)
        x = torch.from_numpy(split.x_train[idx])
        y = torch.from_numpy(split.y_train[idx])
        model = recipe.build()
        assert isinstance(model, torch.nn.Module)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
        model.train()
        for _ in range(epochs):
            order = torch.from_numpy(rng.permutation(len(y)))
            for start in range(0, len(y), 64):
                batch = order[start : start + 64]
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
                optimizer.step()
        model.eval()
        path = out / f"{recipe.name}.onnx"
        torch.onnx.export(
            model,
            (torch.zeros(2, 1, 8, 8),),
            str(path),
            input_names=["image"],
            output_names=[recipe.output],
            dynamic_axes={"image": {0: "batch"}, recipe.output: {0: "batch"}},
            dynamo=False,
        )
        paths[recipe.name] = path
    return paths


def write_example(out: Path, split: Split | None = None, epochs: int = 20) -> Path:
    """Write the example into ``out``: its members trained into ``out/models``, and its
    ``ensemble.yaml``, whose path is returned."""
    import shutil

    train_members(out / "models", split, epochs=epochs)
    return Path(shutil.copy(HERE / "ensemble.yaml", out / "ensemble.yaml"))


if __name__ == "__main__":
    for name, p in train_members(sys.argv[1] if len(sys.argv) > 1 else HERE / "models").items():
        print(f"{name}: {p}")
