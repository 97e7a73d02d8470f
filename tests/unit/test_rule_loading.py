"""A user rule is loaded from its file beside the ensemble file, and nothing else in that
folder becomes importable: a ``json.py`` or ``numpy.py`` there shadows nothing that the
combiner, or anything after it, imports."""

from __future__ import annotations

import importlib.machinery
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from combiner.stages.rules import load_rule

RULE = """
import json
import numpy as np

def trimmed(stacked, weights):
    return np.sort(stacked, axis=0)[1:-1].mean(axis=0)
"""


@pytest.fixture(autouse=True)
def _own_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """What a loader puts on sys.path or in sys.modules stays in this test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    modules = dict(sys.modules)
    yield
    for name in set(sys.modules) - set(modules):
        del sys.modules[name]
    sys.modules.update(modules)


def _rule_folder(folder: Path, module: str = "my_rules") -> Path:
    (folder / f"{module}.py").write_text(RULE)
    for shadow in ("json", "numpy", "tabnanny"):
        (folder / f"{shadow}.py").write_text("raise ImportError('the rule folder shadowed me')\n")
    return folder


def test_files_beside_a_rule_shadow_no_module_imported_after_it(tmp_path):
    folder = _rule_folder(tmp_path)
    rule = load_rule("my_rules:trimmed", [str(folder)])
    stacked = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_allclose(rule(stacked, np.ones(4)), [4.5, 5.5, 6.5])
    assert str(folder) not in sys.path
    for name in ("json", "numpy", "tabnanny"):  # found on sys.path, as the next import would
        spec = importlib.machinery.PathFinder.find_spec(name)
        assert spec is not None and spec.origin is not None
        assert Path(spec.origin).parent != folder, name
    import tabnanny  # not imported before: the real one

    assert Path(tabnanny.__file__).parent != folder
    assert sys.modules["json"] is json


def test_a_rule_module_named_like_a_standard_one_replaces_it_for_no_one(tmp_path):
    (tmp_path / "statistics.py").write_text(RULE)
    import statistics

    rule = load_rule("statistics:trimmed", [str(tmp_path)])
    assert rule.__module__ != "statistics"
    assert sys.modules["statistics"] is statistics and hasattr(statistics, "median")


def test_a_rule_package_beside_the_ensemble_file_imports_its_own_modules(tmp_path):
    package = tmp_path / "my_pack"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text(RULE)
    (package / "rules.py").write_text("from .helpers import trimmed\n")
    rule = load_rule("my_pack.rules:trimmed", [str(tmp_path)])
    stacked = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_allclose(rule(stacked, np.ones(4)), [4.5, 5.5, 6.5])
    assert str(tmp_path) not in sys.path


def test_a_rule_not_beside_the_ensemble_file_is_imported_as_usual(tmp_path):
    assert load_rule("numpy:median", [str(tmp_path)]) is np.median
    with pytest.raises(ValueError, match="cannot import module 'no_such_rules_xyz'"):
        load_rule("no_such_rules_xyz:f", [str(tmp_path)])
