"""The words a client and the endpoint must spell alike, in one home: the session header, the
request's and the answer's parameters, the names of a client's shared-memory regions.

Standard library only, so the endpoint may import it too without the SDK's dependencies.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = [
    "CASCADE",
    "CLIENT_PREFIX",
    "CONTRIBUTORS",
    "DEADLINE_MS",
    "MISSING",
    "SESSION_HEADER",
    "TIER",
    "UNKNOWN_REGION",
    "format_missing",
    "parse_missing",
]

SESSION_HEADER = "chorus-shm-session"
"""gRPC metadata / HTTP header: the secret that names the session a client's regions belong to."""

CLIENT_PREFIX = "chorus_client_"
"""Every client shared-memory region's name (and key, after ``/``) starts with this."""

UNKNOWN_REGION = "unknown shared-memory region"
"""How a FAILED_PRECONDITION message says the endpoint does not know a region of the caller's."""

DEADLINE_MS = "deadline_ms"
"""Request parameter: answer within this many milliseconds, with the members that made it."""

CASCADE = "cascade"
"""Request parameter: ``false`` asks an ensemble with a cascade for every member's answer."""

CONTRIBUTORS = "chorus_contributors"
"""Answer parameter: the members that contributed, comma-separated, in the ensemble's order
(with a cascade: to any row of the request)."""

TIER = "chorus_tier"
"""Answer parameter, with a cascade: per row of the request, comma-separated, the tier (from 0)
that answered it: the row's answer combines the contributors in tiers 0 to that one."""

MISSING = "chorus_missing"
"""Answer parameter: each member that did not, with why: ``name (reason); name (reason)``."""

_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}"  # a member's name (orchestrator.planning.spec)
# where one entry of MISSING ends and the next begins (a reason may hold "; " or parentheses)
_BETWEEN = re.compile(rf"(?<=\)); (?={_NAME} \()")
_ENTRY = re.compile(rf"({_NAME}) \((.*)\)", re.DOTALL)


def format_missing(reasons: Mapping[str, str]) -> str:
    """The MISSING parameter for ``reasons`` (member name -> why it did not contribute)."""
    return "; ".join(f"{name} ({reason})" for name, reason in reasons.items())


def parse_missing(text: str) -> dict[str, str]:
    """Member name -> reason, from a MISSING parameter (an entry that does not read as
    ``name (reason)`` is kept whole, as a name with no reason)."""
    reasons: dict[str, str] = {}
    for entry in _BETWEEN.split(text) if text else []:
        match = _ENTRY.fullmatch(entry)
        name, reason = match.groups() if match else (entry, "")
        reasons[name] = reason
    return reasons
