"""A bounded load generator for /predict (loopback targets only), closed or open loop.

Closed loop: `c` workers, each sending its next request when the last one answered; its
latencies understate the tail past saturation (a slow answer also delays the next send).
Open loop: requests are scheduled at a fixed arrival rate and each latency is measured
from its *scheduled* send time, so time spent waiting behind a slow server (or a busy
generator) counts, as a real client population sees it (wrk2's correction for
coordinated omission).

Only model-scored answers (200, `fallback: false`) count as throughput; fallback answers
(200, `fallback: true`) and errors are counted apart.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import numpy as np
import orjson

from ctr.degraded import PAST_DEADLINE, Reason
from ctr.features import schema

MAX_REQUESTS_PER_LEVEL = 200_000


def check_loopback(url: str) -> None:
    """Refuse any target but this machine."""
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"load is only sent to loopback addresses, not {host!r}")


BATCH_REQUESTS = "ctr_model_batch_requests"  # the gateway's histogram of requests per model call


@dataclass(frozen=True, slots=True)
class LevelResult:
    mode: str  # "closed" (concurrency workers) or "open" (fixed arrival rate)
    concurrency: int  # closed: workers; open: most connections
    offered_rps: float  # open: the scheduled arrival rate; closed: 0
    sent_rps: float  # requests sent per second (open: below offered when the generator fell behind)
    requests: int
    model_scored: int  # 200 with fallback false: the only answers counted as throughput
    fallback: int  # 200 with fallback true
    shed: int  # of the fallbacks, those shed at the concurrency limit (degraded overload:shed)
    deadline: int  # of the fallbacks, those past the deadline (degraded model:timeout or model:deadline)
    non_200: int  # other statuses and connection errors
    model_rps: float
    fallback_rps: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    stage_ms: dict[str, float]
    late_ms: float = 0.0  # open: how far behind its schedule the generator sent its furthest-behind request
    batch_requests: float = float("nan")  # the gateway's mean requests per model call (ctr_model_batch_requests)
    client_cores: float = 0.0  # the load generator's CPU over the level, in cores (its process's CPU s / wall s)
    server_cpu_s: float = float("nan")  # the server's CPU seconds over the level, where the caller could read them

    @property
    def fallback_share(self) -> float:
        return self.fallback / self.requests if self.requests else float("nan")


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """Every ctr_* sample of a /metrics page, by (name, labels); summed where a name and
    labels repeat."""
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("ctr_"):
            key, _, value = line.rpartition(" ")
            name, _, labels = key.partition("{")
            k = (name, labels.rstrip("}"))
            out[k] = out.get(k, 0.0) + float(value)
    return out


def label(labels: str, name: str) -> str | None:
    """One label's value in a sample's labels (`a="1",b="2"`), or None."""
    m = re.search(rf'(?:^|,){name}="([^"]*)"', labels)
    return m.group(1) if m else None


async def _stages(session: aiohttp.ClientSession, url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each stage's latency from the gateway's /metrics (none when it does not answer)."""
    try:
        async with session.get(url + "/metrics") as r:
            text = await r.text()
    except (aiohttp.ClientError, TimeoutError):  # an overloaded server: the stage columns stay empty
        return {}
    out: dict[str, list[float]] = {}
    for (name, labels), value in parse_metrics(text).items():
        kind = name.removeprefix("ctr_stage_latency_seconds_")
        if kind in ("sum", "count") and (stage := label(labels, "stage")) is not None:
            out.setdefault(stage, [0.0, 0.0])[0 if kind == "sum" else 1] = value
        elif name in (BATCH_REQUESTS + "_sum", BATCH_REQUESTS + "_count"):  # summed over any labels
            out.setdefault(BATCH_REQUESTS, [0.0, 0.0])[0 if name.endswith("_sum") else 1] += value
    return {k: (v[0], v[1]) for k, v in out.items()}


