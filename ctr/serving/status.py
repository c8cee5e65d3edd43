"""The status document of one gateway process (`GET /status.json`, and the page built from it).

The document is a list of panels, each made by a provider: `async (Sources) -> dict | None`.
A provider returns None when its part does not exist in this process, and its panel is left
out; so a panel appears when its part lands. Two hooks are waiting for parts being built:

- `pool`: the gateway's `pool` attribute (ctr/serving/pool/), when it has a `status()`
  method returning a JSON-able dict (e.g. `{"replicas": [{"name", "url", "healthy",
  "ejected", "ejections", ...}]}`; `status()` may be async);
- `canary`: the gateway's `canary` attribute (ctr/serving/canary/), its `public_status()`
  (phase, share, per-arm counts, gates; never the salt, a replica URL or a store error).

The document is public: it names no address (replicas by pool and slot, as in the metrics'
labels), no secret and no store error text (the logs have them).

`StatusBoard.add(panel_id, title, provider)` adds any other panel. Lists of dicts render
as tables and scalars as figures, so a new part needs no HTML of its own.

Whose figures: each gateway process keeps its own (its SLI recorder, L1 cache, breakers).
Under `bentoml serve` (a shared multiprocess directory, ctr/serving/fleet.py) the document
speaks for every gateway process of the server: traffic, SLOs, stages, cache, breakers and
fallbacks are merged, and the `processes` panel breaks them down per process. Without that
directory (in-process tests) it speaks for this process; `scope` says which.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ctr.features.store import TieredStore
from ctr.features.writes import GROUP, STREAM
from ctr.observe.sli import STAGE_BUDGET_MS, STAGE_TOTAL_MS, WINDOWS_S, SliRecorder, finite
from ctr.resilience.breaker import Breakers
from ctr.serving import fleet as fleet_mod

Panel = dict[str, Any]
WAIT_S = 0.25  # most a provider may take (write-behind asks Redis)


@dataclass
class Sources:
    """What the providers read; anything may be absent (None)."""

    recorder: SliRecorder
    gateway: Any = None
    store: TieredStore | None = None
    stream: Any = None  # the write-behind stream's Redis client
    workers: int = 1
    cache_history: deque[tuple[float, dict[str, int]]] = field(default_factory=lambda: deque(maxlen=660))
    fleet_dir: Path | None = None  # where the gateway processes publish (fleet.directory()); None: this one only
    breakers: Breakers | None = None  # this process's breakers (the composition root's registry)
    fleet: fleet_mod.Fleet | None = None  # set on the copy a document is built from


Provider = Callable[[Sources], Awaitable[Panel | None]]


def _r(x: float | None, digits: int = 4) -> float | None:
    x = finite(x)
    return None if x is None else round(x, digits)


async def traffic(src: Sources) -> Panel:
    rec = src.recorder
    m1, m5 = rec.window(WINDOWS_S["1m"]), rec.window(WINDOWS_S["5m"])
    arms = []
    for arm in rec.arms():
        w, w5 = rec.window(WINDOWS_S["1m"], arm), rec.window(WINDOWS_S["5m"], arm, quantiles=False)
        arms.append({"arm": arm, "qps": _r(w.qps, 2), "p50_ms": _r(w.p50_ms, 3), "p99_ms": _r(w.p99_ms, 3),
                     "availability": _r(w5.availability), "model_scored": _r(w5.model_scored),
                     "requests": sum(rec.totals[arm].values())})  # fmt: skip
    total = sum(sum(t.values()) for t in rec.totals.values())
    series = [{k: _r(v, 4) for k, v in p.items()} for p in rec.series(600, 10)]
    return {
        "qps": _r(m1.qps, 2), "model_qps": _r(m1.model_qps, 2), "p50_ms": _r(m1.p50_ms, 3),
        "p99_ms": _r(m1.p99_ms, 3), "availability": _r(m5.availability), "model_scored": _r(m5.model_scored),
        "requests_1m": m1.requests, "requests_5m": m5.requests, "requests": total,
        "note": "qps and latency over the last minute, availability and model-scored share over 5 minutes",
        "arms": arms, "series": series,
    }  # fmt: skip


async def slo(src: Sources) -> Panel:
    rec = src.recorder
    obj = rec.objectives
    rows = []
    for arm in [*rec.arms(), "all"]:
        for name, b in rec.burn_rates(None if arm == "all" else arm).items():
            rows.append({"slo": name, "arm": arm, "target": b["target"], "burn_5m": _r(float(b["burn_5m"]), 3),
                         "burn_1h": _r(float(b["burn_1h"]), 3), "page": bool(b["page"])})  # fmt: skip
    return {"p99_target_ms": obj.p99_ms, "page_burn_rate": obj.burn_page, "paging": any(r["page"] for r in rows),
            "rows": rows}  # fmt: skip


async def stages(src: Sources) -> Panel:
    st = src.recorder.stages(WINDOWS_S["1m"])

    def mean(name: str) -> float | None:
        return st.get(name, {}).get("mean_ms")  # type: ignore[return-value]

    rows = []
    for name, budget in STAGE_BUDGET_MS.items():
        s = st.get(name, {})
        measured = mean(name)
        if name == "response" and mean("request") is not None:  # the rest of the gateway's own time
            measured = mean("request") - sum(mean(k) or 0.0 for k in ("balancer", "features", "transform", "inference"))  # type: ignore[operator]
        rows.append(
            {
                "stage": name,
                "budget_ms": budget,
                "mean_ms": _r(measured, 3),
                "p99_ms": _r(s.get("p99_ms"), 3),
                "calls": s.get("n", 0),
                "over_budget": measured is not None and measured > budget,
            }
        )
    total = mean("request")
    return {
        "window": "1m",
        "budget_ms": STAGE_TOTAL_MS,
        "total_mean_ms": _r(total, 3),
        "total_p99_ms": _r(st.get("request", {}).get("p99_ms"), 3),
        "rows": rows,
        "note": "in-gateway time; balancer appears with the model pool, response is the rest of the request",
    }


def sample_cache(src: Sources, now: float) -> None:
    """Keep the store's lookup counts once a second (the ticker calls it) for 1-minute hit rates."""
    if src.store is not None:
        src.cache_history.append((now, src.store.counts()))


