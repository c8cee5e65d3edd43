"""The rollout controller: starts a rollout, evaluates the gates each interval, and
advances, holds, promotes or rolls back; manual pause/resume/promote/rollback.

Every change goes through `Store.transition` (compare-and-set on the state's version), and
the automatic step runs only in the process holding the lease, so among many gateway
processes one decision is made once. Pure decision: `decide(rollout, gates, now)`.
"""

from __future__ import annotations

import math
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ctr.serving.canary.counts import Counts
from ctr.serving.canary.plan import Plan
from ctr.serving.canary.state import Arm, Rollout, Store
from ctr.serving.canary.stats import DEFAULT_GATES, GateConfig, GateResult, evaluate

Clock = Callable[[], float]
MAX_HISTORY = 200


class CanaryError(ValueError):
    """A manual action that does not apply to the current state (409 over HTTP)."""


@dataclass(frozen=True, slots=True)
class Decision:
    action: str  # advance | promote | rollback | hold | wait
    reason: str
    gate: GateResult | None = None


def harm_since(r: Rollout, gates: dict[str, GateResult], now: float) -> dict[str, float]:
    """When each gate's current run of harm verdicts began (gates not in harm are dropped)."""
    return {n: r.harm_since.get(n, now) for n, g in gates.items() if g.verdict == "harm"}


def decide(r: Rollout, gates: dict[str, GateResult], now: float, cfg: GateConfig = DEFAULT_GATES) -> Decision:
    """What the gates say for a running rollout at `now`. Latency harm must have lasted
    `cfg.latency_persist_s` (one stall is not a regression); other gates roll back at once."""
    plan = Plan.from_dict(r.plan)
    since = harm_since(r, gates, now)
    persist = {"latency": cfg.latency_persist_s}
    harmed = [g for n, g in gates.items() if n in since and now - since[n] >= persist.get(n, 0.0)]
    if harmed:
        g = harmed[0]
        return Decision(
            "rollback",
            f"{g.gate} gate: harm ({g.margin}): estimate {g.estimate:.4g}, "
            f"always-valid interval [{g.lo:.4g}, {g.hi:.4g}]",
            g,
        )
    if r.status == "held":
        return Decision("wait", f"held for a person: {r.reason}")
    elapsed = now - r.phase_started_at
    min_s = plan.min_duration_s(r.phase)
    if elapsed < min_s:
        return Decision("wait", f"phase {r.phase} minimum time: {elapsed:.0f} of {min_s:.0f} s")
    pending = [gates[n] for n in plan.required(r.phase) if gates[n].verdict != "ok"]
    if not pending:
        last = r.phase + 1 >= plan.n_phases()
        return Decision("promote" if last else "advance", "every required gate shows non-inferiority")
    if elapsed >= min_s * plan.max_phase_factor and min_s > 0:
        g = pending[0]
        why = (
            f"{g.gate} gate {g.verdict} after {elapsed:.0f} s (max {min_s * plan.max_phase_factor:.0f} s): "
            f"estimate {g.estimate:.4g}, interval [{g.lo:.4g}, {g.hi:.4g}]"
        )
        return Decision("rollback" if plan.on_timeout == "rollback" else "hold", why, g)
    return Decision("wait", "waiting for evidence: " + ", ".join(f"{g.gate} {g.verdict}" for g in pending))


def _entry(
    now: float,
    action: str,
    r: Rollout,
    by: str,
    reason: str,
    gate: GateResult | None = None,
    gates: dict[str, GateResult] | None = None,
) -> dict[str, Any]:
    e: dict[str, Any] = {"at": now, "action": action, "phase": r.phase, "share": r.share, "by": by, "reason": reason}
    if gate is not None:
        e["gate"] = gate.to_dict()
    if gates is not None:
        e["gates"] = {k: g.to_dict() for k, g in gates.items()}
    return e


