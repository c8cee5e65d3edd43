"""L2: Redis (or Redis Cluster) through redis-py's asyncio client with hiredis.

One round trip per request: a single MGET for the user's and all candidate ads' keys.
On a cluster, reads use `mget_nonatomic` (one pipelined MGET per slot); the keys carry
one of 16 hash tags (see `feature_key`), so a request's keys fall in at most 16 slots:
measured, 202 keys read in p50 0.71 ms that way against 2.55 ms spread over every slot
and 0.52 ms all in one slot (which would pin all data to one node). The cluster client
raises instead of queueing past its connection limit, so concurrency toward it is
bounded here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from ctr.features.tiers import NEGATIVE

CLUSTER_SCHEME = "redis+cluster://"


def encode(value: Any) -> bytes:
    return b"" if value == NEGATIVE else orjson.dumps(list(value))


def decode(raw: bytes | None) -> Any | None:
    if raw is None:
        return None
    return NEGATIVE if raw == b"" else tuple(orjson.loads(raw))


def connect(url: str, timeout_s: float = 0.05) -> Redis | RedisCluster:
    """A client for `redis://…` or, for a cluster, `redis+cluster://host:port` (any node).

    After a connection error a command is retried once, at once, on a fresh connection:
    a restarted Redis leaves every pooled connection stale, and without the retry the
    next commands failed. Timeouts are not retried (the caller's budget is spent)."""
    opts: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    }
    if url.startswith(CLUSTER_SCHEME):
        return RedisCluster.from_url("redis://" + url[len(CLUSTER_SCHEME) :], **opts)
    return Redis.from_url(url, **opts)


class RedisTier:
    name = "l2"

    def __init__(self, client: Redis | RedisCluster, max_concurrency: int = 32) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self._sem = asyncio.Semaphore(max_concurrency)

    async def get_many(self, keys: Sequence[str]) -> list[Any | None]:
        if not keys:
            return []
        async with self._sem:
            if self.cluster:
                raw = await self.client.mget_nonatomic(list(keys))  # type: ignore[union-attr]
            else:
                raw = await self.client.mget(list(keys))
        return [decode(r) for r in raw]

    async def set_many(self, items: Sequence[tuple[str, Any, float]]) -> None:
        items = [i for i in items if i[2] > 0]
        if not items:
            return
        async with self._sem:
            pipe = self.client.pipeline(transaction=False)
            for key, value, ttl_s in items:
                pipe.set(key, encode(value), px=max(1, int(ttl_s * 1000)))
            await pipe.execute()

    async def delete_many(self, keys: Sequence[str]) -> None:
        if keys:
            async with self._sem:
                pipe = self.client.pipeline(transaction=False)
                for k in keys:
                    pipe.delete(k)
                await pipe.execute()

    async def close(self) -> None:
        await self.client.aclose()
