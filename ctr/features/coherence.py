"""One truth for L1 across processes: every write is announced, every process listens.

Each gateway process keeps its own L1. A process that takes a write (the admin API, the
write-behind writer once it committed, `ctr features put`) publishes `(group, version, ids
with their versions)` on a Redis channel; every process subscribed to it replaces its L1
copies of those ids with tombstones of the write's version (ctr/features/tiers.py), so
its next read goes to L2/L3 and no read that was in flight can put an older copy back.

Redis pub/sub delivers at most once: a subscriber that was cut off misses messages. So a
listener that has heard nothing from Redis (not even the answer to its own ping, sent every
`ping_s`) for `stale_s` counts as cut off: it flushes L1 and, until it is subscribed again,
keeps L1 entries at most `unsynced_ttl_s`; when it is subscribed again it flushes L1 once
more, and for `l2_probation_s` reads L3 rather than L2: a Redis restarted from its
append-only file brings back entries older than the writes made while it was down. The
first listener to see Redis's new run id deletes every L2 feature entry (SCAN + UNLINK, one
process per restart), so no such entry outlives the probation, even when the process
whose announcement of a write made meanwhile is still pending (`writes.FeatureWriter.repair`) died. A
process that cannot hear at all (no Redis) runs capped for good. The bound this
gives (a write acknowledged at t is read everywhere by t + S) is stated in
docs/feature-store.md and measured by `make consistency` (ctr/bench/consistency.py).

Redis's server-assisted client-side caching (CLIENT TRACKING) would do the same per key;
redis-py 5+ implements it only for its synchronous client, and tracking every L1 key costs
Redis memory per key per process, where one channel costs nothing per key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from ctr import metrics
from ctr.features.schema import FeatureGroup
from ctr.features.store import TieredStore
from ctr.features.versions import VersionClock

log = logging.getLogger(__name__)
CHANNEL = "ctr:features:written"
RESET_KEY = "ctr:features:l2-reset"  # + Redis's run id: the one process that wipes L2 after a restart
LISTEN_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError, ValueError)


async def wipe_l2(client: Redis, batch: int = 1000) -> int:
    """Delete every L2 feature entry (keys `f:*`, ctr/features/tiers.py) of a plain Redis."""
    n, keys = 0, []
    async for key in client.scan_iter(match="f:*", count=batch):
        keys.append(key)
        if len(keys) >= batch:
            n += await client.unlink(*keys)
            keys = []
    if keys:
        n += await client.unlink(*keys)
    return n


def message(group: FeatureGroup, items: Sequence[tuple[str, int]]) -> bytes:
    """The announcement of a write: the group's name and key version, each id with its version."""
    return orjson.dumps([group.name, group.version, [[i, v] for i, v in items]])


def read_message(data: bytes) -> tuple[str, int, list[tuple[str, int]]]:
    """(group name, group version, [(id, version)]) of an announcement; ValueError if malformed."""
    try:
        name, gver, items = orjson.loads(data)
        return str(name), int(gver), [(str(i), int(v)) for i, v in items]
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed feature-write message: {exc}") from None


