"""An HTTP request body, read within a limit: the bytes on the wire, and again once inflated.

aiohttp's own decompression is turned off for the endpoint: a few kilobytes of gzip can inflate
to gigabytes. Here a body is read as it arrives and refused as soon as it passes ``limit``
(before reading the rest, when ``Content-Length`` says so), and a ``gzip`` or ``deflate`` body is
inflated piece by piece with a cap, so no more than ``limit`` bytes are ever produced. Each
refusal is a :class:`BodyError` with the HTTP status to answer (413 too large, 415 an encoding
it does not take, 400 a broken stream).
"""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import web

__all__ = ["BodyError", "inflate", "read_body"]

# zlib window bits: a gzip header, or a zlib header (HTTP "deflate"), or raw deflate
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_STEP = 1 << 20  # inflate at most this much before letting the loop run


class BodyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request's body, inflated, at most ``limit`` bytes."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", "", *_WBITS):
        raise BodyError(
            415, f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none"
        )
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit, f"Content-Length is {request.content_length}")
    raw = bytearray()
    try:
        async for chunk in request.content.iter_any():
            raw += chunk
            if len(raw) > limit:
                raise _too_large(limit, "the body is longer")
    except ConnectionResetError:  # the client went away first: its doing, not a bug (no log)
        raise BodyError(400, "the connection closed before the body ended") from None
    if encoding in ("identity", ""):
        return bytes(raw)
    return await inflate(bytes(raw), encoding, limit)


async def inflate(data: bytes, encoding: str, limit: int) -> bytes:
    """``data`` inflated (gzip or deflate), refused as soon as it passes ``limit`` bytes."""
    wbits = _WBITS[encoding]
    if encoding == "deflate" and data[:1] not in (b"\x78", b"\x08", b"\x18", b"\x28", b"\x38"):
        wbits = -zlib.MAX_WBITS  # raw deflate, as some clients send it
    inflater = zlib.decompressobj(wbits)
    out = bytearray()
    pending = data
    try:
        while True:
            out += inflater.decompress(pending, min(_STEP, limit + 1 - len(out)))
            if len(out) > limit:
                raise _too_large(limit, "the body inflates to more")
            pending = inflater.unconsumed_tail
            if not pending:
                break
            await asyncio.sleep(0)  # a long inflate lets other requests in between steps
        out += inflater.flush()
    except zlib.error as e:
        raise BodyError(400, f"the body is not valid {encoding} data ({e})") from None
    if len(out) > limit:
        raise _too_large(limit, "the body inflates to more")
    if not inflater.eof:
        raise BodyError(400, f"the {encoding} body ends before its stream does")
    if inflater.unused_data:  # (dropped, it would go unread: a second gzip member, or junk)
        raise BodyError(
            400,
            f"the {encoding} body goes on for {len(inflater.unused_data)} bytes after its "
            "stream ends; send one stream",
        )
    return bytes(out)


def _too_large(limit: int, why: str) -> BodyError:
    return BodyError(
        413, f"the request is too large ({why}): this ensemble takes at most {limit} bytes"
    )