def _stage_means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Each stage's mean (ms) between two scrapes; BATCH_REQUESTS's mean is requests per call."""
    means = {}
    for stage, (s1, c1) in after.items():
        s0, c0 = before.get(stage, (0.0, 0.0))
        if c1 > c0:
            means[stage] = (s1 - s0) / (c1 - c0) * (1 if stage == BATCH_REQUESTS else 1000)
    return means


class Traffic:
    """Zipf-distributed users and ads (the click log's popularity when present)."""

    def __init__(self, data_dir: Path, n_ads: int, seed: int = 1, zipf: float = 1.1) -> None:
        self.rng = np.random.default_rng(seed)
        self.n_ads = n_ads
        path = data_dir / "clicklog.npz"
        if path.exists():
            with np.load(path) as z:
                self.user_w, self.ad_w = z["user_weight"], z["ad_weight"]
        else:
            self.user_w = self._zipf(30_000, zipf)
            self.ad_w = self._zipf(3_000, zipf)

    @staticmethod
    def _zipf(n: int, s: float) -> np.ndarray:
        w = 1.0 / np.arange(1, n + 1) ** s
        return w / w.sum()

    def bodies(self, n: int) -> list[bytes]:
        users = self.rng.choice(len(self.user_w), n, p=self.user_w)
        out = []
        for u in users:
            ads = self.rng.choice(len(self.ad_w), self.n_ads, p=self.ad_w)
            ctx = {
                "hour": int(self.rng.integers(0, 24)),
                "device_type": str(self.rng.choice(schema.DEVICE_TYPES)),
                "site_category": str(self.rng.choice(schema.SITE_CATEGORIES)),
                "banner_pos": int(self.rng.integers(0, schema.BANNER_POSITIONS)),
                "conn_type": str(self.rng.choice(schema.CONN_TYPES)),
            }
            out.append(orjson.dumps({"user_id": f"u{u}", "ad_ids": [f"a{a}" for a in ads], "context": ctx}))
        return out


_SHED = Reason.SHED.encode()
_PAST_DEADLINE = tuple(f'"{r}"'.encode() for r in PAST_DEADLINE)


class _Tally:
    """Latencies and outcomes of one level."""

    def __init__(self) -> None:
        self.lat: list[float] = []
        self.model = self.fallback = self.shed = self.deadline = self.errors = 0

    def add(self, latency_s: float, status: int, body: bytes) -> None:
        self.lat.append(latency_s)
        if status != 200:
            self.errors += 1
        elif b'"fallback":true' in body:
            self.fallback += 1
            self.shed += _SHED in body
            self.deadline += any(r in body for r in _PAST_DEADLINE)
        else:
            self.model += 1

    def result(
        self, mode: str, c: int, offered: float, elapsed: float, stage_ms: dict[str, float], late_s: float = 0.0,
        client_cpu_s: float = 0.0, server_cpu_s: float = float("nan"),
    ) -> LevelResult:  # fmt: skip
        arr = np.array(self.lat) * 1000

        def pct(q: float) -> float:
            return float(np.percentile(arr, q)) if len(arr) else float("nan")

        n = len(self.lat)
        return LevelResult(mode=mode, concurrency=c, offered_rps=offered, sent_rps=n / elapsed, requests=n,
                           model_scored=self.model, fallback=self.fallback, shed=self.shed, deadline=self.deadline,
                           non_200=self.errors,
                           model_rps=self.model / elapsed, fallback_rps=self.fallback / elapsed, p50_ms=pct(50),
                           p99_ms=pct(99), p999_ms=pct(99.9), max_ms=float(arr.max()) if n else float("nan"),
                           stage_ms=stage_ms, late_ms=late_s * 1000,
                           batch_requests=stage_ms.pop(BATCH_REQUESTS, float("nan")),
                           client_cores=client_cpu_s / elapsed if elapsed > 0 else 0.0,
                           server_cpu_s=server_cpu_s)  # fmt: skip


async def open_loop(n: int, rate: float, t0: float, one: Callable[[int, float], Awaitable[None]]) -> float:
    """Send request i at its scheduled time t0 + i / rate (perf_counter seconds), whatever the
    earlier ones are doing, and wait for them all: `one(i, scheduled)` sends and records it,
    latency counted from `scheduled`, so a slow server cannot slow the arrivals. Returns how
    far behind schedule (s) the furthest-behind request left: the generator's own stalls,
    which reach the server as a burst. The first exception of a request is raised at the end."""
    # Only the tasks not done are kept, and what existed before the run is frozen out of the
    # collector's sight. With every task kept in a list, the generator fell up to 181 ms
    # behind at 1,022/s and its late requests reached the server as one burst (docs/performance.md,
    # "The tail"); with these two, 5-12 ms.
    inflight: set[asyncio.Task[None]] = set()
    errors: list[BaseException] = []

    def done(task: asyncio.Task[None]) -> None:
        inflight.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            errors.append(exc)

    late = 0.0
    freeze = gc.get_freeze_count() == 0  # not another caller's freeze (settle_gc) to undo
    if freeze:
        gc.freeze()
    try:
        for i in range(n):
            scheduled = t0 + i / rate
            if (wait := scheduled - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            late = max(late, time.perf_counter() - scheduled)
            task = asyncio.create_task(one(i, scheduled))
            inflight.add(task)
            task.add_done_callback(done)
        if inflight:  # nothing is added after the sends; wait copies the set
            await asyncio.wait(inflight)
    finally:
        if freeze:
            gc.unfreeze()
    if errors:
        raise errors[0]
    return late


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, path: str = "/predict") -> tuple[int, bytes]:
    try:
        async with session.post(url + path, data=body) as r:
            return r.status, await r.read()
    except (aiohttp.ClientError, TimeoutError):
        return 0, b""


def _session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), timeout=aiohttp.ClientTimeout(total=10),
                                 headers={"content-type": "application/json"})  # fmt: skip


