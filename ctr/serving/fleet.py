"""The status of every gateway process of this service together, with a per-process breakdown.

Under `bentoml serve` a gateway runs as several worker processes (one per core by default),
each with its own SLI recorder, L1 cache and breakers, and a request for /status reaches
one of them. So each gateway process publishes a snapshot of its figures once a second (the
status ticker) as `<pid>.json` in a directory all of them share: `ctr-status/` under the
Prometheus multiprocess directory that BentoML keeps for the same processes
(PROMETHEUS_MULTIPROC_DIR; it is made fresh for each `bentoml serve`). The process that
answers /status reads the others' snapshots, puts its own live figures beside them, and
merges: counts add up, latency quantiles come from the summed histograms (the recorder's
own buckets, so a merged p99 is as exact as one process's), qps add up.

A snapshot of a process that no longer runs (a worker that died and was replaced) counts
in the totals since start, not in the windows, and is shown as not alive. Figures of other
processes are at most one ticker period old (`age_s` in the breakdown). The directory is
per machine (per pod on Kubernetes): the page speaks for the processes of one server.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from ctr.observe.sli import ARMS, BOUNDS_MS, WINDOWS_S, Objectives, SliRecorder, Window, quantile

ENV = "PROMETHEUS_MULTIPROC_DIR"
SUBDIR = "ctr-status"
ALL = "all"
Snapshot = dict[str, Any]
_NB = len(BOUNDS_MS) + 1  # the recorder's latency buckets


def directory(environ: Mapping[str, str] | None = None) -> Path | None:
    """Where this service's gateway processes publish (None: not under a multiprocess server)."""
    base = (os.environ if environ is None else environ).get(ENV, "")
    return Path(base) / SUBDIR if base else None


def _sparse(hist: list[int] | None) -> dict[str, int] | None:
    return None if hist is None else {str(i): c for i, c in enumerate(hist) if c}


def _dense(parts: Iterable[dict[str, int]]) -> list[int]:
    out = [0] * _NB
    for part in parts:
        for i, c in part.items():
            out[int(i)] += c
    return out


def _window(w: Window) -> dict[str, Any]:
    return {"seconds": w.seconds, "requests": w.requests, "model": w.model, "fallback": w.fallback,
            "errors": w.errors, "slow": w.slow, "reasons": w.reasons, "hist": _sparse(w.hist)}  # fmt: skip


def snapshot(rec: SliRecorder, cache: dict[str, Any] | None, breakers: list[dict[str, Any]],
             now_wall: float | None = None, slow: dict[str, Any] | None = None) -> Snapshot:  # fmt: skip
    """This process's figures, in a form that merges with other processes' (`Fleet`); `slow`
    (the parts that change slowly, `slow_parts`) when the caller keeps them, else computed here."""
    slow = slow_parts(rec) if slow is None else slow
    windows: dict[str, dict[str, Any]] = {}
    for arm in [None, *rec.arms()]:
        key = arm or ALL
        windows[key] = {str(s): _window(rec.window(s, arm)) for s in (WINDOWS_S["1m"], WINDOWS_S["5m"])}
        if key in slow["hour"]:
            windows[key][str(WINDOWS_S["1h"])] = slow["hour"][key]
    stages = rec.stages(WINDOWS_S["1m"], hists=True)
    for st in stages.values():
        st["hist"] = _sparse(st["hist"])
    return {
        "pid": os.getpid(), "host": socket.gethostname(), "updated": time.time() if now_wall is None else now_wall,
        "uptime_s": rec.clock() - rec.started, "totals": rec.totals, "windows": windows, "stages": stages,
        "series": slow["series"], "cache": cache, "breakers": breakers,
    }  # fmt: skip


SERIES_STEP_S = 10  # the charts' point spacing: their points change once a step


def slow_parts(rec: SliRecorder) -> dict[str, Any]:
    """The parts of a snapshot that change slowly and cost the most: the charts' points (10 s
    apart) and the 1-hour windows (burn rates). With an hour of traffic on a busy 2-core machine
    they took 8 and 2 of a snapshot's 11 ms; the status ticker recomputes them once a step."""
    series = rec.series(600, SERIES_STEP_S, raw=True)
    for p in series:
        p["hist"] = _sparse(p["hist"])
    hour = {arm or ALL: _window(rec.window(WINDOWS_S["1h"], arm, quantiles=False)) for arm in [None, *rec.arms()]}
    return {"series": series, "hour": hour}


def publish(where: Path, snap: Snapshot) -> None:
    """Write `snap` as `<pid>.json`, atomically (a reader sees the old file or the new one)."""
    where.mkdir(parents=True, exist_ok=True)
    tmp = where / f".{snap['pid']}.tmp"
    tmp.write_bytes(orjson.dumps(snap))
    os.replace(tmp, where / f"{snap['pid']}.json")


