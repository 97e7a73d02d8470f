"""Reading the files users write or edit (ensemble and hardware YAML, profile, plan and
calibration JSON): a key given twice in one mapping is an error naming it, where both parsers
would silently keep the last (a profile merged by hand with a member twice, a second
``combine:`` that hides the first)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import SpecError

__all__ = ["read_json", "read_yaml"]


def read_yaml(file: Path) -> Any:
    """The file's YAML."""
    stream = io.StringIO(_text(file))
    stream.name = str(file)  # where PyYAML's marks say the problem is
    try:
        return yaml.load(stream, Loader=_UniqueKeys)  # (a SafeLoader)
    except yaml.YAMLError as e:
        raise SpecError(file, "", f"not valid YAML: {e}") from e


def read_json(file: Path) -> str:
    """The file's text, once it is known to be JSON with no key twice in one object (the
    caller validates it, with pydantic's JSON mode or ``json.loads``)."""
    text = _text(file)
    try:
        json.loads(text, object_pairs_hook=_unique)
    except json.JSONDecodeError as e:
        raise SpecError(file, "", f"not valid JSON: {e}") from None
    except _Twice as e:
        raise SpecError(file, "", str(e)) from None
    return text


def _text(file: Path) -> str:
    try:
        return file.read_text()
    except FileNotFoundError:
        raise SpecError(file, "", "no such file") from None
    except IsADirectoryError:
        raise SpecError(file, "", "a directory, not a file") from None


class _Twice(ValueError):
    pass


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _Twice(f"key {key!r} is given twice in one object")
        seen[key] = value
    return seen


class _UniqueKeys(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping."""


def _mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # '<<': merged keys may be overridden
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
