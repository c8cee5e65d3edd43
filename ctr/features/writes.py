"""Feature writes, in one of two modes per group, and the durable write-behind writer.

- write-through: L3 first (committed), then the caches (L2, and this process's L1);
- write-behind: the rows are appended to a Redis Stream first, and only once Redis took
  them (XADD answered) the caches are written, so no cache ever holds a value the stream
  lost. A writer in a consumer group commits them to L3 and acknowledges each entry only
  after the commit, so a writer killed with SIGKILL mid-stream loses nothing: its
  unacknowledged entries stay pending and the next run of it (same name) or another
  writer (after `claim_idle_s`, by XAUTOCLAIM) commits them. Upserts are idempotent, so
  a replay is harmless.

The writer is supervised (`run_writer`): a failing Redis or L3, or a consumer group that
vanished with a Redis restarted without persistence, is logged, counted
(`ctr_writer_failures`) and retried with backoff; the writer only returns when told to
stop. An entry that cannot be committed (malformed, or rows the schema refuses) is moved
to a dead-letter stream (`ctr_feature_writes_dead_lettered`) and the rest of its batch is
committed. How durable an acknowledged write is depends on Redis's persistence (README).

Other processes' L1 copies of an updated entity stay until their TTL (seconds to
hours by group); L2 is updated at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from ctr import metrics
from ctr.features import schema
from ctr.features.schema import FeatureGroup
from ctr.features.store import L3_ERRORS, FeatureSource, TieredStore
from ctr.features.tiers import feature_key, l1_key

log = logging.getLogger(__name__)
Mode = Literal["through", "behind"]
STREAM = "ctr:feature-writes"
DEAD_STREAM = "ctr:feature-writes:dead"
DEAD_MAXLEN = 100_000  # the dead-letter stream keeps about the last this many entries
GROUP = "ctr-writers"
BLOCK_MS = 200  # the writer's blocking read; the stream's client must time out later
STREAM_TIMEOUT_S = 2.0
MAX_INT = 2**53  # values stay exact in JSON and in the model's int64 input
# The kind each value of a group must have, in field order.
KINDS: dict[str, tuple[type, ...]] = {
    "user_static": (int, str, int, int),
    "user_behavioral": (int, int),
    "ad_meta": (int, int, str),
    "ad_stats": (int, int),
}
Entry = tuple[bytes, dict[bytes, bytes] | None]
# Called with the name of each step of a commit ("read": entries parsed, nothing written;
# "upserted": L3 has the rows, the entries are not yet acknowledged); a test raises from
# it to kill a consumer at that point.
StepHook = Callable[[str], None]


def validate_rows(
    group_name: Any, rows: Any, fs: schema.FeatureSchema = schema.DEFAULT
) -> tuple[FeatureGroup, list[tuple[str, list[Any]]]]:
    """Check a write against the schema; ValueError with the exact problem otherwise."""
    group = fs.group(group_name)
    if group is None:
        raise ValueError(f"unknown feature group {group_name!r}; one of {[g.name for g in fs.groups]}")
    if not isinstance(rows, list) or not rows:
        raise ValueError("rows must be a non-empty list of {id, values}")
    kinds = KINDS[group.name]
    out = []
    for n, row in enumerate(rows):
        if not isinstance(row, dict) or not schema.valid_id(row.get("id")):
            raise ValueError(f"rows[{n}]: want {{'id': <1-128 chars, no control characters>, 'values': [...]}}")
        values = row.get("values")
        if not isinstance(values, list) or len(values) != len(kinds):
            raise ValueError(f"rows[{n}].values: want {len(kinds)} values {list(group.fields)}")
        for f, v, k in zip(group.fields, values, kinds, strict=True):
            if type(v) is not k or (k is int and not 0 <= v < MAX_INT) or (k is str and not schema.valid_id(v)):
                want = "non-negative int below 2**53" if k is int else "string of 1-128 chars, no control characters"
                raise ValueError(f"rows[{n}].values.{f}: want a {want}")
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
        """Write rows of one group in the group's mode; returns the mode used. Either way
        the caches are written only once the write is safe (committed, or queued)."""
        mode = self.mode(group)
        items = [(eid, tuple(v)) for eid, v in rows]
        if mode == "through":
            await self.store.origin.put_many(group, rows)
        else:
            assert self.redis is not None
            await self.redis.xadd(STREAM, {"group": group.name, "rows": orjson.dumps([[e, list(v)] for e, v in rows])})
        await self._cache(group, items)
        metrics.FEATURE_WRITES.labels(group.name, mode).inc(len(items))
        return mode

    async def _cache(self, group: FeatureGroup, items: list[tuple[str, tuple[Any, ...]]]) -> None:
        if self.store.l2 is not None:
            await self.store.l2.set_many([(feature_key(group, e), v, group.ttl_s) for e, v in items])
        self.store.l1.set_many_now([(l1_key(group, e), v, group.ttl_s) for e, v in items])


async def ensure_group(redis: Redis) -> None:
    """The writers' consumer group (and the stream), made when missing; from the stream's
    start, so entries added before it existed (after a Redis restart) are committed too."""
    try:
        await redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def parse_entry(
    data: dict[bytes, bytes] | None, fs: schema.FeatureSchema
) -> tuple[FeatureGroup, list[tuple[str, list[Any]]]]:
    """A stream entry's group and rows, checked like any write; ValueError if malformed."""
    if data is None:
        raise ValueError("entry has no fields")
    try:
        name, raw = data[b"group"].decode(), orjson.loads(data[b"rows"])
    except (KeyError, UnicodeDecodeError, orjson.JSONDecodeError) as exc:
        raise ValueError(f"unreadable entry: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, list):
        raise ValueError("rows is not a list")
    rows = [{"id": r[0], "values": r[1]} if isinstance(r, list) and len(r) == 2 else None for r in raw]
    return validate_rows(name, rows, fs)


async def _commit(
    redis: Redis,
    origin: FeatureSource,
    entries: Sequence[Entry],
    fs: schema.FeatureSchema,
    on_step: StepHook | None = None,
) -> int:
    """Commit a batch of stream entries (one upsert per group, in stream order, so the last
    write of an entity wins), then acknowledge and drop them all: only after the commit.
    Entries that cannot be committed go to the dead-letter stream in the same transaction."""
    rows: dict[str, dict[str, Any]] = {}
    groups: dict[str, FeatureGroup] = {}
    dead: list[tuple[bytes, dict[bytes, bytes] | None, str]] = []
    for entry_id, data in entries:
        try:
            group, parsed = parse_entry(data, fs)
        except ValueError as exc:
            dead.append((entry_id, data, str(exc)))
            continue
        groups[group.name] = group
        rows.setdefault(group.name, {}).update(parsed)
    if on_step is not None:
        on_step("read")
    n = 0
    for name, by_id in rows.items():
        n += await origin.put_many(groups[name], list(by_id.items()))
    if on_step is not None:
        on_step("upserted")
    pipe = redis.pipeline(transaction=True)
    for entry_id, data, reason in dead:
        log.error("feature write %s dead-lettered to %s: %s", entry_id.decode(), DEAD_STREAM, reason)
        fields = {**(data or {}), b"entry_id": entry_id, b"reason": reason.encode()}
        pipe.xadd(DEAD_STREAM, fields, maxlen=DEAD_MAXLEN, approximate=True)  # type: ignore[arg-type]
    ids = [entry_id for entry_id, _ in entries]
    await pipe.xack(STREAM, GROUP, *ids).xdel(STREAM, *ids).execute()
    if dead:
        metrics.DEAD_LETTERS.inc(len(dead))
    return n


@dataclass(slots=True)
class Consumer:
    """One writer of the group: reads, claims and commits entries; no error handling of
    its own (that is `run_writer`'s job)."""

    redis: Redis
    origin: FeatureSource
    name: str
    fs: schema.FeatureSchema = schema.DEFAULT
    batch: int = 100
    block_ms: int = BLOCK_MS
    claim_idle_s: float = 30.0
    on_step: StepHook | None = None

    async def commit(self, entries: Sequence[Entry]) -> int:
        return await _commit(self.redis, self.origin, entries, self.fs, self.on_step) if entries else 0

    async def recover(self) -> int:
        """Commit this consumer's own pending entries (a previous run of it died mid-batch)."""
        await ensure_group(self.redis)
        total = 0
        while resp := await self.redis.xreadgroup(GROUP, self.name, {STREAM: "0"}, count=self.batch):
            entries = resp[0][1]
            if not entries:
                break
            total += await self.commit(entries)
        return total

    async def claim(self) -> int:
        """Commit entries another consumer left pending for longer than `claim_idle_s`."""
        idle_ms = int(self.claim_idle_s * 1000)
        resp = await self.redis.xautoclaim(STREAM, GROUP, self.name, idle_ms, "0-0", count=self.batch)
        return await self.commit(resp[1])

    async def step(self) -> int:
        """One round: claim the abandoned, then read (blocking) and commit new entries."""
        total = await self.claim()
        resp = await self.redis.xreadgroup(GROUP, self.name, {STREAM: ">"}, count=self.batch, block=self.block_ms)
        return total + (await self.commit(resp[0][1]) if resp else 0)


def _failure_kind(exc: Exception) -> str:
    if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
        return "nogroup"  # Redis lost the stream's group (restarted without persistence)
    if isinstance(exc, RedisError):
        return "redis"
    if isinstance(exc, L3_ERRORS):
        return "l3"
    return "other"


async def run_writer(
    redis: Redis,
    origin: FeatureSource,
    consumer: str,
    stop: asyncio.Event,
    batch: int = 100,
    block_ms: int = BLOCK_MS,
    claim_idle_s: float = 30.0,
    fs: schema.FeatureSchema = schema.DEFAULT,
    backoff_s: float = 0.1,
    max_backoff_s: float = 5.0,
    on_step: StepHook | None = None,
) -> int:
    """Commit write-behind entries to L3 until `stop` is set; returns rows committed.

    Supervised: whatever one round raises (a Redis or L3 outage, a vanished group, a bug)
    is logged and counted, and the writer starts again after a jittered exponential
    backoff (from `backoff_s`, at most `max_backoff_s`): first recreating the group when
    needed and committing its own pending entries. Catching every Exception is deliberate:
    a writer that dies loses no data, but stops committing it without a word.
    """
    c = Consumer(redis, origin, consumer, fs, batch, block_ms, claim_idle_s, on_step)
    total, failures = 0, 0
    while not stop.is_set():
        try:
            total += await c.recover()
            failures = 0
            while not stop.is_set():
                total += await c.step()
        except Exception as exc:
            kind = _failure_kind(exc)
            metrics.WRITER_FAILURES.labels(kind).inc()
            failures += 1
            delay = min(max_backoff_s, backoff_s * 2 ** min(failures - 1, 30)) * random.uniform(0.5, 1.0)
            log.warning("feature writer %s failed (%s: %s: %s); restarting in %.2f s", consumer, kind,
                        type(exc).__name__, exc, delay)  # fmt: skip
            await _wait(stop, delay)
    return total


async def _wait(stop: asyncio.Event, delay_s: float) -> None:
    """Sleep `delay_s`, or less when `stop` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay_s)
