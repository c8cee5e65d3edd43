"""Rollout state and per-arm counters, shared by every gateway process through Redis.

Keys (prefix `ctr:canary:`): `state` (the rollout, JSON, with a version number), `ended`
(a set of the ids of rollouts that ended: tombstones, so that none is ever restored),
`strata:<rollout id>` (a set of the strata seen, `counts.stratum_key`),
`arm:<rollout id>:<arm>:<stratum>` (a hash of counters: `<field>.<unit>` for requests,
errors, impressions, clicks, scored, scored_clicks, pred_sum per user unit, `l<i>` per
latency bucket) and `lease` (who may decide now).

Decisions are made once: a controller acquires the lease (SET NX PX) before it evaluates,
and every change of the state is a compare-and-set on its version (WATCH/MULTI/EXEC), so
a manual action and an automatic decision racing each other cannot both apply. Timestamps
are wall-clock seconds (`time.time` by default, injected): they are compared across
processes and machines, which monotonic clocks cannot be.

`MemoryStore` keeps the same state in one process (the simulator and unit tests whose
subject is not Redis).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import orjson
import redis.asyncio as aioredis
from redis.exceptions import WatchError

from ctr.serving.canary.counts import FIELD, FIELDS, Cell, Counts

Status = Literal["running", "paused", "held", "promoted", "rolled_back"]
ACTIVE: tuple[str, ...] = ("running", "paused", "held")
ARMS = ("stable", "canary", "baseline")  # baseline: stable's model on the canary's capacity
PREFIX = "ctr:canary:"


@dataclass(frozen=True, slots=True)
class Arm:
    tag: str
    urls: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"tag": self.tag, "urls": list(self.urls)}


@dataclass(frozen=True, slots=True)
class Rollout:
    """One release: the state every gateway process reads to split its traffic."""

    id: str
    stable: Arm
    canary: Arm
    plan: dict[str, Any]
    salt: str
    status: Status
    phase: int
    share: float
    started_at: float
    phase_started_at: float
    paused_at: float | None = None
    reason: str = ""
    history: tuple[dict[str, Any], ...] = ()
    version: int = 0
    harm_since: dict[str, float] = field(default_factory=dict)  # gate -> when its harm verdict began
    stable_from: str = ""  # the rollout whose promotion made `stable` the stable arm; "": the gateway's own

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def with_(self, **changes: Any) -> Rollout:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> bytes:
        d = dataclasses.asdict(self)
        d["stable"], d["canary"] = self.stable.to_dict(), self.canary.to_dict()
        d["history"] = list(self.history)
        return orjson.dumps(d)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Rollout:
        d = orjson.loads(raw)
        d["stable"] = Arm(d["stable"]["tag"], tuple(d["stable"]["urls"]))
        d["canary"] = Arm(d["canary"]["tag"], tuple(d["canary"]["urls"]))
        d["history"] = tuple(d["history"])
        return cls(**d)


Delta = Counts  # counter increments not yet written (merged between flushes)


class Transition(Protocol):
    def __call__(self, current: Rollout | None) -> Rollout | None: ...


class Store(Protocol):
    """Where the rollout and its counters live."""

    async def load(self) -> Rollout | None: ...
    async def transition(self, fn: Transition) -> Rollout | None: ...
    async def counters(self, rollout_id: str) -> Counts: ...
    async def add(self, rollout_id: str, delta: Counts) -> None: ...
    async def restore(self, rollout: Rollout, counters: Counts) -> bool: ...
    async def lease(self, owner: str, ttl_s: float) -> bool: ...


class MemoryStore:
    """The Store in one process (no sharing); same semantics as RedisStore."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.rollout: Rollout | None = None
        self.arms: dict[str, Counts] = {}
        self.ended: set[str] = set()
        self._lease: tuple[str, float] | None = None
        self._clock = clock

    async def load(self) -> Rollout | None:
        return self.rollout

    async def transition(self, fn: Transition) -> Rollout | None:
        new = fn(self.rollout)
        if new is not None:
            self.rollout = new.with_(version=(self.rollout.version if self.rollout else 0) + 1)
            if not new.active:
                self.ended.add(new.id)
        return self.rollout if new is not None else None

    async def counters(self, rollout_id: str) -> Counts:
        cells = self.arms.get(rollout_id, Counts()).cells
        return Counts({k: Cell(c.counts.copy(), c.latency.copy()) for k, c in cells.items()})

    async def add(self, rollout_id: str, delta: Counts) -> None:
        self.arms.setdefault(rollout_id, Counts()).add(delta)

    async def restore(self, rollout: Rollout, counters: Counts) -> bool:
        if self.rollout is not None or (rollout.active and rollout.id in self.ended):
            return False
        self.rollout = rollout
        if not rollout.active:
            self.ended.add(rollout.id)
        self.arms[rollout.id] = Counts()
        self.arms[rollout.id].add(counters)
        return True

    async def lease(self, owner: str, ttl_s: float) -> bool:
        now = self._clock() if self._clock else 0.0
        if self._lease is None or self._lease[0] == owner or self._lease[1] <= now:
            self._lease = (owner, now + ttl_s)
            return True
        return False


