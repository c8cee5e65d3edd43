"""One gateway process's live view of the rollout: the split it serves, the counters it
buffers, and the background loop that syncs both with the shared store.

The hot path never waits on Redis: `arm()` reads the last known rollout, `record_*` add to
an in-memory delta. The loop (every `sync_s`) flushes the delta, reloads the rollout and,
every plan interval, lets the controller step (only the lease holder decides).

Decisions stick (issue 23):
- Redis down: the last known split is served, counters are kept (flushed once Redis
  answers), and `status()` says so; past `stale_s` (CTR_CANARY_STALE_S) without reaching the
  store, every user goes to stable (`current()` is None) until it answers again.
- Ended rollouts are remembered: in the store (its `ended` set), in this process, and on this
  machine (`Tombstones`, read by every process each sync, even while Redis is down). When
  the store comes back without a decision this process knows (Redis restarted empty, a
  failover to a replica that missed it), the decision is put back; an active rollout is
  restored (SET NX, the first process to notice wins) only when nothing says it ended.
- A person can roll back while Redis is down (`rollback_here`): the decision is recorded
  in this process and on this machine at once (the machine's other processes follow within
  one sync), and pushed to Redis by whichever process holding it reaches Redis first; other
  machines send everyone to stable after `stale_s` and see the decision when Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson
from redis.exceptions import RedisError

from ctr.serving.canary.controller import CanaryError, Clock, Controller, _entry, _log
from ctr.serving.canary.counts import N_UNITS, Counts, stratum_key
from ctr.serving.canary.hosts import HostPolicy
from ctr.serving.canary.plan import Plan
from ctr.serving.canary.served import ServedLog
from ctr.serving.canary.split import arm_of, unit_of
from ctr.serving.canary.state import Rollout, Store
from ctr.serving.canary.stats import evaluate
from ctr.serving.canary.tombstones import Tombstones

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
        stale_s: float = 30.0,
        tombstones: Tombstones | None = None,
        served: ServedLog | None = None,
        hosts: HostPolicy | None = None,
    ) -> None:
        self.store = store
        self.stale_s = stale_s  # CTR_CANARY_STALE_S: past it without the store, everyone is stable
        self.tombstones = tombstones  # ended rollouts remembered on this machine
        self.served = served  # what each answer served, for /feedback (ctr.serving.canary.served)
        self.hosts = hosts or HostPolicy()  # CTR_CANARY_ALLOWED_HOSTS: where replica URLs may point
        self.baseline_urls = baseline_urls  # CTR_CANARY_BASELINE_URLS: stable's model at the canary's size
        self.canary_urls = canary_urls  # CTR_CANARY_URLS: for a rollout started with a model tag only
        self.controller = controller
        self.clock = clock
        self.sync_s = sync_s
        self.rollout: Rollout | None = None
        self.counters: Counts | None = None  # last snapshot read back
        self.stale_since: float | None = None
        self.error = ""
        self.ended: dict[str, Rollout] = {}  # rollouts this process knows to have ended, by id
        self._delta = Counts()
        self._last_step = -float("inf")
        self._task: asyncio.Task[None] | None = None

    # ---- hot path ----------------------------------------------------------------------
    def current(self) -> Rollout | None:
        """The rollout whose split this process serves now: the last known one while it is active,
        unless the store has not answered for `stale_s` (then None: every user is stable)."""
        r = self.rollout
        if r is None or not r.active or r.share <= 0:
            return None
        if self.stale_since is not None and self.clock() - self.stale_since >= self.stale_s:
            return None
        return r

    def active_id(self) -> str:
        """The id of `current()`, "" without one (what an answer's request id carries)."""
        r = self.current()
        return "" if r is None else r.id

    def arm(self, user_id: str) -> str:
        """`canary` or `stable` for this user under `current()`."""
        r = self.current()
        return "stable" if r is None else arm_of(user_id, r.salt, r.share)

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
        """Reload the rollout (putting back what Redis lost), flush counters, maybe step."""
        self._follow_ends()  # this machine's decisions apply even while the store is down
        try:
            loaded = await self._reconcile(await self.store.load())
            await self._flush()  # after a restore, so what was buffered adds to the restored counters
            self.adopt(loaded)
            if loaded is not None and loaded.active:
                self.counters = await self.store.counters(loaded.id)
                now = self.clock()
                if now - self._last_step >= Plan.from_dict(loaded.plan).interval_s:
                    self._last_step = now
                    await self.controller.step()
                    self.adopt(await self.store.load())
            self.stale_since, self.error = None, ""
        except STORE_ERRORS as exc:
            self.unavailable(exc)

    def adopt(self, r: Rollout | None) -> None:
        """Take `r` (read from the store, or just written to it) as this process's view."""
        if r is not None and not r.active and r.id not in self.ended:
            self._remember_end(r)
        self.rollout = r

    def _remember_end(self, r: Rollout) -> None:
        self.ended[r.id] = r
        if self.tombstones is not None:
            self.tombstones.write(r)

    def _follow_ends(self) -> None:
        """Ends recorded on this machine (by any of its processes) replace an active view."""
        if self.tombstones is not None:
            for rid, r in self.tombstones.read().items():
                self.ended.setdefault(rid, r)
        r = self.rollout
        if r is not None and r.active and r.id in self.ended:
            self.rollout = self.ended[r.id]

    async def _reconcile(self, loaded: Rollout | None) -> Rollout | None:
        """The store's rollout, after putting back what it lost: an end this process knows for a
        rollout it shows active, or, when it holds nothing, the last rollout this process saw."""
        if loaded is not None and loaded.active and loaded.id in self.ended:
            end = self.ended[loaded.id]
            pushed = await self.store.transition(lambda cur: _reapplied(cur, end, self.clock()))
            if pushed is not None:
                log.warning("canary store showed rollout %s %s; put back its end (%s)", end.id, loaded.status,
                            end.status)  # fmt: skip
            return await self.store.load()
        if loaded is None and self.rollout is not None:
            r = self.ended.get(self.rollout.id, self.rollout)
            if await self.store.restore(r, (self.counters or Counts()) if r.active else Counts()):
                log.warning("canary state was lost from the store; restored rollout %s (%s)", r.id, r.status)
            return await self.store.load()
        return loaded

    def unavailable(self, exc: BaseException) -> None:
        if self.stale_since is None:
            self.stale_since = self.clock()
            log.warning("canary store unavailable; serving the last known split for up to %.0f s: %s",
                        self.stale_s, exc)  # fmt: skip
        self.error = f"{type(exc).__name__}: {exc}"

    def rollback_here(self, by: str, reason: str) -> Rollout:
        """Roll back without the store (it is unreachable): decided in this process and recorded on
        this machine now; put into the store by the first process holding it that reaches it."""
        r = self.rollout
        if r is None or not r.active:
            raise CanaryError(f"cannot rollback: {'no rollout' if r is None else f'rollout {r.id} is {r.status}'}")
        now = self.clock()
        ended = r.with_(status="rolled_back", share=0.0, reason=reason)
        note = f"{reason} (the canary store was unreachable: recorded on this machine, put into the store later)"
        ended = ended.with_(history=_log(ended, _entry(now, "rollback", ended, by, note)))
        self._remember_end(ended)
        self.rollout = ended
        return ended

    async def refresh(self) -> None:
        """Reload the rollout and its counters (no decision): what GET /admin/canary shows."""
        try:
            loaded = await self.store.load()
            if loaded is not None:
                self.counters = await self.store.counters(loaded.id)
                if not (loaded.active and loaded.id in self.ended):  # sync() puts that end back
                    self.adopt(loaded)
            elif self.rollout is None or not self.rollout.active:
                self.rollout = loaded  # a lost active rollout stays until sync() restores it
        except STORE_ERRORS as exc:
            self.unavailable(exc)

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
        if self.served is not None:
            await self.served.close()

    def status(self) -> dict[str, Any]:
        """What GET /admin/canary shows from this process's view (salt, URLs, errors included)."""
        r = self.rollout
        out: dict[str, Any] = {"store": "ok" if self.stale_since is None else "unavailable"}
        if self.stale_since is not None:
            out["store_error"] = self.error
            out["serving_last_known_split_since"] = self.stale_since
            out["everyone_stable"] = self.current() is None and r is not None and r.active
        if r is None:
            return {**out, "status": "none"}
        out.update(orjson.loads(r.to_json()))
        out.update(self._gates(r))
        return out

    def public_status(self) -> dict[str, Any]:
        """The public status page's canary panel: no salt (the split could be computed offline), no
        replica URL, no store error text, no decision history (its reasons are free text)."""
        r = self.rollout
        out: dict[str, Any] = {"store": "ok" if self.stale_since is None else "unavailable"}
        if r is None:
            return {**out, "status": "none"}
        serving = self.current() is not None
        out.update(id=r.id, status=r.status, phase=r.phase, share=r.share, serving_share=r.share if serving else 0.0,
                   stable=r.stable.tag, canary=r.canary.tag, started_at=r.started_at)  # fmt: skip
        return {**out, **self._gates(r)}

    def _gates(self, r: Rollout) -> dict[str, Any]:
        if self.counters is None:
            return {}
        n_phases = Plan.from_dict(r.plan).n_phases()
        gates = evaluate(self.counters, self.controller.cfg, r.phase, n_phases)
        arms = {a for a, _ in self.counters.cells} | {"stable", "canary"}
        return {"arms": {a: self.counters.total(a).to_dict() for a in sorted(arms)},
                "gates": {k: g.to_dict() for k, g in gates.items()}}  # fmt: skip


def _reapplied(cur: Rollout | None, end: Rollout, now: float) -> Rollout | None:
    """`end` again over the store's `cur` (the same rollout, shown active): the decision stands."""
    if cur is None or cur.id != end.id or not cur.active:
        return None
    action = {"rolled_back": "rollback", "promoted": "promote"}[end.status]
    why = f"{end.reason or end.status} (put back: the canary store had lost this decision)"
    return end.with_(history=_log(end, _entry(now, action, end, "gateway", why)))
