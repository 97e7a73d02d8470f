"""What the SDK reads from an answer's parameters: the missing members and why (the
server's ``chorus_missing``: ``name (reason); name (reason)``)."""

from __future__ import annotations

import numpy as np

from combiner.sdk import Answer
from combiner.sdk.protocol import format_missing, parse_missing


def test_no_missing_member_is_an_empty_tuple():
    assert parse_missing("") == {}
    answer = Answer({"y": np.zeros((1, 3))}, ("a",))
    assert answer.missing == () and not answer.partial


def test_the_servers_wording_is_read_member_by_member():
    said = (
        "slow (no answer within 400 ms); "
        "hung (not called: it is still running 2 earlier batches (limit 2)); "
        "m.v2 (INTERNAL: answered 'y' with shape [4]; expected [2, 3])"
    )
    assert parse_missing(said) == {
        "slow": "no answer within 400 ms",
        "hung": "not called: it is still running 2 earlier batches (limit 2)",
        "m.v2": "INTERNAL: answered 'y' with shape [4]; expected [2, 3]",
    }
    assert parse_missing("garbled") == {"garbled": ""}


def test_missing_members_read_back_as_written():
    reasons = {"a": "no answer within 400 ms", "b": "INTERNAL: x (y); z"}
    assert parse_missing(format_missing(reasons)) == reasons