def _log(r: Rollout, entry: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    return (*r.history, entry)[-MAX_HISTORY:]


class Controller:
    def __init__(
        self,
        store: Store,
        gates: GateConfig = DEFAULT_GATES,
        clock: Clock = time.time,
        owner: str | None = None,
        lease_s: float = 10.0,
        new_id: Callable[[], str] = lambda: secrets.token_hex(8),
        paired: Callable[[str], Awaitable[GateResult]] | None = None,
    ) -> None:
        self.store = store
        self.cfg = gates
        self.clock = clock
        self.owner = owner or uuid.uuid4().hex[:12]
        self.lease_s = lease_s
        self.new_id = new_id  # a rollout's id and salt (injected: the simulator's runs repeat exactly)
        self.last_gates: dict[str, GateResult] = {}
        self.paired = paired  # the shadow phase's evidence (shadow.Shadow.gate): rollout id -> paired gate

    # ---- manual actions -------------------------------------------------------------
    async def start(self, stable: Arm, canary: Arm, plan: Plan, by: str = "admin") -> Rollout:
        """Start `canary` against the stable arm: the last promoted canary when there is one (see
        `stable_arm`), else `stable` (the gateway's own)."""
        now = self.clock()

        def fn(cur: Rollout | None) -> Rollout:
            if cur is not None and cur.active:
                raise CanaryError(f"rollout {cur.id} is {cur.status}; promote or roll it back first")
            base, source = stable_arm(cur) or (stable, "")
            share = plan.share(0, 0.0, 0.0)
            r = Rollout(
                self.new_id()[:12],
                base,
                canary,
                plan.to_dict(),
                self.new_id(),
                "running",
                0,
                share,
                now,
                now,
                stable_from=source,
            )
            return r.with_(history=(_entry(now, "start", r, by, f"canary {canary.tag} against {base.tag}"),))

        out = await self.store.transition(fn)
        assert out is not None
        return out

    async def _manual(
        self, action: str, by: str, allowed: tuple[str, ...], change: Callable[[Rollout, float], Rollout], reason: str
    ) -> Rollout:
        now = self.clock()

        def fn(cur: Rollout | None) -> Rollout:
            if cur is None or cur.status not in allowed:
                state = "no rollout" if cur is None else f"rollout {cur.id} is {cur.status}"
                raise CanaryError(f"cannot {action}: {state}")
            new = change(cur, now)
            return new.with_(history=_log(new, _entry(now, action, new, by, reason)))

        out = await self.store.transition(fn)
        assert out is not None
        return out

    async def pause(self, by: str = "admin", reason: str = "paused by hand") -> Rollout:
        return await self._manual(
            "pause", by, ("running", "held"), lambda r, now: r.with_(status="paused", paused_at=now), reason
        )

    async def resume(self, by: str = "admin", reason: str = "resumed by hand") -> Rollout:
        def change(r: Rollout, now: float) -> Rollout:
            if r.status == "held":  # a person gives the phase another full window (its data still counts)
                return r.with_(status="running", paused_at=None, phase_started_at=now)
            shift = now - r.paused_at if r.paused_at is not None else 0.0  # a pause stops the phase clock
            return r.with_(status="running", paused_at=None, phase_started_at=r.phase_started_at + shift)

        return await self._manual("resume", by, ("paused", "held"), change, reason)

    async def promote(self, by: str = "admin", reason: str = "promoted by hand") -> Rollout:
        return await self._manual("promote", by, ("running", "paused", "held"), _promoted, reason)

    async def rollback(self, by: str = "admin", reason: str = "rolled back by hand") -> Rollout:
        def change(r: Rollout, now: float) -> Rollout:
            return r.with_(status="rolled_back", share=0.0, reason=reason)

        return await self._manual("rollback", by, ("running", "paused", "held"), change, reason)

    # ---- the automatic step ----------------------------------------------------------
    async def gates(self, r: Rollout) -> tuple[Counts, dict[str, GateResult]]:
        counters = await self.store.counters(r.id)
        plan = Plan.from_dict(r.plan)
        gates = evaluate(counters, self.cfg, r.phase, plan.n_phases())
        if plan.is_shadow(r.phase):  # no user sees the canary: the paired gate decides (shadow.py)
            gates["paired"] = await self.paired(r.id) if self.paired else no_paired_evidence()
        return counters, gates

    async def step(self) -> Decision | None:
        """Evaluate once, if this process holds the lease and a rollout is running (or held:
        a held rollout does not advance, but harm still rolls it back)."""
        r = await self.store.load()
        if r is None or r.status not in ("running", "held") or not await self.store.lease(self.owner, self.lease_s):
            return None
        now = self.clock()
        _, gates = await self.gates(r)
        self.last_gates = gates  # what the simulator reads (every look, not only decisions)
        d = decide(r, gates, now, self.cfg)
        since = harm_since(r, gates, now)
        plan = Plan.from_dict(r.plan)
        seen = r.version

        def fn(cur: Rollout | None) -> Rollout | None:
            if cur is None or cur.version != seen:
                return None  # someone else changed it meanwhile: this evaluation is stale
            if d.action == "rollback":
                new = cur.with_(status="rolled_back", share=0.0, reason=d.reason)
            elif d.action == "promote":
                new = _promoted(cur, now).with_(reason=d.reason)
            elif d.action == "advance":
                share = plan.share(cur.phase + 1, 0.0, now - cur.started_at)
                new = cur.with_(phase=cur.phase + 1, share=share, phase_started_at=now)
            elif d.action == "hold":
                new = cur.with_(status="held", reason=d.reason)
            else:
                share = plan.share(cur.phase, now - cur.phase_started_at, now - cur.started_at)
                if math.isclose(share, cur.share) and since == cur.harm_since:
                    return None
                return cur.with_(share=share, harm_since=since)  # a ramp grows, a harm run starts or ends
            new = new.with_(harm_since={} if d.action in ("advance", "promote") else since)
            return new.with_(history=_log(new, _entry(now, d.action, new, "controller", d.reason, d.gate, gates)))

        applied = await self.store.transition(fn)
        return d if applied is not None or d.action == "wait" else None


def no_paired_evidence() -> GateResult:
    """A shadow phase in a process that cannot join pairs: never harm, never ok (it holds)."""
    return GateResult("paired", "insufficient", math.nan, -math.inf, math.inf, "no shadow evidence here", 0)


def stable_arm(r: Rollout | None) -> tuple[Arm, str] | None:
    """The stable arm a promotion made, and the id of the rollout that promoted it: the canary of
    a promoted rollout, or a later rollout's stable that came from one; None: the gateway's own."""
    if r is None:
        return None
    if r.status == "promoted":
        return r.canary, r.id
    return (r.stable, r.stable_from) if r.stable_from else None


def _promoted(r: Rollout, now: float) -> Rollout:
    """The canary becomes the new stable; the rollout ends (the gateway serves one arm again)."""
    return r.with_(status="promoted", share=1.0, phase=Plan.from_dict(r.plan).n_phases())