def _rates(c: dict[str, int]) -> dict[str, float | None]:
    n = c.get("lookups", 0)
    l1, l2 = c.get("l1", 0), c.get("l2", 0)
    return {
        "l1": l1 / n if n else None,
        "l2": l2 / (n - l1) if n - l1 > 0 else None,
        "l3": (n - l1 - l2) / (n - l1) if n - l1 > 0 else None,
        "l1+l2": (l1 + l2) / n if n else None,
    }


def _minute_ago(src: Sources) -> dict[str, int] | None:
    hist = list(src.cache_history)
    return next((c for t, c in hist if t >= hist[-1][0] - 60), None) if hist else None


async def cache(src: Sources) -> Panel | None:
    if src.fleet is not None:
        merged = src.fleet.cache_counts()
        if merged is None:
            return None
        now, old, l2_on = merged[0], merged[1] or None, merged[2]  # {}: no minute-old sample yet
    elif src.store is None:
        return None
    else:
        now, old, l2_on = src.store.counts(), _minute_ago(src), src.store.l2 is not None
    since = _rates(now)
    recent = _rates({k: now[k] - old.get(k, 0) for k in now}) if old else dict.fromkeys(since)
    tiers = [
        {"tier": t, "hit_rate_1m": _r(recent[t]), "hit_rate": _r(since[t]),
         "of": "all keys" if t in ("l1", "l1+l2") else "keys L1 missed"}
        for t in ("l1", "l2", "l3", "l1+l2")
    ]  # fmt: skip
    if not l2_on:
        tiers = [t for t in tiers if t["tier"] not in ("l2",)]
    return {"lookups": now.get("lookups", 0), "l2": "on" if l2_on else "off", "tiers": tiers}


