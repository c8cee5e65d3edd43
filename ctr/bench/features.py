"""`ctr bench features`: the feature tiers measured on one request of 1 user + 100 ads.

Prints p50/p99 of a full L1 hit, an L2 hit and an L3 read; the hit-rate table (average
latency at 90/95/99 % L1 hits beside p*T_cache + (1-p)*T_origin); the hit rates of
Zipf(1.1) traffic after warming; memory per million cached entities; and, given a
cluster, MGET across slots (mget_nonatomic) against hash-tagged single-slot keys.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import psutil

from ctr.bench.loadgen import Traffic
from ctr.features import schema
from ctr.features.redis_tier import RedisTier, connect
from ctr.features.store import FeatureLookup, TieredStore
from ctr.features.tiers import MemoryTier, feature_key, l1_key
from ctr.features.warm import warm
from ctr.settings import Settings


def _pct(xs: list[float]) -> tuple[float, float, float, float, float]:
    """(p50, p99, p99.9, max, mean) in ms."""
    a = np.array(xs) * 1000
    return (float(np.median(a)), float(np.percentile(a, 99)), float(np.percentile(a, 99.9)), float(a.max()),
            float(a.mean()))  # fmt: skip


async def _timed(lookup: FeatureLookup, reqs: list[dict[str, Any]], before: Callable[[], None]) -> list[float]:
    out = []
    for r in reqs:
        before()
        t0 = time.perf_counter()
        await lookup.lookup(r["user_id"], r["ad_ids"])
        out.append(time.perf_counter() - t0)
    return out


async def run(settings: Settings, n: int = 2000, cluster_url: str | None = None) -> str:
    """Every table of `ctr bench features`, in order."""
    from ctr.features.stack import open_origin

    fs = schema.DEFAULT.configured(settings.ttl_s, settings.feature_versions)
    reqs = [orjson.loads(b) for b in Traffic(settings.data_dir, 100).bodies(n)]
    origin = open_origin(settings.resolved_database_url)
    redis = connect(settings.redis_url, timeout_s=1.0) if settings.redis_url else None
    l2 = RedisTier(redis) if redis is not None else None
    try:
        l3_name = f"L3 read ({settings.resolved_database_url.split(':', 1)[0]})"
        lines = await _tier_tables(TieredStore(MemoryTier(), origin, l2), fs, reqs, l3_name)
        lines += ["", await _warm_hit_rate(TieredStore(MemoryTier(), origin, l2), fs, settings, n)]
        lines += ["", _memory_line()]
        if redis is not None and l2 is not None:
            lines.append(await _redis_memory_line(redis, l2, fs))
        if cluster_url:
            lines += ["", await _cluster_compare(cluster_url)]
    finally:
        await origin.close()
        if redis is not None:
            await redis.aclose()
    return "\n".join(lines)


async def _tier_tables(
    full: TieredStore, fs: schema.FeatureSchema, reqs: list[dict[str, Any]], l3_name: str
) -> list[str]:
    """One tier at a time (L1 hit, L2 hit, L3 read), then the hit-rate table: an L1 hit
    with probability p, else an L3 read, timed through the same lookups as those rows."""
    lookup = FeatureLookup(full, fs=fs)
    await _timed(lookup, reqs, lambda: None)  # fills L1 and L2
    await full.drain()
    t_l1 = await _timed(lookup, reqs, lambda: None)

    def clear_l1() -> None:
        full.l1 = MemoryTier()

    t_l2 = await _timed(lookup, reqs, clear_l1) if full.l2 is not None else []
    l3_only = TieredStore(MemoryTier(), full.origin, None)
    l3_lookup = FeatureLookup(l3_only, fs=fs)

    def clear_l3_l1() -> None:
        l3_only.l1 = MemoryTier()

    t_l3 = await _timed(l3_lookup, reqs, clear_l3_l1)
    lines = ["| path (1 user + 100 ads) | p50 ms | p99 ms | p99.9 ms | max ms | mean ms |", "|---|---|---|---|---|---|"]
    for name, xs in (("L1 hit", t_l1), ("L2 hit (Redis)", t_l2), (l3_name, t_l3)):
        if xs:
            p50, p99, p999, top, mean = _pct(xs)
            lines.append(f"| {name} | {p50:.3f} | {p99:.3f} | {p999:.3f} | {top:.3f} | {mean:.3f} |")

    t_cache, t_origin = _pct(t_l1)[4], _pct(t_l3)[4]
    await _timed(lookup, reqs, lambda: None)  # L1 again holds every request (the L2 rows emptied it)
    lines += ["", "| L1 hit rate p | measured mean ms | p*T_cache + (1-p)*T_origin ms |", "|---|---|---|"]
    rng = random.Random(5)
    for p in (0.90, 0.95, 0.99):
        xs = []
        for r in reqs:
            hit = rng.random() < p
            if not hit:
                clear_l3_l1()
            t0 = time.perf_counter()
            await (lookup if hit else l3_lookup).lookup(r["user_id"], r["ad_ids"])
            xs.append(time.perf_counter() - t0)
        lines.append(f"| {p:.0%} | {np.mean(xs) * 1000:.3f} | {(p * t_cache + (1 - p) * t_origin):.3f} |")
    return lines


async def _warm_hit_rate(fresh: TieredStore, fs: schema.FeatureSchema, settings: Settings, n: int) -> str:
    """Zipf traffic after warming: where were the lookups answered? New versions are new
    keys: an empty L2 without flushing anybody's Redis."""
    cold = fs.configured(settings.ttl_s, {g.name: g.version + 1000 + random.randrange(10**6) for g in fs.groups})
    warmed = await warm(fresh, settings.warm_top_users, cold)
    before = fresh.counts()
    traffic = [orjson.loads(b) for b in Traffic(settings.data_dir, 100, seed=9).bodies(max(n, 5000))]
    await _timed(FeatureLookup(fresh, fs=cold), traffic, lambda: None)
    c = {k: v - before[k] for k, v in fresh.counts().items()}
    return (
        f"Zipf(1.1) traffic, {len(traffic)} requests after warming {warmed['users']} users and {warmed['ads']} ads:\n"
        f"L1 hit rate {c['l1'] / c['lookups']:.4f}, L1+L2 hit rate {(c['l1'] + c['l2']) / c['lookups']:.4f}"
    )


