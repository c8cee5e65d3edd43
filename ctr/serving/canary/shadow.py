"""The shadow phase on the serving path: the canary scores a sample of live stable requests
off the response path, each (request id, ad) pair is kept with an expiry, and the feedback on
that id joins it (`paired.py` judges the joined pairs).

Off the response path. `offer()` runs after the stable answer is computed and does no I/O: it
draws the sample (from the request id, keyed: every process draws the same for an id, so a
feedback on an id that was not sampled costs the store nothing, and no client can tell
which of its ids were), and when fewer than `max_inflight` shadow calls are running it starts one
as a background task (else the request is dropped and counted). The task calls the canary's
pool with the request's own feature matrix and writes the pair to the store.

Pooled across processes. Pairs and the paired counters live in Redis, so a feedback that
reaches another gateway process than its request joins all the same, and every process's
controller and status page read the same evidence. Keys (prefix `ctr:canary:`):
`shadow:<rollout>:pair:<digest of the request id>` (a hash: ad id -> "p q unit", expiring
after `ttl_s`) and `shadow:<rollout>:counts` (a hash of sums: `<field>.<unit>`, `h<model><click>.<bin>`,
`op.<name>`). A join takes its pair atomically (HGET and HDEL in one MULTI): each (id, ad)
joins at most once, a replayed feedback joins nothing, an ad that was not served has no pair.

A failing store degrades: a pair not written, a join not done, a flush kept for the next
try; each counted, none an error of /predict or /feedback.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import redis.asyncio as aioredis

from ctr.resilience.breaker import BreakerOpen
from ctr.resilience.deadline import REMOTE_ERRORS
from ctr.serving.canary.counts import N_UNITS
from ctr.serving.canary.paired import AUC_BINS, FIELD, FIELDS, OPS, PairedConfig, PairedCounts, paired_gate, summary
from ctr.serving.canary.plan import Plan
from ctr.serving.canary.runtime import STORE_ERRORS, CanaryRuntime
from ctr.serving.canary.state import PREFIX
from ctr.serving.canary.stats import GateResult
from ctr.serving.coalesce import ModelError

log = logging.getLogger(__name__)
# What a shadow call may fail with (as the gateway's model call): counted, never seen by a user.
CALL_ERRORS: tuple[type[BaseException], ...] = (*REMOTE_ERRORS, BreakerOpen, ModelError, TimeoutError, ValueError)
Pair = tuple[float, float, int]  # stable's served score, the canary's shadow score, the user's unit


class ShadowStore(Protocol):
    async def put(self, rollout_id: str, request_id: str, pairs: dict[str, Pair], ttl_s: float) -> None: ...
    async def take(self, rollout_id: str, request_id: str, ad_id: str) -> Pair | None: ...
    async def add(self, rollout_id: str, delta: PairedCounts) -> None: ...
    async def load(self, rollout_id: str) -> PairedCounts: ...


def _digest(request_id: str) -> str:
    return hashlib.blake2b(request_id.encode(), digest_size=16).hexdigest()


def keyed_draw(key: bytes) -> Callable[[str], float]:
    """The shadow sample's draw: a request id's keyed hash as a number in [0, 1)."""
    k = hmac.new(key, b"ctr-serve shadow sample v1", hashlib.sha256).digest()

    def draw(request_id: str) -> float:
        h = hashlib.blake2b(request_id.encode(), key=k, digest_size=8).digest()
        return int.from_bytes(h, "big") / 2**64

    return draw


class MemoryShadowStore:
    """The ShadowStore in one process (the simulator, unit tests whose subject is not Redis);
    expiry by the injected clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.pairs: dict[tuple[str, str], tuple[float, dict[str, Pair]]] = {}
        self.totals: dict[str, PairedCounts] = {}
        self.clock = clock

    async def put(self, rollout_id: str, request_id: str, pairs: dict[str, Pair], ttl_s: float) -> None:
        self.pairs[(rollout_id, _digest(request_id))] = (self.clock() + ttl_s, dict(pairs))

    async def take(self, rollout_id: str, request_id: str, ad_id: str) -> Pair | None:
        entry = self.pairs.get((rollout_id, _digest(request_id)))
        if entry is None or entry[0] <= self.clock():
            return None
        return entry[1].pop(ad_id, None)

    async def add(self, rollout_id: str, delta: PairedCounts) -> None:
        self.totals.setdefault(rollout_id, PairedCounts()).add(delta)

    async def load(self, rollout_id: str) -> PairedCounts:
        out = PairedCounts()
        if rollout_id in self.totals:
            out.add(self.totals[rollout_id])
        return out