ServerCpu = Callable[[], float]  # the server's CPU seconds so far (its whole process tree)


async def _level(
    url: str, c: int, duration_s: float, bodies: list[bytes], path: str = "/predict",
    server_cpu: ServerCpu | None = None,
) -> LevelResult:  # fmt: skip
    """Closed loop: `c` workers for `duration_s`, POSTing to `path`; the server's CPU over the
    level when `server_cpu` reads it."""
    tally = _Tally()
    stop = time.perf_counter() + duration_s
    async with _session(c) as session:

        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < stop and len(tally.lat) < MAX_REQUESTS_PER_LEVEL:
                t0 = time.perf_counter()
                status, body = await _post(session, url, bodies[i % len(bodies)], path)
                tally.add(time.perf_counter() - t0, status, body)
                i += c

        before = await _stages(session, url)
        s0 = server_cpu() if server_cpu is not None else float("nan")
        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(k) for k in range(c)))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        served = server_cpu() - s0 if server_cpu is not None else float("nan")
        stage_ms = _stage_means(before, await _stages(session, url))
    return tally.result("closed", c, 0.0, elapsed, stage_ms, client_cpu_s=cpu, server_cpu_s=served)


async def open_level(
    url: str, rate: float, duration_s: float, bodies: list[bytes], max_conns: int = 512
) -> LevelResult:
    """Open loop: one request every 1/`rate` s for `duration_s`, latency from its scheduled time."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    tally = _Tally()
    n = min(int(rate * duration_s), MAX_REQUESTS_PER_LEVEL)
    async with _session(max_conns) as session:

        async def one(i: int, scheduled: float) -> None:
            status, body = await _post(session, url, bodies[i % len(bodies)])
            tally.add(time.perf_counter() - scheduled, status, body)

        before = await _stages(session, url)
        t0, cpu0 = time.perf_counter(), time.process_time()
        late = await open_loop(n, rate, t0, one)
        elapsed, cpu = max(time.perf_counter() - t0, n / rate), time.process_time() - cpu0
        stage_ms = _stage_means(before, await _stages(session, url))
    return tally.result("open", max_conns, rate, elapsed, stage_ms, late, client_cpu_s=cpu)


def run_levels(
    url: str, levels: list[int], duration_s: float, n_ads: int, data_dir: Path, warm_up: bool = True,
    path: str = "/predict", server_cpu: ServerCpu | None = None,
) -> list[LevelResult]:  # fmt: skip
    """One bounded closed-loop run per concurrency level, after a short warm-up; requests go
    to `path` (/predict, or the BentoML API's route with the same body); `server_cpu` reads
    the server's CPU seconds (each level's are in its result)."""
    check_loopback(url)
    bodies = Traffic(data_dir, n_ads).bodies(2000)

    async def go() -> list[LevelResult]:
        if warm_up:
            await _level(url, 4, min(2.0, duration_s), bodies, path)  # caches, connections
        return [await _level(url, c, duration_s, bodies, path, server_cpu) for c in levels]

    return asyncio.run(go())


def run_rates(url: str, rates: list[float], duration_s: float, n_ads: int, data_dir: Path) -> list[LevelResult]:
    """One bounded open-loop run per arrival rate (requests/s)."""
    check_loopback(url)
    bodies = Traffic(data_dir, n_ads, seed=2).bodies(2000)

    async def go() -> list[LevelResult]:
        return [await open_level(url, r, duration_s, bodies) for r in rates]

    return asyncio.run(go())


def format_table(rows: list[LevelResult], stages: bool = True) -> str:
    """One row per level: model-scored and fallback answers apart, p50/p99/p99.9/max."""
    names = ("features", "transform", "inference", "request") if stages else ()
    head = ("| load | requests | model-scored rps | fallback rps | fallback share | of which shed | past deadline "
            "| non-200 | p50 ms "
            "| p99 ms | p99.9 ms | max ms |")  # fmt: skip
    head += "".join(f" {s} ms (mean) |" for s in names)
    lines = [head, "|---" * (12 + len(names)) + "|"]
    for r in rows:
        load = f"c={r.concurrency}" if r.mode == "closed" else f"{r.offered_rps:.0f}/s (sent {r.sent_rps:.0f}/s)"
        means = "".join(f" {r.stage_ms.get(s, float('nan')):.2f} |" for s in names)
        lines.append(
            f"| {load} | {r.requests} | {r.model_rps:.0f} | {r.fallback_rps:.0f} | {r.fallback_share:.1%} "
            f"| {r.shed} | {r.deadline} | {r.non_200} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.p999_ms:.2f} "
            f"| {r.max_ms:.2f} |{means}"
        )
    return "\n".join(lines)