class Coherence:
    """This process's side of the channel: announces its writes, applies everyone's."""

    def __init__(
        self,
        store: TieredStore,
        publisher: Any | None,
        subscriber: Callable[[], Redis] | None,
        *,
        ping_s: float = 0.5,
        stale_s: float = 1.5,
        unsynced_ttl_s: float = 1.0,
        l2_probation_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        versions: VersionClock | None = None,
    ) -> None:
        """`publisher`: a Redis (or cluster) client to PUBLISH with, or None; `subscriber`: makes
        the plain Redis client to listen with (a cluster node is enough: PUBLISH reaches every
        node), or None to listen to nothing (L1 then stays capped)."""
        if not 0 < ping_s < stale_s:
            raise ValueError(f"want 0 < ping_s < stale_s, got ping_s={ping_s}, stale_s={stale_s}")
        self.store, self.publisher, self.subscriber = store, publisher, subscriber
        self.ping_s, self.stale_s, self.unsynced_ttl_s = ping_s, stale_s, unsynced_ttl_s
        self.l2_probation_s = l2_probation_s
        self.versions = versions or VersionClock()  # this process's write clock: kept above what it hears
        self.lost = 0  # times the channel was lost
        self.clock = clock
        self.listening = False
        self.flushes = 0
        self.applied = 0
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._probation_end: asyncio.TimerHandle | None = None
        self._run_id: str | None = None  # Redis's, when this process last listened
        self._unsynced()

    def _unsynced(self) -> None:
        self.listening = False
        self.store.l1_ttl_cap_s = self.unsynced_ttl_s
        metrics.L1_SYNCED.set(0)

    def _flush(self, why: str) -> None:
        if len(self.store.l1):
            log.warning("L1 flushed (%d entries): %s", len(self.store.l1), why)
        self.store.l1.clear()
        self.flushes += 1
        metrics.L1_FLUSHES.inc()

    async def publish(self, group: FeatureGroup, items: Sequence[tuple[str, int]]) -> None:
        """Announce a write (raises the client's error: the repair loop announces it later)."""
        self.apply(group.name, group.version, items)
        if self.publisher is not None and items:
            await self.publisher.publish(CHANNEL, message(group, items))

    def apply(self, name: str, group_version: int, items: Sequence[tuple[str, int]]) -> None:
        """Tombstone this process's L1 copies of the written ids."""
        self.store.l1.invalidate_now([((name, group_version, i), v) for i, v in items])
        self.applied += len(items)
        if items:
            self.versions.observe(max(v for _, v in items))

    async def start(self, wait_s: float = 2.0) -> None:
        """Start listening; wait up to `wait_s` for the subscription (start before warming L1,
        so that no write made during warming is missed)."""
        if self.subscriber is None:
            log.warning("no Redis to hear other processes' feature writes on: L1 entries live at most %.1f s",
                        self.unsynced_ttl_s)  # fmt: skip
            return
        self._task = asyncio.create_task(self._listen_forever())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), wait_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen_forever(self) -> None:
        assert self.subscriber is not None
        backoff = 0.05
        while True:
            client = self.subscriber()
            try:
                await self._listen(client)
            except Exception as exc:
                if not isinstance(exc, LISTEN_ERRORS):
                    log.exception("feature-write listener failed; restarting it")
                if self.listening:
                    log.warning("feature-write channel lost (%s: %s)", type(exc).__name__, exc)
                    self._flush("the feature-write channel was lost; writes elsewhere may be unseen")
                    self.lost += 1
                    self._distrust_l2()  # until well after it listens again: Redis may come back with old entries
                self._unsynced()
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)
            else:
                backoff = 0.05
            finally:
                with contextlib.suppress(*LISTEN_ERRORS):
                    await client.aclose()

    async def _check_restart(self, client: Redis) -> None:
        """When Redis restarted since this process last listened, the first listener to notice
        deletes L2's feature entries (some may be older than writes made while it was down)."""
        run_id = str((await client.info("server"))["run_id"])
        restarted = self._run_id is not None and run_id != self._run_id
        if restarted and await client.set(f"{RESET_KEY}:{run_id}", os.getpid(), nx=True, ex=3600):
            n = await wipe_l2(client)
            log.warning("Redis restarted (run id %s): %d L2 feature entries deleted", run_id, n)
        self._run_id = run_id

    async def _listen(self, client: Redis) -> None:
        """Subscribe, then apply messages until nothing (not even a pong) was heard for `stale_s`."""
        await self._check_restart(client)
        async with client.pubsub() as ps:
            await ps.subscribe(CHANNEL)
            heard = self.clock()
            pinged = heard
            while True:
                async with asyncio.timeout(self.stale_s):  # the client must not hang past the bound
                    msg = await ps.get_message(timeout=self.ping_s)
                now = self.clock()
                if msg is not None:
                    heard = now
                    kind = msg["type"]
                    if kind == "subscribe" and self.listening:  # subscribed again under us: a loss
                        raise ConnectionError("the feature-write channel was subscribed again")
                    if kind == "subscribe":
                        self._flush("subscribed to the feature-write channel (writes before it may be unseen)")
                        if self.lost:
                            self._probation()
                        self.listening = True
                        self.store.l1_ttl_cap_s = None
                        metrics.L1_SYNCED.set(1)
                        self._subscribed.set()
                    elif kind == "message":
                        self._on_message(msg["data"])
                if now - heard > self.stale_s:
                    raise TimeoutError(f"nothing heard from Redis for {now - heard:.1f} s")
                if now - pinged >= self.ping_s:
                    await ps.ping()
                    pinged = now

    def _distrust_l2(self) -> None:
        self.store.l2_mode = "off"
        if self._probation_end is not None:
            self._probation_end.cancel()
            self._probation_end = None

    def _probation(self) -> None:
        """Read L3 rather than L2 for `l2_probation_s` more (Redis may have come back with old entries)."""
        store = self.store
        store.l2_mode = "fill"

        def end() -> None:
            store.l2_mode = "use"

        if self._probation_end is not None:  # a new loss: the probation starts over
            self._probation_end.cancel()
        self._probation_end = asyncio.get_running_loop().call_later(self.l2_probation_s, end)

    def _on_message(self, data: bytes) -> None:
        try:
            name, gver, items = read_message(data)
        except ValueError as exc:
            log.error("%s", exc)
            return
        self.apply(name, gver, items)