class RedisShadowStore:
    """The ShadowStore in Redis: shared by every gateway process (see the module docstring)."""

    def __init__(self, client: aioredis.Redis, prefix: str = PREFIX) -> None:
        self.r = client
        self.prefix = prefix

    def _pair_key(self, rollout_id: str, request_id: str) -> str:
        return f"{self.prefix}shadow:{rollout_id}:pair:{_digest(request_id)}"

    def counts_key(self, rollout_id: str) -> str:
        return f"{self.prefix}shadow:{rollout_id}:counts"

    async def put(self, rollout_id: str, request_id: str, pairs: dict[str, Pair], ttl_s: float) -> None:
        key = self._pair_key(rollout_id, request_id)
        mapping = {ad: f"{p!r} {q!r} {u}" for ad, (p, q, u) in pairs.items()}
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
            pipe.pexpire(key, max(1, int(ttl_s * 1000)))
            await pipe.execute()

    async def take(self, rollout_id: str, request_id: str, ad_id: str) -> Pair | None:
        key = self._pair_key(rollout_id, request_id)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hget(key, ad_id)
            pipe.hdel(key, ad_id)
            raw, deleted = await pipe.execute()
        if not raw or deleted != 1:  # none, or another join took it first
            return None
        p, q, u = raw.decode().split()
        return float(p), float(q), int(u)

    async def add(self, rollout_id: str, delta: PairedCounts) -> None:
        key = self.counts_key(rollout_id)
        async with self.r.pipeline(transaction=False) as pipe:
            for f, u in zip(*np.nonzero(delta.counts), strict=True):
                pipe.hincrbyfloat(key, f"{FIELDS[f]}.{u}", float(delta.counts[f, u]))
            for m, y, b in zip(*np.nonzero(delta.hist), strict=True):
                pipe.hincrby(key, f"h{m}{y}.{b}", int(delta.hist[m, y, b]))
            for name, v in delta.ops.items():
                if v:
                    pipe.hincrby(key, f"op.{name}", int(v))
            await pipe.execute()

    async def load(self, rollout_id: str) -> PairedCounts:
        return parse(await self.r.hgetall(self.counts_key(rollout_id)))


def parse(raw: dict[bytes, bytes]) -> PairedCounts:
    pc = PairedCounts()
    for k, v in raw.items():
        name, _, idx = k.decode().partition(".")
        if name == "op" and idx in OPS:
            pc.ops[idx] = int(v)
        elif name.startswith("h") and len(name) == 3 and idx.isdigit() and int(idx) < AUC_BINS:
            pc.hist[int(name[1]), int(name[2]), int(idx)] = int(v)
        elif name in FIELD and idx.isdigit() and int(idx) < N_UNITS:
            pc.counts[FIELD[name], int(idx)] = float(v)
    return pc


class Pool(Protocol):
    async def submit(self, x: np.ndarray, key: str | None = None) -> np.ndarray: ...


class CanaryArm(Protocol):
    """What the tap needs of `arms.Arms`: the rollout's runtime and the canary's pool in the
    shadow phase (no user routed to it: share 0)."""

    runtime: CanaryRuntime
    shadow_pool: Any


def shadowing(runtime: CanaryRuntime) -> str | None:
    """The rollout id while a running rollout is in its shadow phase, else None."""
    r = runtime.rollout
    if r is None or r.status != "running" or not Plan.from_dict(r.plan).is_shadow(r.phase):
        return None
    return r.id


