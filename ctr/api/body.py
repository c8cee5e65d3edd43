"""Request bodies, bounded: every route reads its body through `read_body`.

A body over the limit (CTR_MAX_BODY_BYTES) is refused with a 413 as soon as it is known to
be too large: from its Content-Length before reading, or while streaming it when there is
none. The rest of the body is then read and discarded (up to DRAIN_MAX_BYTES and
DRAIN_TIMEOUT_S) before the answer goes out, as nginx's lingering close does: clients such
as Python's urllib and requests send the whole body before they read anything, and a
server that closes a socket with unread data in it makes the kernel answer with a reset,
so they saw "connection reset" instead of the 413. A body larger than the drain bound still
gets its 413 with `Connection: close` (such a client may then see the reset: bounded work
for the server comes first).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.requests import Request

from ctr.api.contract import BadRequest

DEFAULT_MAX_BODY_BYTES = 1_048_576
DRAIN_MAX_BYTES = 32 * 1_048_576  # read and discarded at most, past the limit
DRAIN_TIMEOUT_S = 5.0  # a client trickling its body holds the handler this long at most


class BodyTooLarge(BadRequest):
    """A 413 whose answer closes the connection (the rest of the body is not read)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes (CTR_MAX_BODY_BYTES)")


async def drain(chunks: AsyncIterator[bytes], declared: int | None) -> int:
    """Read and discard what is left of a body, within DRAIN_MAX_BYTES and DRAIN_TIMEOUT_S;
    the bytes read. Nothing is read when the declared length is already past the bound."""
    if declared is not None and declared > DRAIN_MAX_BYTES:
        return 0
    drained = 0
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            async for chunk in chunks:
                drained += len(chunk)
                if drained > DRAIN_MAX_BYTES:
                    break
    except TimeoutError:
        pass
    return drained


async def read_body(request: Request, limit: int = DEFAULT_MAX_BODY_BYTES) -> bytes:
    """The body, at most `limit` bytes (CTR_MAX_BODY_BYTES); past it, BodyTooLarge once the rest is drained."""
    header = request.headers.get("content-length")
    declared = None
    if header is not None:
        if not header.isdigit():
            raise BadRequest(400, "Content-Length is not a number")
        declared = int(header)
    chunks = request.stream()
    if declared is not None and declared > limit:
        await drain(chunks, declared)
        raise BodyTooLarge(limit)
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            await drain(chunks, None)
            raise BodyTooLarge(limit)
        parts.append(chunk)
    return b"".join(parts)
