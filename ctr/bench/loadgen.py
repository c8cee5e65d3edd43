"""A bounded closed-loop load generator for /predict (loopback targets only)."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import numpy as np
import orjson

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


@dataclass(frozen=True, slots=True)
class LevelResult:
    concurrency: int
    requests: int
    ok: int
    rps: float
    p50_ms: float
    p99_ms: float
    non_200: int
    fallback: int
    stage_ms: dict[str, float]


_STAGE = re.compile(r'^ctr_stage_latency_seconds_(sum|count)\{stage="(\w+)"\} (\S+)$', re.M)


async def _stages(session: aiohttp.ClientSession, url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each stage's latency from the gateway's /metrics."""
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    out: dict[str, list[float]] = {}
    for kind, stage, value in _STAGE.findall(text):
        out.setdefault(stage, [0.0, 0.0])[0 if kind == "sum" else 1] = float(value)
    return {k: (v[0], v[1]) for k, v in out.items()}


def _stage_means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    means = {}
    for stage, (s1, c1) in after.items():
        s0, c0 = before.get(stage, (0.0, 0.0))
        if c1 > c0:
            means[stage] = (s1 - s0) / (c1 - c0) * 1000
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


async def _level(url: str, c: int, duration_s: float, bodies: list[bytes]) -> LevelResult:
    lat: list[float] = []
    codes: list[int] = []
    fallbacks = 0
    stop = time.perf_counter() + duration_s
    conn = aiohttp.TCPConnector(limit=c)
    async with aiohttp.ClientSession(connector=conn, headers={"content-type": "application/json"}) as session:

        async def worker(k: int) -> None:
            nonlocal fallbacks
            i = k
            while time.perf_counter() < stop and len(lat) < MAX_REQUESTS_PER_LEVEL:
                t0 = time.perf_counter()
                async with session.post(url + "/predict", data=bodies[i % len(bodies)]) as r:
                    body = await r.read()
                lat.append(time.perf_counter() - t0)
                codes.append(r.status)
                if r.status == 200 and b'"fallback":true' in body:
                    fallbacks += 1
                i += c

        before = await _stages(session, url)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(c)))
        elapsed = time.perf_counter() - t0
        stage_ms = _stage_means(before, await _stages(session, url))
    arr = np.array(lat) * 1000
    ok = sum(1 for s in codes if s == 200)
    return LevelResult(
        concurrency=c,
        requests=len(codes),
        ok=ok,
        rps=ok / elapsed,
        p50_ms=float(np.percentile(arr, 50)) if len(arr) else float("nan"),
        p99_ms=float(np.percentile(arr, 99)) if len(arr) else float("nan"),
        non_200=len(codes) - ok,
        fallback=fallbacks,
        stage_ms=stage_ms,
    )


def run_levels(
    url: str, levels: list[int], duration_s: float, n_ads: int, data_dir: Path, warm_up: bool = True
) -> list[LevelResult]:
    """One bounded run per concurrency level, after a short warm-up."""
    check_loopback(url)
    bodies = Traffic(data_dir, n_ads).bodies(2000)

    async def go() -> list[LevelResult]:
        if warm_up:
            await _level(url, 4, min(2.0, duration_s), bodies)  # caches, connections
        return [await _level(url, c, duration_s, bodies) for c in levels]

    return asyncio.run(go())


def format_table(rows: list[LevelResult]) -> str:
    stages = ("features", "transform", "inference", "request")
    head = "| concurrency | requests | ok rps | p50 ms | p99 ms | non-200 | fallback | " + " | ".join(
        f"{s} ms (mean)" for s in stages
    )
    lines = [head + " |", "|---" * (7 + len(stages)) + "|"]
    for r in rows:
        means = " | ".join(f"{r.stage_ms.get(s, float('nan')):.2f}" for s in stages)
        lines.append(
            f"| {r.concurrency} | {r.requests} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.non_200} "
            f"| {r.fallback} | {means} |"
        )
    return "\n".join(lines)
