"""The gateway's two arms: `stable` (the pool of CTR_MODEL_URLS) and `canary` (a pool of
the rollout's URLs, built when a rollout starts and closed when it ends).

`route(user_id)` picks the arm from the last known rollout (sticky split); `record` adds
the request to that arm's counters. After a promotion the canary's pool serves everyone
as `stable` until this gateway itself runs the promoted model tag (its stable pool then
serves it); a rollback sends everyone back to the stable pool at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

import numpy as np

from ctr.serving.canary.runtime import CanaryRuntime
from ctr.serving.canary.split import arm_of, in_baseline
from ctr.serving.canary.state import Rollout

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
        self.canary: Pool | None = None
        self.baseline: Pool | None = None  # stable's model on the canary's capacity (Kayenta's baseline)
        self._canary_key: tuple[str, tuple[str, ...]] | None = None
        self._task: asyncio.Task[None] | None = None

    def urls(self, r: Rollout) -> tuple[str, ...]:
        return r.canary.urls or self.runtime.canary_urls

    def route(self, user_id: str) -> tuple[str, Pool, str]:
        """(arm, pool, model version) for this user's request."""
        r, canary = self.runtime.rollout, self.canary
        if r is None or canary is None or self._canary_key != (r.id, self.urls(r)):
            return "stable", self.stable, self.stable_version
        if r.status == "promoted":
            if r.canary.tag == self.stable_version:
                return "stable", self.stable, self.stable_version
            return "stable", canary, r.canary.tag
        if r.active and r.share > 0 and arm_of(user_id, r.salt, r.share) == "canary":
            return "canary", canary, r.canary.tag
        if self.baseline is not None and r.active and in_baseline(user_id, r.salt, r.share):
            return "stable", self.baseline, self.stable_version
        return "stable", self.stable, self.stable_version

    def record(self, arm: str, latency_s: float, failed: bool, user_id: str = "") -> None:
        """Count the request for its arm; a stable user served by the baseline counts as `baseline`
        (the latency gate's reference: the same capacity as the canary)."""
        r = self.runtime.rollout
        if arm == "stable" and self.baseline is not None and r is not None and in_baseline(user_id, r.salt, r.share):
            arm = "baseline"
        self.runtime.record_request(arm, latency_s, failed, self.runtime.unit(user_id))

    async def sync(self) -> None:
        """Sync the rollout, then build or close the canary pool to match it."""
        await self.runtime.sync()
        r = self.runtime.rollout
        wanted = None
        if r is not None and (r.active or (r.status == "promoted" and r.canary.tag != self.stable_version)):
            wanted = (r.id, self.urls(r)) if self.urls(r) else None
        if wanted == self._canary_key:
            return
        old, self.canary, self._canary_key = self.canary, None, None
        old_baseline, self.baseline = self.baseline, None
        for p in (old, old_baseline):
            if p is not None:
                await p.close()
        if wanted is not None:
            pool = self.make_pool(wanted[1])
            await pool.start()
            self.canary, self._canary_key = pool, wanted
            log.info("canary arm: rollout %s, replicas %s", wanted[0], ", ".join(wanted[1]))
            if self.runtime.baseline_urls and r is not None and r.active:
                self.baseline = self.make_pool(self.runtime.baseline_urls)
                await self.baseline.start()

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

    async def close(self) -> None:
        if self._task is not None:
            self._stop.set()
            await asyncio.wait({self._task}, timeout=2)
        await self.runtime.close()
        for p in (self.canary, self.baseline):
            if p is not None:
                await p.close()
