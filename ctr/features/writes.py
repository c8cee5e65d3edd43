"""Feature writes, in one of two modes per group, and the durable write-behind writer.

Every write carries a version from the writing process's clock (ctr/features/versions.py),
and every tier keeps only the newest: L3 upserts only a newer version, L2 sets
compare-newer (a Lua script), L1 likewise, and every other process's L1 is told
(ctr/features/coherence.py). So a replayed, reordered or claimed write never takes a row
back, and a read that was in flight during a write never puts the older row back.

- write-through: L3 first (committed: the truth), then the caches (L2, this process's L1,
  the announcement to the others). Once L3 committed the write is done. The commit also
  notes the write as still to be announced, in the same transaction; the note goes once the
  announcement landed, and the repair loop of every process announces what stayed noted for
  a second (Redis did not answer, or the process died): the answer says when it is deferred;
- write-behind: the rows are appended to a Redis Stream first, and only once Redis took
  them (XADD answered) the caches are written, so no cache ever holds a value the stream
  lost. A writer in a consumer group commits them to L3 and acknowledges each entry only
  after the commit, then refreshes the caches from what L3 holds. A writer killed with
  SIGKILL mid-stream loses nothing: its unacknowledged entries stay pending and another
  writer commits them (after `claim_idle_s`, by XAUTOCLAIM; at once when the dead writer was
  a process of the same host, as BentoML's restarted writer is); being versioned, a late
  commit of an older entry changes nothing. Each writer process has a name of its own.
  The stream must live on a Redis that never evicts it (`check_stream_redis`).

The writer is supervised (`run_writer`): a failing Redis or L3, or a consumer group that
vanished with a Redis restarted without persistence, is logged, counted
(`ctr_writer_failures`) and retried with backoff; the writer only returns when told to
stop. An entry that cannot be committed (malformed, or rows the schema refuses) is moved
to a dead-letter stream (`ctr_feature_writes_dead_lettered`) and the rest of its batch is
committed. How durable an acknowledged write is depends on Redis's persistence (docs/feature-store.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import re
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from ctr import metrics
from ctr.features import schema
from ctr.features.coherence import Coherence
from ctr.features.schema import FeatureGroup
from ctr.features.store import L2_ERRORS, L3_ERRORS, FeatureSource, TieredStore
from ctr.features.tiers import CacheTier, feature_key, l1_key
from ctr.features.versions import VersionClock

log = logging.getLogger(__name__)
Mode = Literal["through", "behind"]
STREAM = "ctr:feature-writes"
DEAD_STREAM = "ctr:feature-writes:dead"
DEAD_MAXLEN = 100_000  # the dead-letter stream keeps about the last this many entries
GROUP = "ctr-writers"
BLOCK_MS = 200  # the writer's blocking read; the stream's client must time out later
DEAD_IDLE_S = 1.0  # a consumer of a gone process is claimed from once idle this long (a live one reads every BLOCK_MS)
STREAM_TIMEOUT_S = 2.0
ANNOUNCE_CHUNK = 500  # rows per announcement message and per L2 pipeline
MAX_INT = 2**53  # values stay exact in JSON and in the model's int64 input
# The kind each value of a group must have, in field order.
KINDS: dict[str, tuple[type, ...]] = {
    "user_static": (int, str, int, int),
    "user_behavioral": (int, int),
    "ad_meta": (int, int, str),
    "ad_stats": (int, int),
}
Entry = tuple[bytes, dict[bytes, bytes] | None]
Row = tuple[Any, ...]
Versioned = tuple[str, Row, int]  # (entity id, values, version)
# Called after a batch was committed to L3, with each group's committed ids.
CommitHook = Callable[[FeatureGroup, list[str]], Awaitable[None]]
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


@dataclass(frozen=True, slots=True)
class Written:
    """What a write did: its mode, and whether its announcement to the caches was left to
    the repair loop (Redis did not take it)."""

    mode: Mode
    cache_deferred: bool = False


class FeatureWriter:
    def __init__(
        self,
        store: TieredStore,
        modes: dict[str, Mode],
        redis: Redis | None = None,
        fs: schema.FeatureSchema = schema.DEFAULT,
        coherence: Coherence | None = None,
        clock: VersionClock | None = None,
        l2: CacheTier | None = None,
    ) -> None:
        """`l2`: the L2 client the announcements write with (default the store's, whose timeout
        is the read path's: 50 ms; a writer's own with a longer one spares it the timeouts of
        a busy Redis, which are no reason to defer a write's announcement)."""
        self.store = store
        self.l2 = l2 if l2 is not None else store.l2
        self.modes = modes
        self.redis = redis  # the write-behind stream's Redis
        self.schema = fs
        self.coherence = coherence
        self.clock = clock or (coherence.versions if coherence is not None else VersionClock())
        self.stream_refused: str | None = None  # why write-behind was refused (check_stream_redis)
        self._repairing: asyncio.Task[None] | None = None

    def mode(self, group: FeatureGroup) -> Mode:
        mode = self.modes.get(group.name, "through")
        usable = self.redis is not None and self.stream_refused is None
        return "behind" if mode == "behind" and usable else "through"

    async def start(self, repair_s: float = 0.5) -> None:
        """Check the stream's Redis (when a group writes behind), and start the repair loop."""
        await self.check_stream()
        self._repairing = asyncio.create_task(self._repair_forever(repair_s))

    async def check_stream(self) -> None:
        """Refuse write-behind on a stream Redis that may evict it (checked at start and again
        by the repair loop: a policy can change, a failover can bring another Redis)."""
        if self.redis is not None and "behind" in self.modes.values():
            refused = await check_stream_redis(self.redis)
            if refused and refused != self.stream_refused:
                log.error("write-behind refused, writing through instead: %s", refused)
            self.stream_refused = refused

    async def close(self) -> None:
        if self._repairing is not None:
            self._repairing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._repairing

    async def put(self, group: FeatureGroup, rows: Sequence[tuple[str, Sequence[Any]]]) -> Written:
        """Write rows of one group in the group's mode, under one new version. Raises (nothing
        acknowledged) when L3 (through) or the stream (behind) did not take the write; once
        either did, the write is done and the caches follow (at once, or by the repair loop)."""
        mode = self.mode(group)
        version = self.clock.next()
        items: list[Versioned] = [(eid, tuple(v), version) for eid, v in rows]
        if mode == "through":
            items = await self._through(group, items)
        else:
            assert self.redis is not None
            rows_json = orjson.dumps([[e, list(v)] for e, v, _ in items])
            await self.redis.xadd(STREAM, {"group": group.name, "rows": rows_json, "version": str(version)})
        deferred = not await self.cache(group, items, committed=mode == "through")
        metrics.FEATURE_WRITES.labels(group.name, mode).inc(len(items))
        return Written(mode, deferred)

    async def _through(self, group: FeatureGroup, items: list[Versioned]) -> list[Versioned]:
        """Commit to L3. A row L3 refused holds a newer version: a concurrent write, or one from a
        process whose clock is ahead of ours. This write is acknowledged after it, so it is
        committed again above that version (once; the rows L3 then holds go to the caches)."""
        if await self.store.origin.put_many(group, items, announce=True) == len({eid for eid, _, _ in items}):
            return items
        try:
            held = {eid: ver for eid, _, ver in await self.truth(group, [eid for eid, _, _ in items])}
            self.clock.observe(max(held.values(), default=0))
            again = self.clock.next()
            redo = [(eid, v, again) for eid, v, ver in items if held.get(eid, ver) > ver]
            if redo:
                await self.store.origin.put_many(group, redo, announce=True)
            return await self.truth(group, [eid for eid, _, _ in items])
        except L3_ERRORS:  # committed; the caches are left to whichever write is newest
            return []

    async def truth(self, group: FeatureGroup, ids: Sequence[str]) -> list[Versioned]:
        """What L3 holds for `ids` (no timeout: off the request path)."""
        got = await self.store.origin.get_many(group, list(dict.fromkeys(ids)))
        return [(eid, row, ver) for eid, (row, ver) in got.items()]

    async def refresh(self, group: FeatureGroup, ids: list[str]) -> None:
        """After the write-behind writer committed `ids`: the caches take what L3 now holds."""
        await self.cache(group, await self.truth(group, ids), committed=True)

    async def cache(self, group: FeatureGroup, rows: Sequence[Versioned], committed: bool = True) -> bool:
        """This process's L1, then every other process's L1 (the announcement) and L2, both
        compare-newer; False when Redis did not take it all. A committed write's announcement
        is also noted in L3 (`put_many(announce=True)`) until it landed, so the repair loop of
        any process makes it even when this one dies."""
        store = self.store
        store.l1.set_many_now([(l1_key(group, e), v, ver, store.l1_ttl(group.ttl_s)) for e, v, ver in rows])
        try:
            await self._announce(group, rows, committed)
        except L2_ERRORS as exc:
            log.warning("announcement of %d %s rows left to the repair loop (%s)", len(rows), group.name,
                        type(exc).__name__)  # fmt: skip
            metrics.CACHE_REPAIRS.labels("queued").inc(len(rows))
            return False
        return True

    async def _announce(self, group: FeatureGroup, rows: Sequence[Versioned], committed: bool = True) -> None:
        """In chunks (a pipeline of thousands of scripts outlasts L2's socket timeout): first the
        message (a listener's tombstone makes it read around an older L2 entry), then L2; then
        L3 forgets the pending announcement."""
        for i in range(0, len(rows), ANNOUNCE_CHUNK):
            chunk = rows[i : i + ANNOUNCE_CHUNK]
            if self.coherence is not None:
                await self.coherence.publish(group, [(e, ver) for e, _, ver in chunk])
            if self.l2 is not None:
                await self.l2.set_many([(feature_key(group, e), v, ver, group.ttl_s) for e, v, ver in chunk])
        if committed:  # a write-behind put is not in L3 yet: nothing noted there
            with contextlib.suppress(*L3_ERRORS):  # left pending: announced again later, harmlessly
                await self.store.origin.announced(group, [(e, ver) for e, _, ver in rows])

    async def repair(self, older_than_s: float = 1.0) -> int:
        """Announce committed writes whose announcement is still pending after `older_than_s`
        (from what L3 holds now); returns how many landed. Any process may do it, twice is
        harmless."""
        pending = await self.store.origin.unannounced(older_than_s)
        by_group: dict[str, list[str]] = {}
        for name, eid in pending:
            by_group.setdefault(name, []).append(eid)
        n = 0
        for name, ids in by_group.items():
            group = self.schema.group(name)
            if group is None:  # a group this process does not serve
                continue
            rows = await self.truth(group, ids)
            await self._announce(group, rows)
            metrics.CACHE_REPAIRS.labels("done").inc(len(rows))
            n += len(rows)
        return n

    async def _repair_forever(self, interval_s: float) -> None:
        delay, rounds = interval_s, 0
        while True:
            await asyncio.sleep(delay)
            rounds += 1
            try:
                if rounds % 60 == 0:
                    await self.check_stream()
                if n := await self.repair():
                    log.info("%d pending feature-write announcements made", n)
                delay = interval_s
            except (*L2_ERRORS, *L3_ERRORS) as exc:
                log.warning("feature-write repair failed (%s: %s); retrying", type(exc).__name__, exc)
                delay = min(2.0, delay * 2)


async def check_stream_redis(redis: Redis) -> str | None:
    """Why this Redis cannot hold the write-behind stream (None when it can): an
    `allkeys-*` eviction policy may evict the stream and its unacknowledged writes."""
    try:
        policy = (await redis.config_get("maxmemory-policy")).get("maxmemory-policy", "")
    except ResponseError:  # CONFIG disabled (managed Redis): cannot tell
        log.warning("cannot read the stream Redis's maxmemory-policy (CONFIG refused); make sure it is noeviction")
        return None
    except (RedisError, OSError) as exc:  # down: the service starts all the same (XADD fails until it is back)
        log.warning("cannot check the stream Redis's maxmemory-policy now (%s); make sure it is noeviction",
                    type(exc).__name__)  # fmt: skip
        return None
    if str(policy).startswith("allkeys"):
        return (f"the stream's Redis has maxmemory-policy {policy}, which can evict unacknowledged writes; "
                "give write-behind a Redis of its own (CTR_STREAM_REDIS_URL) with noeviction")  # fmt: skip
    return None


@functools.cache
def _pid_namespace() -> str:
    """Where this process's pid means something: its pid namespace (the inode of
    /proc/self/ns/pid; two containers of one pod share a hostname, not their pids) and the
    kernel's boot id (every host's first pid namespace has the same inode); "0" where
    neither is there."""
    try:
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        ns = "0"
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip().replace("-", "")[:12]
    except OSError:
        boot = ""
    return f"{ns}.{boot}" if boot else ns


def consumer_name() -> str:
    """A writer's name in the consumer group, unique per process (two writers sharing a name
    would take each other's pending entries): its host, pid namespace (and boot) and pid, and a
    nonce."""
    return f"writer-{socket.gethostname()}-{_pid_namespace()}-{os.getpid()}-{secrets.token_hex(3)}"


def dead_writer(name: str, host: str | None = None) -> bool:
    """Whether `name` (a `consumer_name`) was a writer process of this host and pid namespace
    that no longer runs: its pending entries need no `claim_idle_s` wait. Any other name (of
    another host or namespace, a pid that runs, perhaps reused, another form) is not known
    dead: those wait."""
    parts = name.rsplit("-", 3)
    if len(parts) != 4 or parts[0] != f"writer-{host or socket.gethostname()}" or parts[1] != _pid_namespace():
        return False
    if not re.fullmatch(r"[0-9]{1,9}", parts[2]):
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive under another user (EPERM)
        return False
    return False


async def ensure_group(redis: Redis) -> None:
    """The writers' consumer group (and the stream), made when missing; from the stream's
    start, so entries added before it existed (after a Redis restart) are committed too."""
    try:
        await redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def entry_version(entry_id: bytes, data: dict[bytes, bytes]) -> int:
    """An entry's write version; an entry written before entries carried one gets its stream
    id's time in microseconds (the same scale)."""
    if b"version" in data:
        try:
            return int(data[b"version"])
        except ValueError:
            raise ValueError("version is not an integer") from None
    ms, _, seq = entry_id.decode().partition("-")
    return int(ms) * 1000 + min(int(seq or 0), 999)


def parse_entry(
    entry_id: bytes, data: dict[bytes, bytes] | None, fs: schema.FeatureSchema
) -> tuple[FeatureGroup, list[Versioned]]:
    """A stream entry's group and versioned rows, checked like any write; ValueError if malformed."""
    if data is None:
        raise ValueError("entry has no fields")
    try:
        name, raw = data[b"group"].decode(), orjson.loads(data[b"rows"])
    except (KeyError, UnicodeDecodeError, orjson.JSONDecodeError) as exc:
        raise ValueError(f"unreadable entry: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, list):
        raise ValueError("rows is not a list")
    rows = [{"id": r[0], "values": r[1]} if isinstance(r, list) and len(r) == 2 else None for r in raw]
    group, parsed = validate_rows(name, rows, fs)
    version = entry_version(entry_id, data)
    return group, [(eid, tuple(v), version) for eid, v in parsed]


async def _commit(
    redis: Redis,
    origin: FeatureSource,
    entries: Sequence[Entry],
    fs: schema.FeatureSchema,
    on_step: StepHook | None = None,
    on_commit: CommitHook | None = None,
) -> int:
    """Commit a batch of stream entries (one upsert per group; each row lands only over an
    older version, so the newest write of an entity wins whatever the order of the entries),
    then acknowledge and drop them all: only after the commit; then `on_commit` refreshes
    the caches. Entries that cannot be committed go to the dead-letter stream in the same
    transaction as the acknowledgement."""
    rows: dict[str, list[Versioned]] = {}
    groups: dict[str, FeatureGroup] = {}
    dead: list[tuple[bytes, dict[bytes, bytes] | None, str]] = []
    for entry_id, data in entries:
        try:
            group, parsed = parse_entry(entry_id, data, fs)
        except ValueError as exc:
            dead.append((entry_id, data, str(exc)))
            continue
        groups[group.name] = group
        rows.setdefault(group.name, []).extend(parsed)
    if on_step is not None:
        on_step("read")
    n = 0
    for name, versioned in rows.items():
        n += await origin.put_many(groups[name], versioned, announce=True)
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
    if on_commit is not None:
        for name, versioned in rows.items():
            await on_commit(groups[name], list(dict.fromkeys(eid for eid, _, _ in versioned)))
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
    on_commit: CommitHook | None = None
    dead_idle_s: float = DEAD_IDLE_S

    async def commit(self, entries: Sequence[Entry]) -> int:
        if not entries:
            return 0
        return await _commit(self.redis, self.origin, entries, self.fs, self.on_step, self.on_commit)

    async def recover(self) -> int:
        """Commit this consumer's own pending entries (a previous run of it died mid-batch), and
        forget consumers of the group that are idle and hold nothing (writers that ended)."""
        await ensure_group(self.redis)
        await self.prune()
        total = 0
        while resp := await self.redis.xreadgroup(GROUP, self.name, {STREAM: "0"}, count=self.batch):
            entries = resp[0][1]
            if not entries:
                break
            total += await self.commit(entries)
        return total

    async def prune(self, idle_s: float = 3600.0) -> int:
        """Delete the group's other consumers idle for `idle_s` with no pending entry."""
        gone = 0
        for c in await self.redis.xinfo_consumers(STREAM, GROUP):
            if _name(c) != self.name and int(c["pending"]) == 0 and int(c["idle"]) > idle_s * 1000:
                await self.redis.xgroup_delconsumer(STREAM, GROUP, c["name"])
                gone += 1
        return gone

    async def claim(self) -> int:
        """Commit entries another consumer left pending for longer than `claim_idle_s`, and at
        once those of a writer of this host that died."""
        idle_ms = int(self.claim_idle_s * 1000)
        resp = await self.redis.xautoclaim(STREAM, GROUP, self.name, idle_ms, "0-0", count=self.batch)
        return await self.commit(resp[1]) + await self.claim_dead()

    async def claim_dead(self) -> int:
        """Commit the entries pending at writers of this host whose process is gone (BentoML
        restarts a killed writer under a new name: they waited `claim_idle_s` for it). Only
        from a consumer idle for `dead_idle_s` (a live writer reads every `block_ms`), and with
        that as XCLAIM's minimum idle, so two writers claiming at once do not take each
        other's batch; the dead writer's name is left to `prune` (deleting a consumer deletes
        what it holds)."""
        total, idle_ms = 0, int(self.dead_idle_s * 1000)
        for c in await self.redis.xinfo_consumers(STREAM, GROUP):
            name = _name(c)
            if name == self.name or int(c["pending"]) == 0 or int(c["idle"]) < idle_ms or not dead_writer(name):
                continue
            pending = await self.redis.xpending_range(STREAM, GROUP, "-", "+", self.batch, consumername=c["name"])
            if ids := [p["message_id"] for p in pending]:
                claimed = await self.redis.xclaim(STREAM, GROUP, self.name, idle_ms, ids)
                total += await self.commit([e for e in claimed if e[0] is not None])  # nil: deleted (Redis < 7)
        return total

    async def step(self) -> int:
        """One round: claim the abandoned, then read (blocking) and commit new entries."""
        total = await self.claim()
        resp = await self.redis.xreadgroup(GROUP, self.name, {STREAM: ">"}, count=self.batch, block=self.block_ms)
        return total + (await self.commit(resp[0][1]) if resp else 0)


def _name(consumer: dict[str, Any]) -> str:
    """A consumer's name from XINFO CONSUMERS, readable whatever bytes another client gave it
    (only writers' own names are ever compared; the raw name goes back to Redis)."""
    raw = consumer["name"]
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


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
    on_commit: CommitHook | None = None,
) -> int:
    """Commit write-behind entries to L3 until `stop` is set; returns rows committed.

    Supervised: whatever one round raises (a Redis or L3 outage, a vanished group, a bug)
    is logged and counted, and the writer starts again after a jittered exponential
    backoff (from `backoff_s`, at most `max_backoff_s`): first recreating the group when
    needed and committing its own pending entries. Catching every Exception is deliberate:
    a writer that dies loses no data, but stops committing it without a word.
    """
    c = Consumer(redis, origin, consumer, fs, batch, block_ms, claim_idle_s, on_step, on_commit)
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