CHUNK = 5000  # keys per pipeline when filling Redis


async def _redis_memory_line(redis: Any, l2: RedisTier, fs: schema.FeatureSchema, m: int = 100_000) -> str:
    """Redis used_memory per million cached user_static rows, with the store's real keys."""
    info0 = (await redis.info("memory"))["used_memory"]
    keys = [feature_key(fs.user_static, f"bench-u{i}") for i in range(m)]
    rows = [(k, (30 + i % 40, "f", i % 50, i % 12), 1, 600.0) for i, k in enumerate(keys)]
    # In pipelines of CHUNK: one of 100,000 SETs took over the client's 1 s socket timeout on a
    # busy machine ("Timeout writing to socket").
    for i in range(0, m, CHUNK):
        await l2.set_many(rows[i : i + CHUNK])
    info1 = (await redis.info("memory"))["used_memory"]
    for i in range(0, m, CHUNK):
        await l2.delete_many(keys[i : i + CHUNK])
    return f"Redis (L2): {(info1 - info0) / m * 1e6 / 2**20:.0f} MiB per million entities (user_static rows)"


def _memory_line(m: int = 500_000) -> str:
    gc.collect()
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    tier = MemoryTier(max_entries=m)
    rows = [(l1_key(schema.USER_STATIC, f"u{i}"), (30 + i % 40, "f", i % 50, i % 12), 1, 86400.0) for i in range(m)]
    tier.set_many_now(rows)
    del rows
    gc.collect()
    per_m = (proc.memory_info().rss - rss0) / m * 1e6 / 2**20
    del tier
    return f"L1 (in-process): {per_m:.0f} MiB per million entities (user_static rows, measured with {m:,})"


async def _cluster_compare(url: str, n: int = 1000) -> str:
    """202 keys per request read with mget_nonatomic: spread over every slot, our 16 hash
    tags (feature_key), or one slot."""
    client = connect(url, timeout_s=1.0)
    layouts = {
        "spread over every slot": [f"bench:{i}" for i in range(202)],
        "16 hash tags (feature_key, used)": [feature_key(schema.AD_META, f"bench{i}") for i in range(202)],
        "one hash tag (one slot, one node)": [f"bench:{{req}}:{i}" for i in range(202)],
    }
    out = []
    for name, ks in layouts.items():
        pipe = client.pipeline(transaction=False)
        for k in ks:
            pipe.set(k, b"[1,2]", ex=600)
        await pipe.execute()
        xs = []
        for _ in range(n):
            t0 = time.perf_counter()
            await client.mget_nonatomic(ks)
            xs.append(time.perf_counter() - t0)
        p50, p99, p999, top, _ = _pct(xs)
        out.append(f"| {name} | {p50:.3f} | {p99:.3f} | {p999:.3f} | {top:.3f} |")
    await client.aclose()
    head = "| Redis Cluster (3 masters), read of 202 keys | p50 ms | p99 ms | p99.9 ms | max ms |"
    return "\n".join([head, "|---|---|---|---|---|", *out])


def main(data_dir: Path | None = None, n: int = 2000, cluster_url: str | None = None) -> str:
    settings = Settings() if data_dir is None else Settings(data_dir=data_dir)
    return asyncio.run(run(settings, n, cluster_url))
