"""Feature writes, in one of two modes per group, and the durable write-behind writer.

- write-through: L3 first (committed), then the caches (L2, and this process's L1);
- write-behind: the caches first, then the rows are appended to a Redis Stream; a writer
  in a consumer group commits them to L3 and acknowledges each entry only after the
  commit, so a writer killed with SIGKILL mid-stream loses nothing: its unacknowledged
  entries stay pending and the next writer (same name, or another after
  `claim_idle_s`) commits them. Upserts are idempotent, so a replay is harmless.

Other processes' L1 copies of an updated entity stay until their TTL (seconds to
hours by group); L2 is updated at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Literal

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from ctr import metrics
from ctr.features import schema
from ctr.features.schema import FeatureGroup
from ctr.features.store import FeatureSource, TieredStore
from ctr.features.tiers import feature_key, l1_key

log = logging.getLogger(__name__)
Mode = Literal["through", "behind"]
STREAM = "ctr:feature-writes"
GROUP = "ctr-writers"
BLOCK_MS = 200  # the writer's blocking read; the stream's client must time out later
STREAM_TIMEOUT_S = 2.0
# The kind each value of a group must have, in field order.
_KINDS: dict[str, tuple[type, ...]] = {
    "user_static": (int, str, int, int),
    "user_behavioral": (int, int),
    "ad_meta": (int, int, str),
    "ad_stats": (int, int),
}


def validate_rows(
    group_name: Any, rows: Any, fs: schema.FeatureSchema = schema.DEFAULT
) -> tuple[FeatureGroup, list[tuple[str, list[Any]]]]:
    """Check a write against the schema; ValueError with the exact problem otherwise."""
    group = fs.group(group_name)
    if group is None:
        raise ValueError(f"unknown feature group {group_name!r}; one of {[g.name for g in fs.groups]}")
    if not isinstance(rows, list) or not rows:
        raise ValueError("rows must be a non-empty list of {id, values}")
    kinds = _KINDS[group.name]
    out = []
    for n, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not 0 < len(row["id"]) <= 128:
            raise ValueError(f"rows[{n}]: want {{'id': <1-128 chars>, 'values': [...]}}")
        values = row.get("values")
        if not isinstance(values, list) or len(values) != len(kinds):
            raise ValueError(f"rows[{n}].values: want {len(kinds)} values {list(group.fields)}")
        for f, v, k in zip(group.fields, values, kinds, strict=True):
            if type(v) is not k or (k is int and v < 0):
                raise ValueError(f"rows[{n}].values.{f}: want a {'non-negative int' if k is int else 'string'}")
        out.append((row["id"], values))
    return group, out


class FeatureWriter:
    def __init__(
        self,
        store: TieredStore,
        modes: dict[str, Mode],
        redis: Redis | None = None,
        fs: schema.FeatureSchema = schema.DEFAULT,
    ) -> None:
        self.store = store
        self.modes = modes
        self.redis = redis
        self.schema = fs

    def mode(self, group: FeatureGroup) -> Mode:
        mode = self.modes.get(group.name, "through")
        return "behind" if mode == "behind" and self.redis is not None else "through"

    async def put(self, group: FeatureGroup, rows: Sequence[tuple[str, Sequence[Any]]]) -> Mode:
        """Write rows of one group in the group's mode; returns the mode used."""
        mode = self.mode(group)
        items = [(eid, tuple(v)) for eid, v in rows]
        if mode == "through":
            await self.store.origin.put_many(group, rows)
            await self._cache(group, items)
        else:
            assert self.redis is not None
            await self._cache(group, items)
            await self.redis.xadd(STREAM, {"group": group.name, "rows": orjson.dumps([[e, list(v)] for e, v in rows])})
        metrics.FEATURE_WRITES.labels(group.name, mode).inc(len(items))
        return mode

    async def _cache(self, group: FeatureGroup, items: list[tuple[str, tuple[Any, ...]]]) -> None:
        if self.store.l2 is not None:
            await self.store.l2.set_many([(feature_key(group, e), v, group.ttl_s) for e, v in items])
        self.store.l1.set_many_now([(l1_key(group, e), v, group.ttl_s) for e, v in items])


async def ensure_group(redis: Redis) -> None:
    try:
        await redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def _commit(
    redis: Redis, origin: FeatureSource, entries: list[tuple[bytes, dict[bytes, bytes]]], fs: schema.FeatureSchema
) -> int:
    """Commit a batch of stream entries (one upsert per group, in stream order, so the last
    write of an entity wins), then acknowledge and drop them all: only after the commit."""
    rows: dict[str, dict[str, Any]] = {}
    for _, data in entries:
        rows.setdefault(data[b"group"].decode(), {}).update(orjson.loads(data[b"rows"]))
    n = 0
    for name, by_id in rows.items():
        group = fs.group(name)
        assert group is not None
        n += await origin.put_many(group, list(by_id.items()))
    ids = [entry_id for entry_id, _ in entries]
    await redis.pipeline(transaction=True).xack(STREAM, GROUP, *ids).xdel(STREAM, *ids).execute()
    return n


async def run_writer(
    redis: Redis,
    origin: FeatureSource,
    consumer: str,
    stop: asyncio.Event,
    batch: int = 100,
    block_ms: int = BLOCK_MS,
    claim_idle_s: float = 30.0,
    fs: schema.FeatureSchema = schema.DEFAULT,
) -> int:
    """Commit write-behind entries to L3 until `stop` is set; returns rows committed."""
    await ensure_group(redis)
    total = 0
    while True:  # first our own pending entries (a previous run of this consumer died)
        resp = await redis.xreadgroup(GROUP, consumer, {STREAM: "0"}, count=batch)
        entries = resp[0][1] if resp else []
        if not entries:
            break
        total += await _commit(redis, origin, entries, fs)
    while not stop.is_set():
        _, claimed, _ = await redis.xautoclaim(STREAM, GROUP, consumer, int(claim_idle_s * 1000), count=batch)
        if claimed:
            total += await _commit(redis, origin, claimed, fs)
        resp = await redis.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=batch, block=block_ms)
        if resp:
            total += await _commit(redis, origin, resp[0][1], fs)
    return total