# Put back a rollout that Redis lost: only when no state is there, and never an active rollout
# that ended (its id is in the tombstones). KEYS: state, ended; ARGV: the JSON, its id, 1 if active.
_RESTORE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[3] == '1' and redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[3] ~= '1' then redis.call('SADD', KEYS[2], ARGV[2]) end
return 1
"""

# Renew the lease when this owner holds it, take it when nobody does: one atomic step.
_LEASE = """
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


class RedisStore:
    """The Store in Redis (redis-py asyncio): shared by every gateway process and replica."""

    def __init__(self, client: aioredis.Redis, prefix: str = PREFIX) -> None:
        self.r = client
        self.key = prefix + "state"
        self.ended_key = prefix + "ended"
        self.lease_key = prefix + "lease"
        self.prefix = prefix
        self._lease = client.register_script(_LEASE)
        self._restore = client.register_script(_RESTORE)

    def _arm_key(self, rollout_id: str, arm: str, stratum: str) -> str:
        return f"{self.prefix}arm:{rollout_id}:{arm}:{stratum}"

    def _strata_key(self, rollout_id: str) -> str:
        return f"{self.prefix}strata:{rollout_id}"

    async def load(self) -> Rollout | None:
        raw = await self.r.get(self.key)
        return Rollout.from_json(raw) if raw else None

    async def transition(self, fn: Transition) -> Rollout | None:
        """Apply fn to the current state atomically (optimistic: retried when another writer won)."""
        async with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self.key)
                    raw = await pipe.get(self.key)
                    current = Rollout.from_json(raw) if raw else None
                    new = fn(current)
                    if new is None:
                        await pipe.reset()
                        return None
                    new = new.with_(version=(current.version if current else 0) + 1)
                    pipe.multi()
                    pipe.set(self.key, new.to_json())
                    if not new.active:
                        pipe.sadd(self.ended_key, new.id)
                    await pipe.execute()
                    return new
                except WatchError:
                    continue

    async def counters(self, rollout_id: str) -> Counts:
        strata = sorted(m.decode() for m in await self.r.smembers(self._strata_key(rollout_id)))
        keys = [(a, st) for st in strata for a in ARMS]
        async with self.r.pipeline(transaction=False) as pipe:
            for a, st in keys:
                pipe.hgetall(self._arm_key(rollout_id, a, st))
            raws = await pipe.execute()
        return Counts({k: _parse(raw) for k, raw in zip(keys, raws, strict=True) if raw})

    async def add(self, rollout_id: str, delta: Counts) -> None:
        async with self.r.pipeline(transaction=False) as pipe:
            for (a, st), c in delta.cells.items():
                pipe.sadd(self._strata_key(rollout_id), st)
                key = self._arm_key(rollout_id, a, st)
                for f, u in zip(*np.nonzero(c.counts), strict=True):  # floats: exact for counts below 2**53
                    pipe.hincrbyfloat(key, f"{FIELDS[f]}.{u}", float(c.counts[f, u]))
                for i in np.nonzero(c.latency)[0]:
                    pipe.hincrby(key, f"l{i}", int(c.latency[i]))
            await pipe.execute()

    async def restore(self, rollout: Rollout, counters: Counts) -> bool:
        """Put back a rollout (and its counters) that Redis lost, unless one is there, or it is an
        active rollout whose end is recorded (a tombstone)."""
        args = [rollout.to_json(), rollout.id, "1" if rollout.active else "0"]
        if not await self._restore(keys=[self.key, self.ended_key], args=args):
            return False
        if not rollout.active:
            return True
        async with self.r.pipeline(transaction=True) as pipe:
            for (a, st), c in counters.cells.items():
                key = self._arm_key(rollout.id, a, st)
                pipe.sadd(self._strata_key(rollout.id), st)
                pipe.delete(key)
                mapping = _mapping(c)
                if mapping:
                    pipe.hset(key, mapping=mapping)
            await pipe.execute()
        return True

    async def lease(self, owner: str, ttl_s: float) -> bool:
        return bool(await self._lease(keys=[self.lease_key], args=[owner, int(ttl_s * 1000)]))


def _mapping(c: Cell) -> dict[str, Any]:
    m: dict[str, Any] = {}
    for f, u in zip(*np.nonzero(c.counts), strict=True):
        m[f"{FIELDS[f]}.{u}"] = repr(float(c.counts[f, u]))
    m.update({f"l{i}": int(c.latency[i]) for i in np.nonzero(c.latency)[0]})
    return m


def _parse(raw: dict[bytes, bytes]) -> Cell:
    c = Cell()
    for k, v in raw.items():
        name = k.decode()
        if name.startswith("l"):
            c.latency[int(name[1:])] = int(v)
        else:
            f, _, u = name.partition(".")
            if f in FIELD and u.isdigit():
                c.counts[FIELD[f], int(u)] = float(v)
    return c