def read(where: Path, skip_pid: int | None = None) -> list[Snapshot]:
    """Every published snapshot but `skip_pid`'s (unreadable ones are skipped: one being replaced)."""
    out = []
    for f in sorted(where.glob("*.json")) if where.is_dir() else []:
        if f.stem == str(skip_pid):
            continue
        with contextlib.suppress(OSError, orjson.JSONDecodeError):
            out.append(orjson.loads(f.read_bytes()))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FleetRecorder:
    """What the status providers read from a recorder (`window`, `stages`, `series`,
    `burn_rates`, `arms`, `totals`), over the merged snapshots of several processes."""

    burn_rates = SliRecorder.burn_rates

    def __init__(self, live: list[Snapshot], every: list[Snapshot], objectives: Objectives,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.live, self.every, self.objectives = live, every, objectives
        self.clock, self.enabled = clock, True
        self.started = clock() - max((s["uptime_s"] for s in live), default=0.0)

    @property
    def totals(self) -> dict[str, dict[str, int]]:
        """Requests since start, per arm and result, of every process that published (alive or not)."""
        out: dict[str, dict[str, int]] = {}
        for s in self.every:
            for arm, counts in s["totals"].items():
                acc = out.setdefault(arm, {})
                for k, v in counts.items():
                    acc[k] = acc.get(k, 0) + v
        return out

    def arms(self) -> list[str]:
        names = {a for s in self.live for a in s["windows"] if a != ALL}
        return sorted(names, key=lambda a: (a not in ARMS, ARMS.index(a) if a in ARMS else 0, a))

    def window(self, seconds: float, arm: str | None = None, quantiles: bool = True) -> Window:
        parts = [w for s in self.live if (w := s["windows"].get(arm or ALL, {}).get(str(int(seconds))))]
        reasons: dict[str, int] = {}
        for p in parts:
            for r, c in p["reasons"].items():
                reasons[r] = reasons.get(r, 0) + c
        hist = _dense(p["hist"] for p in parts if p["hist"]) if quantiles else None
        n = {k: sum(p[k] for p in parts) for k in ("requests", "model", "fallback", "errors", "slow")}
        span = max((p["seconds"] for p in parts), default=float(seconds))
        p50, p99 = (quantile(hist, 0.5), quantile(hist, 0.99)) if hist is not None else (None, None)
        return Window(span, n["requests"], n["model"], n["fallback"], n["errors"], n["slow"], p50, p99, reasons, hist)

    def stages(self, seconds: float) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name in dict.fromkeys(k for s in self.live for k in s["stages"]):
            parts = [s["stages"][name] for s in self.live if name in s["stages"]]
            n = sum(p["n"] for p in parts)
            hist = _dense(p["hist"] for p in parts)
            out[name] = {"n": n, "mean_ms": sum(p["mean_ms"] * p["n"] for p in parts) / n,
                         "p50_ms": quantile(hist, 0.5), "p99_ms": quantile(hist, 0.99)}  # fmt: skip
        return out

    def series(self, seconds: int, step_s: int, arm: str | None = None) -> list[dict[str, Any]]:
        """The processes' chart points added up (their clocks are the same monotonic clock)."""
        runs = [s["series"] for s in self.live if s["series"]]
        out = []
        for points in zip(*runs, strict=False):
            total, model, fallback = (sum(p[k] for p in points) for k in ("requests", "model", "fallback"))
            hist = _dense(p["hist"] for p in points)
            out.append({
                "t": points[0]["t"], "qps": total / step_s, "p50_ms": quantile(hist, 0.5),
                "p99_ms": quantile(hist, 0.99), "availability": (model + fallback) / total if total else None,
                "model_scored": model / total if total else None,
                "fallback_share": fallback / total if total else None,
            })  # fmt: skip
        return out


class Fleet:
    """The snapshots of one status document: this process's (first) and the others'."""

    def __init__(self, own: Snapshot, others: list[Snapshot], is_alive: Callable[[int], bool] = alive) -> None:
        self.own = own
        self.every = [own, *others]
        self.alive = {s["pid"]: s is own or is_alive(s["pid"]) for s in self.every}
        self.live = [s for s in self.every if self.alive[s["pid"]]]

    def recorder(self, objectives: Objectives) -> FleetRecorder:
        return FleetRecorder(self.live, self.every, objectives)

    def cache_counts(self) -> tuple[dict[str, int], dict[str, int], bool] | None:
        """Lookups by tier now and about a minute ago, summed over live processes; whether L2 is on."""
        parts = [s["cache"] for s in self.live if s["cache"]]
        if not parts:
            return None

        def add(key: str) -> dict[str, int]:
            out: dict[str, int] = {}
            for p in parts:
                for k, v in p[key].items():
                    out[k] = out.get(k, 0) + v
            return out

        return add("now"), add("before"), any(p["l2"] for p in parts)

    def breakers(self) -> list[dict[str, Any]]:
        return [{"pid": s["pid"], **row} for s in self.live for row in s["breakers"]]

    def processes(self, now_wall: float | None = None) -> list[dict[str, Any]]:
        """One row per process: its own figures (1-minute rate and p99, 5-minute shares)."""
        now = time.time() if now_wall is None else now_wall
        rows = []
        for s in self.every:
            m1, m5 = s["windows"].get(ALL, {}).get("60"), s["windows"].get(ALL, {}).get("300")
            hist = _dense([m1["hist"]]) if m1 and m1["hist"] else None
            n5 = m5["requests"] if m5 else 0
            rows.append({
                "pid": s["pid"], "alive": self.alive[s["pid"]], "answering": s is self.own,
                "requests": sum(sum(c.values()) for c in s["totals"].values()),
                "qps": round(m1["requests"] / m1["seconds"], 2) if m1 else None,
                "p99_ms": None if hist is None else _round(quantile(hist, 0.99)),
                "availability": round((m5["model"] + m5["fallback"]) / n5, 4) if n5 else None,
                "model_scored": round(m5["model"] / n5, 4) if n5 else None,
                "fallbacks_5m": m5["fallback"] if m5 else 0,
                "open_breakers": sum(r.get("state") == "open" for r in s["breakers"]),
                "uptime_s": round(s["uptime_s"], 1), "age_s": round(max(0.0, now - s["updated"]), 1),
            })  # fmt: skip
        return rows


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)
