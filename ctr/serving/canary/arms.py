"""The gateway's two arms: `stable` and `canary` (a pool of the rollout's URLs, built when a
rollout starts and closed when it ends).

`route(user_id)` picks the arm from the runtime's current rollout (sticky split; none when
the store has been unreachable for CTR_CANARY_STALE_S); `record` adds the request to that
arm's counters. The stable arm is the gateway's own pool (CTR_MODEL_URLS), or, once a
rollout was promoted, a pool of the promoted canary's URLs: it serves every user as
`stable`, and every later rollout is judged against it, until this gateway itself runs the
promoted model tag (its own pool then serves it). A rollback sends everyone back to stable
at once. A pool is built only for URLs on an allowed host (CTR_CANARY_ALLOWED_HOSTS): the
gateway's internal token goes to no other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

import numpy as np

from ctr.serving.canary.controller import stable_arm
from ctr.serving.canary.runtime import CanaryRuntime
from ctr.serving.canary.split import arm_of, in_baseline
from ctr.serving.canary.state import Arm, Rollout

log = logging.getLogger(__name__)


class Pool(Protocol):
    async def submit(self, x: np.ndarray, key: str | None = None) -> np.ndarray: ...
    async def start(self, background: bool = True) -> None: ...
    async def close(self) -> None: ...


PoolFactory = Callable[[tuple[str, ...]], Pool]


class Arms:
    def __init__(
        self,
        runtime: CanaryRuntime,
        stable: Pool,
        stable_version: str,
        make_pool: PoolFactory,
    ) -> None:
        self.runtime = runtime
        self.stable = stable
        self.stable_version = stable_version
        self.make_pool = make_pool
        self.pools: dict[tuple[str, ...], Pool] = {}  # by replica URLs: the canary's, a promoted stable's
        self.baseline: Pool | None = None  # stable's model on the canary's capacity (Kayenta's baseline)
        self._baseline_for: str | None = None  # the rollout it was built for
        self._refused: set[tuple[str, ...]] = set()  # URL sets refused a pool (logged once)
        self._task: asyncio.Task[None] | None = None

    def urls(self, r: Rollout) -> tuple[str, ...]:
        return r.canary.urls or self.runtime.canary_urls

    @property
    def canary(self) -> Pool | None:
        """The canary's pool under the current rollout, when built."""
        r = self.runtime.current()
        return None if r is None else self.pools.get(self.urls(r))

    @property
    def shadow_pool(self) -> Pool | None:
        """The canary's pool while its rollout runs, also at share 0 (the shadow phase scores
        stable's requests on it; `canary` is only the pool users are routed to)."""
        r = self.runtime.rollout
        return None if r is None or not r.active else self.pools.get(self.urls(r))

    def stable_arm(self, r: Rollout | None) -> tuple[Pool, str]:
        """(pool, model version) of the stable arm: a promoted canary's pool until this gateway runs
        its tag, else the gateway's own."""
        promoted = stable_arm(r)
        if promoted is None or promoted[0].tag == self.stable_version:
            return self.stable, self.stable_version
        pool = self.pools.get(promoted[0].urls)
        return (self.stable, self.stable_version) if pool is None else (pool, promoted[0].tag)

    def route(self, user_id: str) -> tuple[str, Pool, str]:
        """(arm, pool, model version) for this user's request."""
        stable, version = self.stable_arm(self.runtime.rollout)
        r = self.runtime.current()
        canary = None if r is None else self.pools.get(self.urls(r))
        if r is None or canary is None:
            return "stable", stable, version
        if arm_of(user_id, r.salt, r.share) == "canary":
            return "canary", canary, r.canary.tag
        if self._baseline_serves(r, user_id):
            return "stable", self.baseline, self.stable_version  # type: ignore[return-value]
        return "stable", stable, version

    def _baseline_serves(self, r: Rollout | None, user_id: str) -> bool:
        """Whether this stable user is the baseline's (stable's own model at the canary's capacity:
        not while a promoted canary is the stable arm, which the baseline does not run)."""
        return (
            self.baseline is not None
            and r is not None
            and in_baseline(user_id, r.salt, r.share)
            and self.stable_arm(r)[0] is self.stable
        )

    def record(self, arm: str, latency_s: float, failed: bool, user_id: str = "") -> None:
        """Count the request for its arm; a stable user served by the baseline counts as `baseline`
        (the latency gate's reference: the same capacity as the canary)."""
        if arm == "stable" and self._baseline_serves(self.runtime.current(), user_id):
            arm = "baseline"
        self.runtime.record_request(arm, latency_s, failed, self.runtime.unit(user_id))

    def _wanted(self, r: Rollout | None) -> set[tuple[str, ...]]:
        """The replica URL sets this rollout needs a pool for, on allowed hosts only."""
        wanted: set[tuple[str, ...]] = set()
        if r is not None and r.active and self.urls(r):
            wanted.add(self.urls(r))
        promoted: tuple[Arm, str] | None = stable_arm(r)
        if promoted is not None and promoted[0].tag != self.stable_version and promoted[0].urls:
            wanted.add(promoted[0].urls)
        for urls in list(wanted):
            refused = self.runtime.hosts.refused(urls)
            if refused:
                wanted.discard(urls)
                if urls not in self._refused:  # once, not every sync
                    self._refused.add(urls)
                    log.error("no pool for %s: not on an allowed host (CTR_CANARY_ALLOWED_HOSTS)", ", ".join(refused))
        return wanted

    async def sync(self) -> None:
        """Sync the rollout, then build or close the pools to match it."""
        await self.runtime.sync()
        r = self.runtime.rollout
        wanted = self._wanted(r)
        for urls in set(self.pools) - wanted:
            await self.pools.pop(urls).close()
        for urls in wanted - set(self.pools):
            pool = self.make_pool(urls)
            await pool.start()
            self.pools[urls] = pool
            log.info("model pool for %s (rollout %s, %s)", ", ".join(urls), r.id if r else "-", r.status if r else "-")
        baseline_for = r.id if r is not None and r.active and self.runtime.baseline_urls else None
        if baseline_for != self._baseline_for:
            if self.baseline is not None:
                await self.baseline.close()
            self.baseline, self._baseline_for = None, baseline_for
            if baseline_for is not None:
                self.baseline = self.make_pool(self.runtime.baseline_urls)
                await self.baseline.start()
                self._baseline_for = baseline_for

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sync()
            except ValueError as exc:  # a pool that cannot be built from the rollout's URLs
                log.warning("canary arm not built: %s", exc)
            except Exception:  # the loop must outlive any one bad round (corrupt state, a bug)
                log.exception("canary arm sync failed; keeping the last split")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.runtime.sync_s)

    def start(self) -> None:
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.run(self._stop))
        if self.runtime.served is not None:
            self.runtime.served.start()

    async def close(self) -> None:
        if self._task is not None:
            self._stop.set()
            await asyncio.wait({self._task}, timeout=2)
        await self.runtime.close()
        for p in (*self.pools.values(), self.baseline):
            if p is not None:
                await p.close()
        self.pools.clear()