class Shadow:
    """One gateway process's shadow tap, joiner and flusher (see the module docstring)."""

    def __init__(
        self,
        arms: CanaryArm,
        store: ShadowStore,
        sample: float,
        max_inflight: int = 8,
        timeout_s: float = 0.5,
        ttl_s: float = 3600.0,
        cfg: PairedConfig | None = None,
        draw: Callable[[str], float] | None = None,
    ) -> None:
        """`draw(request_id)`: where an id falls in [0, 1), the same in every process (root gives
        `keyed_draw` of the request-id key; by default a key of this instance's own)."""
        if not 0 <= sample <= 1 or max_inflight < 1 or timeout_s <= 0 or ttl_s <= 0:
            raise ValueError("sample must be in [0, 1], max_inflight >= 1, timeout_s > 0 and ttl_s > 0")
        self.arms, self.store, self.sample = arms, store, sample
        self.max_inflight, self.timeout_s, self.ttl_s = max_inflight, timeout_s, ttl_s
        self.cfg = cfg or PairedConfig()
        self.draw = draw or keyed_draw(secrets.token_bytes(32))
        self.rollout_id: str | None = None  # set by `refresh` (the sync loop), read by the hot path
        # This process's sums not yet in the store, per rollout: a flush that failed across a
        # change of rollout never adds one rollout's pairs to another's.
        self.deltas: dict[str, PairedCounts] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None

    def refresh(self) -> None:
        self.rollout_id = shadowing(self.arms.runtime)

    @property
    def delta(self) -> PairedCounts:
        """The current rollout's unflushed sums (a scratch one outside a shadow phase)."""
        return self.deltas.setdefault(self.rollout_id or "", PairedCounts())

    # ---- hot path: no I/O, no waiting --------------------------------------------------------
    def offer(self, request_id: str, user_id: str, ad_ids: Sequence[str], x: np.ndarray, scores: list[float]) -> None:
        """A stable answer that was just computed: maybe score it on the canary in the background."""
        rid, pool = self.rollout_id, self.arms.shadow_pool
        if rid is None or pool is None or self.draw(request_id) >= self.sample:
            return
        delta = self.deltas.setdefault(rid, PairedCounts())
        delta.ops["offered"] += 1
        if len(self.tasks) >= self.max_inflight:
            delta.ops["dropped"] += 1
            return
        unit = self.arms.runtime.unit(user_id)
        call = self._score(rid, pool, request_id, user_id, ad_ids, x, scores, unit)
        # A context of its own: the stable request's (its deadline for the coalescer) stays behind.
        task = asyncio.get_running_loop().create_task(call, context=contextvars.Context())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _score(self, rid: str, pool: Pool, request_id: str, user_id: str, ad_ids: Sequence[str],
                     x: np.ndarray, scores: list[float], unit: int) -> None:  # fmt: skip
        delta = self.deltas.setdefault(rid, PairedCounts())
        try:
            async with asyncio.timeout(self.timeout_s):
                q = await pool.submit(x, user_id)
        except CALL_ERRORS:
            delta.ops["failed"] += 1
            return
        pairs = {ad: (float(p), float(s), unit) for ad, p, s in zip(ad_ids, scores, q.tolist(), strict=True)}
        try:
            await self.store.put(rid, request_id, pairs, self.ttl_s)
            delta.ops["stored"] += 1
        except STORE_ERRORS:
            delta.ops["store_errors"] += 1

    # ---- feedback ------------------------------------------------------------------------------
    async def join(self, request_id: str, ad_id: str, clicked: bool) -> bool:
        """The feedback on a served id: joined to its shadow pair when there is one (at most once)."""
        rid = self.rollout_id
        if rid is None or self.draw(request_id) >= self.sample:  # not sampled: no pair to look for
            return False
        delta = self.deltas.setdefault(rid, PairedCounts())
        try:
            pair = await self.store.take(rid, request_id, ad_id)
        except STORE_ERRORS:
            delta.ops["join_errors"] += 1
            return False
        if pair is None:
            return False
        p, q, unit = pair
        delta.record(np.array([p]), np.array([q]), np.array([float(clicked)]), np.array([unit]))
        delta.ops["joined"] += 1
        return True

    # ---- sync -------------------------------------------------------------------------------
    async def flush(self) -> None:
        """Write this process's sums to the store, each to its own rollout (kept for the next try
        when it fails)."""
        for rid in [r for r, d in self.deltas.items() if r and not d.empty()]:
            delta = self.deltas.pop(rid)
            try:
                await self.store.add(rid, delta)
            except STORE_ERRORS:
                delta.add(self.deltas.get(rid, PairedCounts()))
                self.deltas[rid] = delta
        self.deltas.pop("", None)  # counted outside any shadow phase: nothing to add them to

    async def sync(self) -> None:
        await self.flush()
        self.refresh()

    async def gate(self, rollout_id: str) -> GateResult:
        """The paired gate over every process's joined pairs (the controller's evidence)."""
        return paired_gate(await self.store.load(rollout_id), self.cfg)

    async def status(self) -> dict[str, Any] | None:
        """The shadow phase on /status: pairs joined, the paired log-loss difference with its
        interval, the verdict (None, and no panel, when the rollout has no shadow phase)."""
        r = self.arms.runtime.rollout
        if r is None or not any(p.get("shadow") for p in r.plan.get("phases", [])):
            return None
        out: dict[str, Any] = {"rollout": r.id, "in_shadow_phase": self.rollout_id is not None,
                               "sample": self.sample, "inflight": len(self.tasks)}  # fmt: skip
        try:
            async with asyncio.timeout(0.2):
                out.update(summary(await self.store.load(r.id), self.cfg))
        except (*STORE_ERRORS, TimeoutError):
            out["store"] = "unavailable"  # no address or driver message on a public page
        return out

    async def run(self, stop: asyncio.Event, every_s: float) -> None:
        while not stop.is_set():
            try:
                await self.sync()
            except Exception:  # a corrupt plan, a bug: the loop must outlive any one bad round (as Arms.run)
                log.exception("shadow sync failed; retrying next round")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)

    def start(self, every_s: float) -> None:
        self._stop = asyncio.Event()
        self._loop = asyncio.create_task(self.run(self._stop, every_s))

    async def close(self) -> None:
        if self._loop is not None:
            self._stop.set()
            await asyncio.wait({self._loop}, timeout=2)
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=2)
        await self.flush()