def cache_counts(src: Sources) -> dict[str, Any] | None:
    """This process's lookup counts now and about a minute ago (for the fleet snapshot)."""
    if src.store is None:
        return None
    return {"now": src.store.counts(), "before": _minute_ago(src) or {}, "l2": src.store.l2 is not None}


async def breakers(src: Sources) -> Panel:
    rows = src.fleet.breakers() if src.fleet is not None else breaker_rows(src.breakers)
    return {"open": sum(r["state"] == "open" for r in rows), "rows": rows}


async def processes(src: Sources) -> Panel | None:
    """The per-process breakdown of the merged figures (only when the document merges processes)."""
    if src.fleet is None:
        return None
    rows = src.fleet.processes()
    return {"processes": sum(r["alive"] for r in rows), "requests": sum(r["requests"] for r in rows),
            "note": "each gateway process's own figures: qps and p99 over the last minute, shares over 5 minutes; "
                    "age: how old its published figures are (the answering process's are live)",
            "rows": rows}  # fmt: skip


def breaker_rows(breakers: Breakers | None) -> list[dict[str, Any]]:
    """This process's breakers: state, the window's calls and failures, transitions."""
    rows = []
    for b in breakers.live() if breakers is not None else ():
        calls, failures = b.window()
        share = _r(failures / calls if calls else None, 3)
        rows.append(
            {
                "name": b.name,
                "state": b.state.name.lower(),
                "calls": calls,
                "failures": failures,
                "failure_share": share,
                "transitions": b.transitions,
            }
        )
    return rows


async def fallbacks(src: Sources) -> Panel:
    w = src.recorder.window(WINDOWS_S["5m"], quantiles=False)
    rows = [{"reason": r, "count": c, "share": _r(c / w.requests if w.requests else None)}
            for r, c in sorted(w.reasons.items(), key=lambda kv: -kv[1])]  # fmt: skip
    gw = src.gateway
    bursts = getattr(gw, "bursts", None)
    return {"window": "5m", "share": _r(w.fallback / w.requests if w.requests else None), "fallbacks": w.fallback,
            "requests": w.requests, "burst_active": bool(bursts and bursts.active),
            "bursts": getattr(bursts, "bursts", 0), "reasons": rows}  # fmt: skip


async def write_behind(src: Sources) -> Panel | None:
    """Queued write-behind entries (committed ones are deleted) and the age of the oldest."""
    r = src.stream
    if r is None:
        return None
    try:
        length = await r.xlen(STREAM)
        oldest = await r.xrange(STREAM, count=1)
        secs, micros = await r.time()
        groups = await r.xinfo_groups(STREAM) if length or oldest else []
    except Exception as exc:  # a status page reports a failed store, it does not fail itself
        return {"state": "unknown", "error": type(exc).__name__}  # the text names hosts: the logs have it
    now_ms = int(secs) * 1000 + int(micros) // 1000
    lag_s = None
    if oldest:
        entry_id = oldest[0][0]
        entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        lag_s = max(0.0, (now_ms - int(entry_id.split("-")[0])) / 1000.0)
    pending = sum(int(g.get("pending", 0)) for g in groups if str(g.get("name", "")) in (GROUP, GROUP.encode()))
    return {"state": "ok", "queued": length, "pending": pending, "lag_s": _r(lag_s if lag_s is not None else 0.0, 3),
            "stream": STREAM}  # fmt: skip


async def _part(part: Any, method: str = "status") -> Panel | None:
    status = getattr(part, method, None)
    if part is None or not callable(status):
        return None
    out = status()
    if inspect.isawaitable(out):
        out = await out
    return out


async def pool(src: Sources) -> Panel | None:
    """Model replicas, health and ejections: the model pool's own status(), when it exists."""
    return await _part(getattr(src.gateway, "pool", None))


async def canary(src: Sources) -> Panel | None:
    """The canary's phase, share and gate estimates: its own public_status(), when it exists."""
    return await _part(getattr(src.gateway, "canary", None), "public_status")


async def shadow(src: Sources) -> Panel | None:
    """The canary's shadow phase (pairs joined, paired log-loss difference, verdict), when there is one."""
    return await _part(getattr(src.gateway, "shadow", None))


