"""A model pool: many replicas behind one `submit(x, key)`, each with its own coalescer,
circuit breaker and health, picked by a load-balancing policy.

A request is assigned to a replica first (`acquire`: the policy over the available
replicas, i.e. healthy and breaker not open), then coalesced into that replica's next call.
A failed coalesced call is retried as a whole, on another replica, within the deadline and
the retry budget (one budget token per batch, not per request). Active probes and the
passive checks of `health` run in one background loop; discovery (DNS) in another.

Self-contained: a pool is built from a source of replica URLs and a policy, so a second
pool (a canary arm) is just another instance with another name.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ctr import metrics
from ctr.resilience.breaker import BreakerOpen, CircuitBreaker, State
from ctr.resilience.deadline import REMOTE_ERRORS
from ctr.resilience.retry import Retrier
from ctr.serving.coalesce import Coalescer, Upstream, Window
from ctr.serving.model_client import InvalidAnswer, check_answer
from ctr.serving.pool.balancer import Balancer, Lease, Slot, make_policy
from ctr.serving.pool.health import HealthConfig, ReplicaHealth, Status, evaluate
from ctr.serving.pool.replica import Replica

log = logging.getLogger("ctr.pool")
Clock = Callable[[], float]
EVALUATE_EVERY_S = 0.25  # passive checks: how often the windows are judged


class NoReplica(BreakerOpen):
    """No replica of the pool can take the call (every breaker open or all tried)."""


class Source(Protocol):
    dynamic: bool

    async def resolve(self) -> list[tuple[str, float]]: ...


@dataclass(frozen=True, slots=True)
class PoolConfig:
    policy: str = "peak_ewma"
    deadline_s: float = 0.05
    health: HealthConfig = field(default_factory=HealthConfig)
    load_factor: float = 1.25
    probe_interval_s: float = 1.0
    probe_timeout_s: float = 0.5
    refresh_s: float = 5.0
    max_inflight: int = 2
    max_rows: int = 8192
    window_s: float = 0.0
    window: Window = "fixed"
    hedge: bool = False
    upstream: Upstream | None = None  # the gateway's requests on their way (the deadline window waits for them)


@dataclass(eq=False)
class Member:
    url: str
    slot: Slot
    replica: Replica
    breaker: CircuitBreaker
    health: ReplicaHealth
    labels: tuple[str, str]
    coalescer: Coalescer = field(init=False)
    removed: bool = False

    @property
    def available(self) -> bool:
        return not self.removed and self.health.status is Status.HEALTHY and self.breaker.state is not State.OPEN


class ModelPool:
    def __init__(
        self,
        name: str,
        source: Source,
        factory: Callable[[str], Replica],
        config: PoolConfig,
        retrier: Retrier,
        breaker: Callable[[str], CircuitBreaker],
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.name, self.source, self.factory, self.config = name, source, factory, config
        self.retrier, self._breaker, self.clock = retrier, breaker, clock
        policy = make_policy(config.policy, rng or random.Random(), clock, config.load_factor)
        self.balancer = Balancer(policy, clock)
        self.members: list[Member] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._retiring: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ membership
    async def refresh(self) -> None:
        self.set_members(await self.source.resolve())

    def set_members(self, specs: list[tuple[str, float]]) -> None:
        """Add the replicas that are new, retire those that are gone, keep the rest as they are."""
        wanted = dict(specs)
        for m in [m for m in self.members if m.url not in wanted]:
            self._retire(m)
        known = {m.url: m for m in self.members}
        for url, weight in specs:
            if url in known:
                known[url].slot.weight = weight
                continue
            self.members.append(self._member(url, weight))
        self.balancer.update([m.slot for m in self.members])
        metrics.POOL_SIZE.labels(self.name).set(len(self.members))

    def _member(self, url: str, weight: float) -> Member:
        used = {m.slot.index for m in self.members}
        index = next(i for i in range(len(used) + 1) if i not in used)
        replica = self.factory(url)
        labels = (self.name, str(index))
        c = self.config
        # a replica found after start-up proves itself with probes before it takes traffic
        status = Status.PROBING if self._tasks else Status.HEALTHY
        member = Member(url, Slot(replica.name, index, weight), replica, self._breaker(f"{self.name}:{index}"),
                        ReplicaHealth(c.health, status), labels)  # fmt: skip
        member.coalescer = Coalescer(
            self._coalesced_call(member), c.max_inflight, c.max_rows, c.window_s, c.window, expected=c.upstream
        )
        metrics.REPLICA_HEALTH.labels(*labels).set(status.value)
        log.info("pool %s: replica %d is %s", self.name, index, url)
        return member

    def _retire(self, m: Member) -> None:
        m.removed = True
        self.members.remove(m)
        log.info("pool %s: replica %d (%s) left", self.name, m.slot.index, m.slot.name)

        async def drain() -> None:
            end = self.clock() + 10 * self.config.deadline_s + 1.0
            while m.slot.outstanding and self.clock() < end:
                await asyncio.sleep(0.05)
            await m.replica.close()

        self._background(drain())

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no running loop (set up outside one): nothing to wait for
            coro.close()
            return
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # ------------------------------------------------------------------ the request path
    def candidates(self, exclude: tuple[Member, ...] = ()) -> list[Member]:
        return [m for m in self.members if m.available and m not in exclude]

    def acquire(self, key: str | None = None, rows: int = 1) -> tuple[Member, Lease]:
        """A replica for one request (NoReplica when none is available)."""
        cands = self.candidates()
        if not cands:
            raise NoReplica(self.name)
        by_slot = {id(m.slot): m for m in cands}
        lease = self.balancer.acquire([m.slot for m in cands], key, rows)
        member = by_slot[id(lease.slot)]
        metrics.REPLICA_REQUESTS.labels(*member.labels).inc()
        return member, lease

    async def submit(self, x: np.ndarray, key: str | None = None) -> np.ndarray:
        """The model's output for the rows of `x`, from the replica the policy picks for `key`."""
        member, lease = self.acquire(key, len(x))
        t0 = self.clock()
        try:
            y = await member.coalescer.submit(x)
        except BaseException:
            lease.failure()
            raise
        lease.success(self.clock() - t0)
        return y

    def _coalesced_call(self, member: Member) -> Callable[[np.ndarray], Any]:
        async def call(x: np.ndarray) -> np.ndarray:
            tried: list[Member] = []

            async def once() -> np.ndarray:
                m = self._admit(member if not tried else None, tuple(tried), len(x))
                tried.append(m)
                if m is not member:
                    return await self._elsewhere(m, x)
                if self.config.hedge and m.health.p95_s > 0:
                    return await self._hedged(m, x, tried)
                return await self._call(m, x)

            return await self.retrier.call(once, time.perf_counter() + self.config.deadline_s)

        return call

    async def _elsewhere(self, m: Member, x: np.ndarray) -> np.ndarray:
        """A call on a replica the batch was not assigned to (a retry, a hedge): load there too."""
        lease = self.balancer.lease(m.slot, len(x))
        try:
            y = await self._call(m, x)
        except BaseException:
            lease.failure()
            raise
        lease.success(self.clock() - lease.t0)
        return y

    async def _hedged(self, m: Member, x: np.ndarray, tried: list[Member]) -> np.ndarray:
        """The call on `m`; if it has not answered by m's recent p95, the same call on another
        replica too, paid from the retry budget (Dean and Barroso, "The Tail at Scale"): the
        first answer wins, the other call is cancelled."""
        first = asyncio.ensure_future(self._call(m, x))
        done, _ = await asyncio.wait({first}, timeout=m.health.p95_s)
        if done:
            return first.result()
        try:
            other = self._admit(None, tuple(tried), len(x))
        except NoReplica:
            return await first
        if not self.retrier.budget.withdraw():
            return await first
        tried.append(other)
        metrics.HEDGES.labels(self.name).inc()
        second = asyncio.ensure_future(self._elsewhere(other, x))
        pending = {first, second}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                ok = [t for t in done if t.exception() is None]
                if ok:
                    return ok[0].result()
                if not pending:
                    return done.pop().result()  # both failed: raises the error
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            for task in pending:
                task.cancel()

    def _admit(self, preferred: Member | None, tried: tuple[Member, ...], rows: int) -> Member:
        """The member a try goes to: the preferred one while it can take it, else another the
        policy picks; its breaker admits the try (a half-open trial slot is taken here)."""
        if preferred is not None and preferred.available and preferred.breaker.allow():
            return preferred
        skip = list(tried) + ([preferred] if preferred is not None else [])
        while cands := self.candidates(tuple(skip)):
            by_slot = {id(m.slot): m for m in cands}
            m = by_slot[id(self.balancer.policy.pick([m.slot for m in cands], None, rows))]
            if m.breaker.allow():
                return m
            skip.append(m)
        raise NoReplica(self.name)

    async def _call(self, m: Member, x: np.ndarray) -> np.ndarray:
        t0 = self.clock()
        try:
            async with asyncio.timeout(self.config.deadline_s):
                y = check_answer(x, await m.replica.infer(x))
        except (*REMOTE_ERRORS, InvalidAnswer):  # an invalid answer counts against the replica
            elapsed = self.clock() - t0
            m.breaker.record_failure()
            m.health.record(self.clock(), False, elapsed)
            metrics.REPLICA_CALLS.labels(*m.labels, "error").inc()
            metrics.REPLICA_LATENCY.labels(*m.labels).observe(elapsed)
            raise
        elapsed = self.clock() - t0
        m.breaker.record_success()
        m.health.record(self.clock(), True, elapsed)
        metrics.REPLICA_CALLS.labels(*m.labels, "ok").inc()
        metrics.REPLICA_LATENCY.labels(*m.labels).observe(elapsed)
        return y

    def status(self) -> dict[str, Any]:
        """For the status page's "Model replicas" panel: the pool and each replica's snapshot, each
        named by its slot as in the metrics (`index`), not its address: the page is public."""
        rows = [{**{k: v for k, v in r.items() if k != "replica"}, "reason": r["reason"] or "-"}
                for r in self.snapshot()]  # fmt: skip
        return {"pool": self.name, "policy": self.config.policy, "healthy": sum(m.available for m in self.members),
                "replicas": rows}  # fmt: skip

    # ------------------------------------------------------------------ health
    async def probe_all(self) -> None:
        """One active probe of every replica, concurrently, each bounded by the probe timeout."""

        async def one(m: Member) -> None:
            try:
                async with asyncio.timeout(self.config.probe_timeout_s):
                    ok = await m.replica.ready()
            # AttributeError: BentoML's client of the in-graph model before its server runs;
            # RuntimeError: aiohttp's "Session is closed" when an ejection dropped it mid-probe
            except (*REMOTE_ERRORS, ValueError, AttributeError, RuntimeError) as exc:
                log.debug("pool %s: probe of replica %d failed: %r", self.name, m.slot.index, exc)
                ok = False
            if not ok:
                metrics.REPLICA_PROBE_FAILURES.labels(*m.labels).inc()
            m.health.probe(ok)

        await asyncio.gather(*(one(m) for m in list(self.members)))

    def evaluate(self) -> None:
        """Judge the windows and probes now; eject and readmit (see `health`)."""
        members = list(self.members)
        returned, ejected = evaluate(self.clock(), [m.health for m in members])
        for i in returned:
            log.info("pool %s: replica %d (%s) is back", self.name, members[i].slot.index, members[i].slot.name)
        for i, reason in ejected:
            m = members[i]
            # its pooled connections may be dead (a restarted process): start afresh when it returns
            self._background(m.replica.close())
            metrics.REPLICA_EJECTIONS.labels(*m.labels, reason).inc()
            log.warning("pool %s: replica %d (%s) ejected (%s) until +%.1f s", self.name, m.slot.index,
                        m.slot.name, reason, m.health.ejected_until - self.clock())  # fmt: skip
        for m in members:
            metrics.REPLICA_HEALTH.labels(*m.labels).set(m.health.status.value)

    async def _health_loop(self) -> None:
        next_probe = 0.0
        while True:
            try:
                if self.clock() >= next_probe:
                    next_probe = self.clock() + self.config.probe_interval_s
                    await self.probe_all()
                self.evaluate()
            except Exception:  # the loop must outlive any one bad round
                log.exception("pool %s: health round failed", self.name)
            await asyncio.sleep(min(EVALUATE_EVERY_S, self.config.probe_interval_s))

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_s)
            try:
                await self.refresh()
            except Exception:  # a bad answer must not stop discovery for good
                log.exception("pool %s: refreshing the replicas failed", self.name)

    async def start(self, background: bool = True) -> None:
        """Resolve the replicas; with `background`, run the health (and DNS) loops."""
        await self.refresh()
        if background:
            self._tasks.append(asyncio.create_task(self._health_loop()))
            if self.source.dynamic:
                self._tasks.append(asyncio.create_task(self._refresh_loop()))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._retiring, return_exceptions=True)
        await asyncio.gather(*(m.replica.close() for m in self.members), return_exceptions=True)

    def snapshot(self) -> list[dict[str, Any]]:
        """Each replica's state, for status pages and benchmarks."""
        return [{"index": m.slot.index, "replica": m.slot.name, "health": m.health.status.name.lower(),
                 "reason": m.health.reason, "breaker": m.breaker.state.name.lower(), "picks": m.slot.picks,
                 "outstanding": m.slot.outstanding, "weight": m.slot.weight} for m in self.members]  # fmt: skip
