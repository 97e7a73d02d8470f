"""Reading the files users write or edit (ensemble and hardware YAML, profile, plan and
calibration JSON): a key given twice in one mapping is an error naming it, where both parsers
would silently keep the last (a profile merged by hand with a member twice, a second
``combine:`` that hides the first)."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BeforeValidator, StrictFloat

from orchestrator.errors import SpecError

__all__ = ["Real", "read_json", "read_yaml"]


def _yaml12_float(value: Any) -> Any:
    """A string written as YAML 1.2 (and JSON) writes a float, as that float: PyYAML, on YAML
    1.1, reads `1e9` and `.5e3` (no dot, or no digit before it) as strings."""
    if isinstance(value, str) and _FLOAT_12.fullmatch(value):
        return float(value)
    return value


_FLOAT_12 = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")

# A float field of a file: a number (not `true`), written as YAML 1.2 writes one ("memory_gb:
# 1e9", as the README writes its bound); names that look like one (`name: 1e3`) stay names
Real = Annotated[StrictFloat, BeforeValidator(_yaml12_float)]


def read_yaml(file: Path) -> Any:
    """The file's YAML."""
    stream = io.StringIO(_text(file))
    stream.name = str(file)  # where PyYAML's marks say the problem is
    try:
        return yaml.load(stream, Loader=_UniqueKeys)  # (a safe loader)
    except yaml.YAMLError as e:
        raise SpecError(file, "", f"not valid YAML: {e}") from e
    except RecursionError:
        raise SpecError(file, "", "nested too deeply to read") from None
    except ValueError as e:  # an integer of more digits than Python converts (4300)
        raise SpecError(file, "", f"not readable: {str(e).split(';')[0]}") from None


def read_json(file: Path) -> str:
    """The file's text, once it is known to be JSON with no key twice in one object (the
    caller validates it, with pydantic's JSON mode or ``json.loads``)."""
    text = _text(file)
    try:
        parsed = json.loads(text, object_pairs_hook=_Object.of)
    except json.JSONDecodeError as e:
        raise SpecError(file, "", f"not valid JSON: {e}") from None
    except RecursionError:
        raise SpecError(file, "", "nested too deeply to read") from None
    except ValueError as e:  # an integer of more digits than Python converts (4300)
        raise SpecError(file, "", f"not readable: {str(e).split(';')[0]}") from None
    twice = list(_given_twice(parsed, ""))
    if twice:
        shown = twice[:_SHOWN]
        more = f"; and {len(twice) - _SHOWN} more" if len(twice) > _SHOWN else ""
        raise SpecError(file, "", "; ".join(shown) + more)
    return text


_SHOWN = 10  # keys given twice named in the error, at most


def _text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(file, "", "no such file") from None
    except IsADirectoryError:
        raise SpecError(file, "", "a directory, not a file") from None
    except PermissionError:
        raise SpecError(file, "", "not readable (permission denied)") from None
    except OSError as e:  # not a directory on the way, a loop of links, a name too long
        raise SpecError(file, "", f"not readable ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise SpecError(file, "", f"not UTF-8 text ({e.reason} at byte {e.start})") from None


class _Object(dict[str, Any]):
    """A JSON object, and the keys it was given more than once (the last one kept)."""

    twice: tuple[str, ...] = ()

    @classmethod
    def of(cls, pairs: list[tuple[str, Any]]) -> _Object:
        made = cls(pairs)
        if len(made) < len(pairs):
            counts = Counter(k for k, _ in pairs)
            made.twice = tuple(k for k, n in counts.items() if n > 1)
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


# libyaml's parser where PyYAML has it (its wheels do): a tenth of the time of PyYAML's own
# (0.09 s, not 0.67 s, for a hardware file of 1,024 GPUs), nesting limited to 1,000 levels
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeys(_SafeLoader):  # type: ignore[misc,valid-type]
    """PyYAML's safe loader, refusing a key given twice in one mapping, and a second merge key
    (``<<``) in one, which PyYAML would drop without a word."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._checked: set[yaml.MappingNode] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # PyYAML rewrites a mapping's node when it merges it (into its own or another's):
        # checked the first time it is seen, before that, its keys are the ones written
        if node not in self._checked:
            self._checked.add(node)
            _refuse_twice(self, node)
        super().flatten_mapping(node)


def _refuse_twice(loader: Any, node: yaml.MappingNode) -> None:
    seen = set()
    merges = 0
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # '<<': merged keys may be overridden
            merges += 1
            if merges > 1:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    "'<<' is given twice in one mapping (merge several with '<<: [*a, *b]')",
                    key_node.start_mark,
                )
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