DEFAULT_PANELS: list[tuple[str, str, Provider]] = [
    ("traffic", "Traffic", traffic),
    ("processes", "Gateway processes", processes),
    ("slo", "SLOs and error-budget burn", slo),
    ("stages", "Stage latency against the reference budget", stages),
    ("cache", "Feature cache hit rates", cache),
    ("breakers", "Circuit breakers", breakers),
    ("fallbacks", "Fallbacks by reason", fallbacks),
    ("write_behind", "Write-behind", write_behind),
    ("pool", "Model replicas", pool),
    ("canary", "Canary", canary),
    ("shadow", "Canary shadow phase (paired with stable)", shadow),
]


class StatusBoard:
    """Builds the status document from its panel providers."""

    def __init__(self, sources: Sources, panels: list[tuple[str, str, Provider]] | None = None) -> None:
        self.sources = sources
        self.panels = list(DEFAULT_PANELS if panels is None else panels)
        self._slow: tuple[int, dict[str, Any]] | None = None  # (step, fleet.slow_parts) last published

    def add(self, panel_id: str, title: str, provider: Provider) -> None:
        self.panels.append((panel_id, title, provider))

    def tick(self, now: float) -> None:
        sample_cache(self.sources, now)
        if self.sources.fleet_dir is not None:
            # The chart points and 1-hour windows change slowly: recomputed once a step, not
            # every tick (they were most of its cost, 10 of 11 ms, on the event loop).
            step = int(now // fleet_mod.SERIES_STEP_S)
            if self._slow is None or self._slow[0] != step:
                self._slow = (step, fleet_mod.slow_parts(self.sources.recorder))
            fleet_mod.publish(self.sources.fleet_dir, self.snapshot(self._slow[1]))

    def snapshot(self, slow: dict[str, Any] | None = None) -> fleet_mod.Snapshot:
        """This process's figures for the other gateway processes' documents."""
        src = self.sources
        return fleet_mod.snapshot(src.recorder, cache_counts(src), breaker_rows(src.breakers), slow=slow)

    def _merged(self) -> Sources:
        """The sources a document is built from: this process's, or every process's merged."""
        where = self.sources.fleet_dir
        if where is None:
            return self.sources
        own = self.snapshot()
        fleet = fleet_mod.Fleet(own, fleet_mod.read(where, skip_pid=own["pid"]))
        rec = fleet.recorder(self.sources.recorder.objectives)
        return dataclasses.replace(self.sources, recorder=rec, fleet=fleet)  # type: ignore[arg-type]

    async def _one(self, src: Sources, panel_id: str, title: str, provider: Provider) -> Panel | None:
        try:
            async with asyncio.timeout(WAIT_S):
                data = await provider(src)
        except TimeoutError:
            data = {"state": "unknown", "error": f"no answer within {WAIT_S * 1000:.0f} ms"}
        return None if data is None else {"id": panel_id, "title": title, "data": data}

    async def document(self) -> dict[str, Any]:
        src = self._merged()
        panels = await asyncio.gather(*(self._one(src, *p) for p in self.panels))
        rec = src.recorder
        workers = self.sources.workers
        host = socket.gethostname()
        if src.fleet is not None:
            n = len(src.fleet.live)
            kind = "service"
            scope = (f"all {n} gateway process{'es' if n != 1 else ''} of this server ({host}; "
                     f"{workers} configured), merged; per process under Gateway processes")  # fmt: skip
        else:
            kind = "process"
            scope = (f"this gateway process only (pid {os.getpid()} on {host})"
                     + (f", one of {workers} gateway workers: each shows its own figures; /metrics has them all"
                        if workers > 1 else "; the only gateway worker"))  # fmt: skip
        return {
            "service": "ctr-serve",
            "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "uptime_s": round(rec.clock() - rec.started, 1),
            "scope": {
                "kind": kind,
                "pid": os.getpid(),
                "host": host,
                "workers": workers,
                "text": scope,
            },
            "model_version": getattr(self.sources.gateway, "model_version", None),
            "sli_enabled": rec.enabled,
            "panels": [p for p in panels if p is not None],
        }
