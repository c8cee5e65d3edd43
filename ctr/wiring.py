"""Builds the parts each service runs from the settings and a stored model."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from ctr import schema
from ctr.breaker import CircuitBreaker
from ctr.coalesce import Coalescer, ModelCall
from ctr.features.redis_tier import RedisTier, connect
from ctr.features.sql import SqliteStore, sqlite_path
from ctr.features.store import FeatureLookup, FeatureSource, TieredStore
from ctr.features.tiers import MemoryTier
from ctr.features.writes import STREAM_TIMEOUT_S, FeatureWriter
from ctr.gateway import (
    MODEL_ERRORS,
    FeatureProvider,
    Gateway,
    RemoteFallback,
    guarded,
    local_features,
    remote_features,
    retried,
)
from ctr.modelstore import ModelArtifacts
from ctr.retry import Retrier, RetryBudget
from ctr.settings import Settings
from ctr.transform import Transformer


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


def breaker(settings: Settings, name: str) -> CircuitBreaker:
    """A breaker with the reference semantics and the configured ε, T, minimum calls, cooldown."""
    return CircuitBreaker(
        name,
        failure_ratio=settings.breaker_failure_ratio,
        window_s=settings.breaker_window_s,
        min_calls=settings.breaker_min_calls,
        cooldown_s=settings.breaker_cooldown_s,
        trial_timeout_s=max(0.05, 2 * settings.deadline_ms / 1000.0),
    )


def features(settings: Settings) -> FeatureStack:
    """L1 (in-process) -> L2 (Redis, when CTR_REDIS_URL is set) -> L3 (CTR_DATABASE_URL)."""
    schema.configure(settings.ttl_s, settings.feature_versions)
    redis = connect(settings.redis_url) if settings.redis_url else None
    store = TieredStore(
        MemoryTier(settings.l1_max_entries, max_bytes=settings.l1_max_bytes),
        open_origin(settings.resolved_database_url),
        RedisTier(redis) if redis is not None else None,
        negative_ttl_s=settings.negative_ttl_s,
        l2_timeout_s=settings.l2_timeout_ms / 1000.0,
        l3_timeout_s=settings.l3_timeout_ms / 1000.0,
        l2_breaker=breaker(settings, "l2"),
        l3_breaker=breaker(settings, "l3"),
    )
    # Write-behind needs a stream on a plain Redis (a cluster would need one stream per slot),
    # on its own client: L2's 50 ms socket timeout would cut the writer's blocking read.
    stream = connect(settings.redis_url, STREAM_TIMEOUT_S) if isinstance(redis, Redis) else None
    return FeatureStack(store, FeatureLookup(store), FeatureWriter(store, dict(settings.write_modes), stream))


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


def gateway(
    settings: Settings,
    art: ModelArtifacts,
    model_call: ModelCall,
    stack: FeatureStack,
    features_call: Callable[..., Awaitable[Any]] | None = None,
    fallback_call: RemoteFallback | None = None,
) -> Gateway:
    """The gateway core. Features come from this process, or from FeatureService through
    `features_call` with CTR_FEATURES_REMOTE; fallback scores from the in-process table, or
    from FallbackService through `fallback_call` with CTR_FALLBACK_REMOTE. Every remote call
    is guarded by its breaker and a timeout; the model call's timeout is the deadline."""
    transformer = Transformer(art.spec)
    provider: FeatureProvider = local_features(stack.lookup, transformer)
    if settings.features_remote and features_call is not None:
        provider = remote_features(features_call, breaker(settings, "features"), transformer)
    remote_fallback = None
    if settings.fallback_remote and fallback_call is not None:
        remote_fallback = guarded(fallback_call, breaker(settings, "fallback"), settings.fallback_timeout_ms / 1000.0)
    deadline_s = settings.deadline_ms / 1000.0
    retrier = Retrier("model", MODEL_ERRORS, RetryBudget("model", settings.retry_budget_ratio), settings.retry_attempts)
    coalescer = Coalescer(
        retried(guarded(model_call, breaker(settings, "model"), deadline_s), retrier, deadline_s),
        max_inflight=settings.batch_max_inflight,
        max_rows=settings.batch_max_rows,
        window_s=settings.batch_window_ms / 1000.0,
    )
    return Gateway(provider, coalescer, art.segments, art.tag, deadline_s, remote_fallback)


async def warm_model(call: ModelCall, width: int, deadline_s: float, timeout_s: float = 180.0) -> int:
    """Call the model until it answers 20 bursts in a row within the deadline; returns calls made.

    Right after start-up CTRModel is slow (torch's first passes, BentoML's batcher training
    its latency model on the first requests): measured, without this the first seconds of
    traffic timed out, opened the model breaker and were answered by the fallback.
    The gateway's /readyz stays 503 until this is done.
    """
    import asyncio
    import time

    import numpy as np

    x = np.zeros((100, width), dtype=np.int64)
    end, streak, calls = time.monotonic() + timeout_s, 0, 0
    while streak < 20 and time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(2.0):
                await asyncio.gather(*(call(x) for _ in range(4)))
            streak = streak + 1 if time.perf_counter() - t0 < deadline_s else 0
        except (*MODEL_ERRORS, AttributeError):  # AttributeError: BentoML's client not set up yet
            streak = 0
            await asyncio.sleep(0.2)
        calls += 4
    return calls


def settle_gc() -> None:
    """Move start-up objects out of the collector's sight and collect less often.

    The L1 cache and the model hold ~10^5 long-lived objects; full collections over them
    stalled requests for tens of ms (measured: p99 at 16 concurrent requests 230 ms
    before, 53 ms after).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
