"""The feature stack a process runs, built from the settings: L1 -> L2 -> L3, the lookup and
the writer, opened and closed together."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from redis.asyncio import Redis

from ctr.features import schema
from ctr.features.redis_tier import RedisTier, connect
from ctr.features.sql import SqliteStore, sqlite_path
from ctr.features.store import FeatureLookup, FeatureSource, TieredStore
from ctr.features.tiers import MemoryTier
from ctr.features.writes import STREAM_TIMEOUT_S, FeatureWriter
from ctr.resilience.breaker import CircuitBreaker
from ctr.settings import Settings


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


def features(settings: Settings) -> FeatureStack:
    """L1 (in-process) -> L2 (Redis, when CTR_REDIS_URL is set) -> L3 (CTR_DATABASE_URL)."""
    fs = schema.DEFAULT.configured(settings.ttl_s, settings.feature_versions)
    redis = connect(settings.redis_url) if settings.redis_url else None
    store = TieredStore(
        MemoryTier(settings.l1_max_entries, max_bytes=settings.l1_max_bytes),
        open_origin(settings.resolved_database_url),
        RedisTier(redis) if redis is not None else None,
        negative_ttl_s=settings.negative_ttl_s,
        l2_timeout_s=settings.l2_timeout_ms / 1000.0,
        l3_timeout_s=settings.l3_timeout_ms / 1000.0,
        l2_breaker=CircuitBreaker.from_settings(settings, "l2"),
        l3_breaker=CircuitBreaker.from_settings(settings, "l3"),
    )
    # Write-behind needs a stream on a plain Redis (a cluster would need one stream per slot),
    # on its own client: L2's 50 ms socket timeout would cut the writer's blocking read.
    stream = connect(settings.redis_url, STREAM_TIMEOUT_S) if isinstance(redis, Redis) else None
    writer = FeatureWriter(store, dict(settings.write_modes), stream, fs)
    return FeatureStack(store, FeatureLookup(store, fs=fs), writer, fs)


@asynccontextmanager
async def opened(settings: Settings) -> AsyncIterator[FeatureStack]:
    """The feature stack for a command: opened, then closed however the block ends."""
    stack = features(settings)
    try:
        yield stack
    finally:
        await close(stack)


async def close(stack: FeatureStack) -> None:
    await stack.store.drain()
    await stack.store.origin.close()
    if stack.store.l2 is not None:
        await stack.store.l2.close()
    if stack.writer.redis is not None:
        await stack.writer.redis.aclose()
