"""Reading the files users write or edit (ensemble and hardware YAML, profile, plan and
calibration JSON): a key given twice in one mapping is an error naming it, where both parsers
would silently keep the last (a profile merged by hand with a member twice, a second
``combine:`` that hides the first)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
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
        parsed = json.loads(text, object_pairs_hook=_Object.of)
    except json.JSONDecodeError as e:
        raise SpecError(file, "", f"not valid JSON: {e}") from None
    twice = list(_given_twice(parsed, ""))
    if twice:
        raise SpecError(file, "", "; ".join(twice))
    return text


def _text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(file, "", "no such file") from None
    except IsADirectoryError:
        raise SpecError(file, "", "a directory, not a file") from None
    except PermissionError:
        raise SpecError(file, "", "not readable (permission denied)") from None
    except UnicodeDecodeError as e:
        raise SpecError(file, "", f"not UTF-8 text ({e.reason} at byte {e.start})") from None


class _Object(dict[str, Any]):
    """A JSON object, and the keys it was given more than once (the last one kept)."""

    twice: tuple[str, ...] = ()

    @classmethod
    def of(cls, pairs: list[tuple[str, Any]]) -> _Object:
        made = cls(pairs)
        if len(made) < len(pairs):
            keys = [k for k, _ in pairs]
            made.twice = tuple(dict.fromkeys(k for k in keys if keys.count(k) > 1))
        return made


def _given_twice(value: Any, path: str) -> Iterator[str]:
    """Where the parsed JSON has a key twice: one sentence each, naming its object's path."""
    if isinstance(value, _Object):
        where = f"in {path}" if path else "at the top level"
        for key in value.twice:
            yield f"key {key!r} is given twice {where}"
        for key, item in value.items():
            yield from _given_twice(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _given_twice(item, f"{path}[{i}]")


class _UniqueKeys(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping."""


def _mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # '<<': merged keys may be overridden
            continue
        key = loader.construct_object(key_node)
        try:
            hash(key)
        except TypeError:
            continue  # PyYAML's own check says so ("found unhashable key")
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
