"""What each answer served, kept in Redis so that /feedback can be checked against it.

Feedback must not be steerable by the client that sends it (issue 23): a replayed id must
count once, an ad the answer did not serve not at all, and the predicted score that the
calibration gate sums must be the one that was served, whatever the client says. The signed
id binds the rollout, the arm, the issue time and a hash of the served ad ids
(`ctr.api.request_id`); the ad ids and scores themselves are kept here, one hash field per
answer, under the record key only the signed id names, in a hash per minute of issue time
that expires a minute plus `ttl_s` (CTR_FEEDBACK_MAX_AGE_S) after its last write:

    <prefix>served:<minute>  field <nonce>.<ads hash>  =  "\\n" a1 "\\n" a2 ... "\\n" NUL float32 scores

Why Redis and not the id: scores signed into the id grow it with the ads (2 bytes each is
270 characters for 100 ads, 2.7 kB for 1,000, in every response and log line), and an ad
check needs the ad ids too. Why one hash per minute and not a key per answer: one HSET
carries a whole batch, where a pipeline of SETs cost the gateway 2.5 to 5 times the CPU per
record (redis-py packs each command; measured 21 against 50 µs a record in batches of 16,
8 against 39 in batches of 64, on a loaded 2-core machine). Why not a field per ad: packing
100 fields costs more than one string.

The request path never waits on Redis: `remember` packs the record (7 µs for 100 ads) and
appends it to a buffer; a background task writes the buffer in one round trip, lingering
`linger_s` (50 ms) so that the answers of that time share it: a round trip costs the gateway
about 100-150 µs of CPU (redis-py) and a record about 10 µs more, so a round trip per answer
would add half again to a request's CPU in the gateway; at 50 ms the round trips cost about
0.3 % of a core whatever the traffic, and each answer its ~10 µs. A feedback can arrive
before its record is written only from another process within that linger: it gets a 503 to
send again (`FeedbackDesk`).

`claim` (one Lua script, atomic) finds the record, checks the ad, and marks (id, ad) counted
with SET NX and the id's remaining lifetime as expiry, so each pair counts once among every
process sharing the Redis; it returns the served score. Records buffered when Redis is down
are kept (up to `max_pending`, oldest dropped first, `ctr_feedback_records_dropped_total`)
and written when it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ctr import metrics

log = logging.getLogger(__name__)
STORE_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)

BUCKET_S = 60  # one hash of records per minute of issue time

# KEYS: the minute's hash, the (id, ad) mark; ARGV: the record's field, the ad id, the mark's
# expiry (ms). {0}: no record (expired, lost, or never written); {1}: the ad was not served;
# {2}: counted before; {3, score}: counted now, with the 4 bytes of the served score.
_CLAIM = """
local rec = redis.call('HGET', KEYS[1], ARGV[1])
if not rec then return {0} end
local head = string.find(rec, '\\0', 1, true)
local at = string.find(rec, '\\n' .. ARGV[2] .. '\\n', 1, true)
if not at or not head or at > head then return {1} end
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[3]) then return {2} end
local index = 0
for _ in string.gmatch(string.sub(rec, 1, at), '\\n') do index = index + 1 end
return {3, string.sub(rec, head + 4 * index - 3, head + 4 * index)}
"""

Outcome = Literal["counted", "unknown", "not_served", "duplicate"]


@dataclass(frozen=True, slots=True)
class Claim:
    outcome: Outcome
    score: float | None = None  # the served score, when counted


def pack(ad_ids: Sequence[str], scores: Sequence[float]) -> bytes:
    """One answer's record: the ad ids between newlines (ids hold no control characters), a NUL,
    then each score as a little-endian float32."""
    head = ("\n" + "\n".join(ad_ids) + "\n\0").encode()
    return head + struct.pack(f"<{len(scores)}f", *scores)


class ServedLog:
    """The records of served answers in Redis (see the module docstring)."""

    def __init__(
        self,
        client: aioredis.Redis,
        ttl_s: float,
        prefix: str = "ctr:canary:",
        linger_s: float = 0.05,
        max_pending: int = 50_000,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.r = client
        self.ttl_ms = int(ttl_s * 1000)
        self.prefix = prefix
        self.linger_s = linger_s
        self.max_pending = max_pending
        self._pending: list[tuple[int, str, bytes]] = []  # (minute, record key, record)
        self._wake = asyncio.Event()
        self._claim: Any = None  # the Lua script, registered on first use
        self._task: asyncio.Task[None] | None = None

    def bucket(self, issued_at: float) -> str:
        return f"{self.prefix}served:{int(issued_at // BUCKET_S)}"

    # ---- hot path ----------------------------------------------------------------------
    def remember(self, key: str, ad_ids: Sequence[str], scores: Sequence[float], issued_at: float) -> None:
        """Keep what an answer issued at `issued_at` served under `key` (written by the background task)."""
        self._pending.append((int(issued_at // BUCKET_S), key, pack(ad_ids, scores)))
        if len(self._pending) > self.max_pending:
            drop = len(self._pending) - self.max_pending
            del self._pending[:drop]
            metrics.FEEDBACK_RECORDS_DROPPED.inc(drop)
        self._wake.set()

    # ---- background ----------------------------------------------------------------------
    async def flush(self) -> None:
        """Write every buffered record in one round trip, an HSET per minute (kept for the next try on failure)."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        minutes: dict[int, dict[str, bytes]] = {}
        for minute, key, rec in batch:
            minutes.setdefault(minute, {})[key] = rec
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                for minute, records in minutes.items():
                    name = f"{self.prefix}served:{minute}"
                    pipe.hset(name, mapping=records)  # type: ignore[arg-type]
                    pipe.pexpire(name, BUCKET_S * 1000 + self.ttl_ms)  # from now: no clock is compared
                await pipe.execute()
        except STORE_ERRORS:
            self._pending[:0] = batch[-self.max_pending :]
            raise

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.linger_s)  # let concurrent answers join this round trip
            try:
                await self.flush()
            except STORE_ERRORS as exc:
                log.warning("served records not written (kept, %d buffered): %s", len(self._pending), exc)
                await asyncio.sleep(0.5)
                self._wake.set()

    def start(self) -> None:
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.run(self._stop))

    async def close(self) -> None:
        if self._task is not None:
            self._stop.set()
            self._wake.set()
            await asyncio.wait({self._task}, timeout=2)
        with contextlib.suppress(*STORE_ERRORS):
            await self.flush()

    # ---- feedback --------------------------------------------------------------------------
    async def claim(self, key: str, issued_at: float, ad_id: str, ttl_s: float | None = None) -> Claim:
        """Count (record `key` of an answer issued at `issued_at`, `ad_id`) once: the served score,
        or why not. Raises STORE_ERRORS."""
        if self._pending:  # this process's own answers not written yet
            await self.flush()
        ttl_ms = self.ttl_ms if ttl_s is None else max(1, int(ttl_s * 1000))
        mark = f"{self.prefix}counted:{key}:{ad_id}"
        if self._claim is None:
            self._claim = self.r.register_script(_CLAIM)
        out = await self._claim(keys=[self.bucket(issued_at), mark], args=[key, ad_id, ttl_ms])
        code = int(out[0])
        if code == 3:
            return Claim("counted", struct.unpack("<f", out[1])[0])
        return Claim(("unknown", "not_served", "duplicate")[code])
