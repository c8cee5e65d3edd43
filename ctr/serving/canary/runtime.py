"""One gateway process's live view of the rollout: the split it serves, the counters it
buffers, and the background loop that syncs both with the shared store.

The hot path never waits on Redis: `arm()` reads the last known rollout, `record_*` add to
an in-memory delta. The loop (every `sync_s`) flushes the delta, reloads the rollout and,
every plan interval, lets the controller step (only the lease holder decides).

When Redis is down the process keeps serving the last known split, keeps its counters
(flushed once Redis answers), and says so (`stale_since`, `error` in `status()`). When
Redis comes back empty (restarted without persistence) the last known rollout and its
counters are put back (SET NX: the first process to notice wins), so the rollout resumes
where it was instead of silently ending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson
from redis.exceptions import RedisError

from ctr.serving.canary.controller import Clock, Controller
from ctr.serving.canary.counts import N_UNITS, Counts, stratum_key
from ctr.serving.canary.plan import Plan
from ctr.serving.canary.split import arm_of, unit_of
from ctr.serving.canary.state import Rollout, Store
from ctr.serving.canary.stats import evaluate

log = logging.getLogger(__name__)
STORE_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)


class CanaryRuntime:
    def __init__(
        self,
        store: Store,
        controller: Controller,
        clock: Clock = time.time,
        sync_s: float = 1.0,
        canary_urls: tuple[str, ...] = (),
        baseline_urls: tuple[str, ...] = (),
    ) -> None:
        self.store = store
        self.baseline_urls = baseline_urls  # CTR_CANARY_BASELINE_URLS: stable's model at the canary's size
        self.canary_urls = canary_urls  # CTR_CANARY_URLS: for a rollout started with a model tag only
        self.controller = controller
        self.clock = clock
        self.sync_s = sync_s
        self.rollout: Rollout | None = None
        self.counters: Counts | None = None  # last snapshot read back
        self.stale_since: float | None = None
        self.error = ""
        self._delta = Counts()
        self._last_step = -float("inf")
        self._task: asyncio.Task[None] | None = None

    # ---- hot path ----------------------------------------------------------------------
    def arm(self, user_id: str) -> str:
        """`canary` or `stable` for this user under the last known rollout."""
        r = self.rollout
        if r is None or not r.active or r.share <= 0:
            return "stable"
        return arm_of(user_id, r.salt, r.share)

    def unit(self, user_id: str) -> int:
        """The user's unit (hash sub-bucket) under the last known rollout; 0 without one."""
        r = self.rollout
        return 0 if r is None else unit_of(user_id, r.salt, N_UNITS)

    def _stratum(self, r: Rollout) -> str:
        return stratum_key(r.phase, self.clock(), self.controller.cfg.stratum_s)

    def record_request(self, arm: str, latency_s: float, error: bool, unit: int = 0) -> None:
        """One answered request of `arm`, for the user in `unit` (see `unit`)."""
        r = self.rollout
        if r is None or not r.active:
            return
        self._delta.record_request(arm, self._stratum(r), unit % N_UNITS, latency_s * 1000.0, error)

    def record_feedback(self, arm: str, clicked: bool, score: float | None = None, unit: int = 0) -> None:
        """One shown ad's outcome; `score` (the predicted CTR served for it) feeds the calibration gate.
        Counted in the stratum (phase, clock slot) it arrives in: feedback follows its request within
        seconds, so the arms' feedback shares the same time and share."""
        r = self.rollout
        if r is None or not r.active:
            return
        self._delta.record_feedback(arm, self._stratum(r), unit % N_UNITS, clicked, score)

    # ---- sync ---------------------------------------------------------------------------
    async def sync(self) -> None:
        """Reload the rollout (restoring it if Redis lost it), flush counters, maybe step."""
        try:
            loaded = await self.store.load()
            if loaded is None and self.rollout is not None and self.rollout.active:
                if await self.store.restore(self.rollout, self.counters or Counts()):
                    log.warning("canary state was lost from the store; restored rollout %s", self.rollout.id)
                loaded = await self.store.load()
            await self._flush()  # after a restore, so what was buffered adds to the restored counters
            self.rollout = loaded
            if loaded is not None and loaded.active:
                self.counters = await self.store.counters(loaded.id)
                now = self.clock()
                if now - self._last_step >= Plan.from_dict(loaded.plan).interval_s:
                    self._last_step = now
                    await self.controller.step()
                    self.rollout = await self.store.load()
            self.stale_since, self.error = None, ""
        except STORE_ERRORS as exc:
            self._unavailable(exc)

    def _unavailable(self, exc: BaseException) -> None:
        if self.stale_since is None:
            self.stale_since = self.clock()
            log.warning("canary store unavailable; serving the last known split: %s", exc)
        self.error = f"{type(exc).__name__}: {exc}"

    async def refresh(self) -> None:
        """Reload the rollout and its counters (no decision): what GET /admin/canary shows."""
        try:
            loaded = await self.store.load()
            if loaded is not None:
                self.counters = await self.store.counters(loaded.id)
                self.rollout = loaded
            elif self.rollout is None or not self.rollout.active:
                self.rollout = loaded  # a lost active rollout stays until sync() restores it
        except STORE_ERRORS as exc:
            self._unavailable(exc)

    async def _flush(self) -> None:
        r = self.rollout
        if r is None or self._delta.empty():
            return
        delta, self._delta = self._delta, Counts()
        try:
            await self.store.add(r.id, delta)
        except STORE_ERRORS:
            self._delta.add(delta)  # keep them for the next try
            raise

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sync()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.sync_s)

    def start(self) -> None:
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.run(self._stop))

    async def close(self) -> None:
        if self._task is not None:
            self._stop.set()
            await asyncio.wait({self._task}, timeout=2)
            with contextlib.suppress(*STORE_ERRORS):
                await self._flush()

    def status(self) -> dict[str, Any]:
        """What GET /admin/canary shows from this process's view."""
        r = self.rollout
        out: dict[str, Any] = {"store": "ok" if self.stale_since is None else "unavailable"}
        if self.stale_since is not None:
            out["store_error"] = self.error
            out["serving_last_known_split_since"] = self.stale_since
        if r is None:
            return {**out, "status": "none"}
        out.update(orjson.loads(r.to_json()))
        if self.counters is not None:
            n_phases = Plan.from_dict(r.plan).n_phases()
            gates = evaluate(self.counters, self.controller.cfg, r.phase, n_phases)
            arms = {a for a, _ in self.counters.cells} | {"stable", "canary"}
            out["arms"] = {a: self.counters.total(a).to_dict() for a in sorted(arms)}
            out["gates"] = {k: g.to_dict() for k, g in gates.items()}
        return out
