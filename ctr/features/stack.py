"""The feature stack a process runs, built from the settings: L1 -> L2 -> L3, the lookup and
the writer, opened and closed together."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ctr.features import schema
from ctr.features.coherence import Coherence
from ctr.features.redis_tier import CLUSTER_SCHEME, RedisTier, connect
from ctr.features.sql import SqliteStore, sqlite_path
from ctr.features.store import FeatureLookup, FeatureSource, TieredStore
from ctr.features.tiers import MemoryTier
from ctr.features.writes import STREAM_TIMEOUT_S, FeatureWriter
from ctr.resilience.breaker import Breakers
from ctr.settings import Settings

WRITE_TIMEOUT_S = 1.0  # a write's L2 updates and announcements (the read path's budget is 50 ms)


def open_origin(database_url: str) -> FeatureSource:
    """L3 from a `sqlite:///…` or `postgresql://…` URL."""
    if database_url.startswith(("postgresql://", "postgres://")):
        from ctr.features.postgres import PostgresStore

        return PostgresStore(database_url)
    return SqliteStore(sqlite_path(database_url))


@dataclass(frozen=True, slots=True)
class FeatureStack:
    store: TieredStore
    lookup: FeatureLookup
    writer: FeatureWriter
    schema: schema.FeatureSchema
    coherence: Coherence

    async def start(self) -> None:
        """Listen for other processes' writes (before warming), start the repair loop."""
        await self.coherence.start()
        await self.writer.start()


def _listener(url: str) -> Callable[[], Redis] | None:
    """Makes the client a process listens for feature writes with: a plain Redis (for a
    cluster, its first node: PUBLISH reaches every node); None without Redis."""
    if not url:
        return None
    plain = "redis://" + url[len(CLUSTER_SCHEME) :].split(",")[0] if url.startswith(CLUSTER_SCHEME) else url
    # No retries of its own: redis-py would reconnect and subscribe again inside get_message,
    # and the messages published meanwhile would be missed without the listener knowing.
    return lambda: Redis.from_url(plain, socket_connect_timeout=0.5, socket_timeout=5.0, retry=Retry(NoBackoff(), 0))


def features(settings: Settings, shared: bool = False, breakers: Breakers | None = None) -> FeatureStack:
    """L1 (in-process) -> L2 (Redis, when CTR_REDIS_URL is set) -> L3 (CTR_DATABASE_URL).

    `shared`: this process is one of several serving the same features (a gateway or
    FeatureService worker): its L1 listens for the others' writes (ctr/features/coherence.py)
    once `start`ed, and is capped to CTR_L1_UNSYNCED_TTL_S until it hears them. A one-off
    command (`ctr features put`, a benchmark) only announces its writes. The L2 and L3
    breakers are made by `breakers` (the gateway's registry, which the status page lists)."""
    breakers = breakers or Breakers(settings)
    fs = schema.DEFAULT.configured(settings.ttl_s, settings.feature_versions)
    redis = connect(settings.redis_url) if settings.redis_url else None
    store = TieredStore(
        MemoryTier(settings.l1_max_entries, max_bytes=settings.l1_max_bytes),
        open_origin(settings.resolved_database_url),
        RedisTier(redis) if redis is not None else None,
        negative_ttl_s=settings.negative_ttl_s,
        l2_timeout_s=settings.l2_timeout_ms / 1000.0,
        l3_timeout_s=settings.l3_timeout_ms / 1000.0,
        l2_breaker=breakers.make("l2"),
        l3_breaker=breakers.make("l3"),
    )
    # Writes (L2 updates, announcements) on a client of their own, with a writer's timeout.
    write_redis = connect(settings.redis_url, WRITE_TIMEOUT_S) if settings.redis_url else None
    coherence = Coherence(
        store, write_redis, _listener(settings.redis_url) if shared else None, ping_s=settings.l1_sync_ping_s,
        stale_s=settings.l1_sync_stale_s, unsynced_ttl_s=settings.l1_unsynced_ttl_s,
        l2_probation_s=settings.l2_probation_s,
    )  # fmt: skip
    if not shared:
        store.l1_ttl_cap_s = None  # nothing else serves from this process's L1
    # Write-behind needs a stream on a plain Redis (a cluster would need one stream per slot),
    # on its own client: L2's 50 ms socket timeout would cut the writer's blocking read.
    stream_url = settings.stream_redis_url or (settings.redis_url if isinstance(redis, Redis) else "")
    stream = connect(stream_url, STREAM_TIMEOUT_S) if stream_url else None
    writer = FeatureWriter(store, dict(settings.write_modes), stream, fs, coherence,  # type: ignore[arg-type]
                           l2=RedisTier(write_redis) if write_redis is not None else None)  # fmt: skip
    return FeatureStack(store, FeatureLookup(store, fs=fs), writer, fs, coherence)


@asynccontextmanager
async def opened(settings: Settings) -> AsyncIterator[FeatureStack]:
    """The feature stack for a command: opened, then closed however the block ends."""
    stack = features(settings)
    try:
        await stack.writer.start()
        yield stack
    finally:
        await close(stack)


async def close(stack: FeatureStack) -> None:
    await stack.coherence.close()
    await stack.writer.close()
    await stack.store.drain()
    await stack.store.origin.close()
    if stack.store.l2 is not None:
        await stack.store.l2.close()
    if stack.writer.redis is not None:
        await stack.writer.redis.aclose()
    if stack.writer.l2 is not None and stack.writer.l2 is not stack.store.l2:
        await stack.writer.l2.close()
