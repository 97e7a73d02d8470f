"""Inflating a request body within a limit: a bomb is refused before it grows, and every
refusal carries its HTTP status."""

from __future__ import annotations

import asyncio
import gzip
import tracemalloc
import zlib

import pytest

from combiner.endpoints.body import BodyError, inflate


def test_gzip_and_deflate_bodies_inflate_to_what_was_sent():
    data = b"0123456789" * 1000
    assert asyncio.run(inflate(gzip.compress(data), "gzip", len(data))) == data
    assert asyncio.run(inflate(zlib.compress(data), "deflate", len(data))) == data
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw_deflate = raw.compress(data) + raw.flush()  # some clients send deflate without a header
    assert asyncio.run(inflate(raw_deflate, "deflate", len(data))) == data


def test_a_gzip_bomb_is_refused_without_inflating_it():
    bomb = gzip.compress(bytes(256 << 20), compresslevel=9)  # 256 MiB of zeros in 250 KB
    tracemalloc.start()
    with pytest.raises(BodyError) as e:
        asyncio.run(inflate(bomb, "gzip", 1 << 20))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert e.value.status == 413
    assert "inflates to more): this ensemble takes at most 1048576 bytes" in str(e.value)
    assert peak < 16 << 20, peak  # a few times the limit at most, never the 256 MiB


def test_broken_or_truncated_streams_are_bad_requests():
    data = gzip.compress(b"x" * 1000)
    for body in (b"not gzip at all", data[: len(data) // 2]):
        with pytest.raises(BodyError) as e:
            asyncio.run(inflate(body, "gzip", 1 << 20))
        assert e.value.status == 400


@pytest.mark.parametrize(
    "after", [gzip.compress(b'{"more": 1}'), b"junk"], ids=["a second gzip member", "junk"]
)
def test_what_follows_the_stream_is_refused_not_dropped(after):
    body = gzip.compress(b'{"inputs": []}') + after
    with pytest.raises(BodyError, match="after its stream ends") as e:
        asyncio.run(inflate(body, "gzip", 1 << 20))
    assert e.value.status == 400
