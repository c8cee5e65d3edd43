"""`ctr bench stages`: the gateway's own CPU per request, stage by stage, in this process.

One request of 1 user x 100 ads (the load generator's Zipf traffic), every feature in L1,
no HTTP: parse and validate the body, the L1 lookup, the transform to the model's matrix,
the forward pass alone, the gateway's bookkeeping around them (metrics, SLIs, the
coalescer, the pool) with a model that answers at once, and the response (signed request
id + JSON). Median, p99, p99.9 and max over every call, in microseconds: the numbers a throughput
change has to move (issue: each of lookup, transform and response well under 100 us).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson

from ctr.api import request_id
from ctr.api.contract import parse_predict
from ctr.bench.loadgen import Traffic
from ctr.features import stack as feature_stack
from ctr.features.transform import Transformer
from ctr.features.warm import warm
from ctr.model import store as modelstore
from ctr.serving.canary.served import ServedLog
from ctr.settings import Settings


def _us(xs: list[float]) -> tuple[float, float, float, float]:
    a = np.array(xs) * 1e6
    return float(np.median(a)), float(np.percentile(a, 99)), float(np.percentile(a, 99.9)), float(a.max())


async def _each(n: int, f: Callable[[int], Awaitable[Any]]) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await f(i)
        out.append(time.perf_counter() - t0)
    return out


# The stages of the in-process limit: a request's own work, one after another, no HTTP.
LIMIT = ("parse", "features", "transform", "forward", "respond", "served")


async def measure(
    settings: Settings, n: int = 3000, batch_requests: int = 1
) -> list[tuple[str, str, float, float, float, float]]:
    """(key, stage, median, p99, p99.9, max in us) for each stage; `forward` is the pass over
    `batch_requests` requests' matrices in one call (the coalescer's batch), per request."""
    from ctr.model.runner import ModelRunner
    from ctr.observe.pauses import settle_gc
    from ctr.serving import root
    from ctr.serving.coalesce import Upstream

    art = modelstore.artifacts(settings.model_tag)
    bodies = Traffic(settings.data_dir, 100).bodies(2000)
    reqs = [parse_predict(b, settings.max_ads) for b in bodies]
    runner = ModelRunner(art, "cpu", settings.torch_threads, settings.model_precision, settings.model_engine)
    transformer = Transformer(art.spec)
    key = b"k" * 32
    async with feature_stack.opened(settings.model_copy(update={"redis_url": ""})) as stack:
        await warm(stack.store, 10**9, stack.schema)
        settle_gc()
        lookup = stack.lookup
        looked = [await lookup.lookup(r.user_id, r.ad_ids) for r in reqs]  # every key in L1 from here on
        contexts = [r.context.model_dump() for r in reqs]

        async def parse(i: int) -> None:
            parse_predict(bodies[i % len(bodies)], settings.max_ads)

        async def features(i: int) -> None:
            r = reqs[i % len(reqs)]
            await lookup.lookup(r.user_id, r.ad_ids)

        def matrix(i: int) -> np.ndarray:
            f = looked[i % len(looked)]
            return transformer.matrix(f.user_static, f.user_behavioral, f.ad_meta, f.ad_stats, contexts[i % len(reqs)])

        async def transform(i: int) -> None:
            matrix(i)

        xs = [matrix(i) for i in range(len(reqs))]
        k = max(1, batch_requests)
        batches = [np.concatenate([xs[(i + j) % len(xs)] for j in range(k)]) for i in range(0, len(xs), k)]

        async def forward(i: int) -> None:
            runner(xs[i % len(xs)])

        async def forward_batch(i: int) -> None:
            runner(batches[i % len(batches)])

        async def instant(x: np.ndarray) -> np.ndarray:
            return np.full(len(x), 0.5, dtype=np.float32)

        up = Upstream()  # one counter for the gateway and its pool, as root.build makes it
        pool = root.model_pool(settings.model_copy(update={"model_urls": ""}), instant, runner.n_fields, upstream=up)
        await pool.start()
        gw = root.gateway(settings, art, pool, stack, upstream=up)
        preds = [await gw.predict(r) for r in reqs[:50]]
        if any(p.fallback for p in preds):
            raise RuntimeError(f"the gateway fell back: {preds[0].degraded}")

        async def gateway(i: int) -> None:
            await gw.predict(reqs[i % len(reqs)])

        async def respond(i: int) -> None:
            p = preds[i % len(preds)]
            ads = reqs[i % len(preds)].ad_ids
            signed = request_id.issue(p.arm, p.model_version, key, time.time(), 7, "", request_id.ads_digest(ads))
            orjson.dumps(dataclasses.replace(p, request_id=signed))

        receipts = ServedLog(None, 900.0)  # type: ignore[arg-type]  # records buffered, never written here

        async def remember(i: int) -> None:
            p = preds[i % len(preds)]
            receipts.remember(f"nonce{i}.digest", reqs[i % len(preds)].ad_ids, p.scores, time.time())
            if len(receipts._pending) >= 1000:
                receipts._pending.clear()

        stages = [
            ("parse", "parse + validate (orjson, pydantic)", parse),
            ("features", "features: L1 lookup, all hits", features),
            ("transform", "transform to the [100, 16] matrix", transform),
            ("gateway", "gateway predict, model answering at once (lookup + transform + bookkeeping)", gateway),
            ("respond", "response: signed id (rollout, ad digest) + JSON", respond),
            ("served", "served record for /feedback: pack + buffer", remember),
            ("forward_100", "forward pass, batch 100 (for scale)", forward),
        ]
        if k > 1:
            stages.append(("forward", f"forward pass, {k} requests of 100 rows in one call, per request",
                           forward_batch))  # fmt: skip
        out = []
        for stage, name, f in stages:
            await _each(min(n, 300), f)  # warm
            times = await _each(n if stage != "forward" else max(1, n // k), f)
            scale = 1.0 / k if stage == "forward" else 1.0
            out.append((stage, name, *(v * scale for v in _us(times))))
        await pool.close()
    return out


def limit_us(rows: list[tuple[str, str, float, float, float, float]]) -> float:
    """The in-process limit's cost of one request (us): the medians of the LIMIT stages, the
    forward pass at the coalesced batch (`forward`, else batch 100 alone)."""
    med = {key: m for key, _, m, *_ in rows}
    med.setdefault("forward", med["forward_100"])
    return sum(med[k] for k in LIMIT)


def format_rows(rows: list[tuple[str, str, float, float, float, float]]) -> str:
    lines = [
        "| stage (1 user x 100 ads, in process) | median us | p99 us | p99.9 us | max us |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {name} | {med:.0f} | {p99:.0f} | {p999:.0f} | {top:.0f} |" for _, name, med, p99, p999, top in rows]
    return "\n".join(lines)


def run(settings: Settings, n: int = 3000, batch_requests: int = 1) -> str:
    rows = asyncio.run(measure(settings, n, batch_requests))
    per = limit_us(rows)
    out = format_rows(rows)
    url = settings.canary_redis_url or (settings.redis_url if settings.redis_url.startswith("redis://") else "")
    if url:
        out += "\n" + asyncio.run(served_writes(url))
    return out + (f"\n\nin-process limit ({' + '.join(LIMIT)}): {per:.0f} us a request, "
                  f"{1e6 / per:,.0f} requests/s per core")  # fmt: skip


async def served_writes(url: str, records: int = 12_000, batches: tuple[int, ...] = (1, 16, 64)) -> str:
    """The gateway's CPU per served record written to Redis (ServedLog.flush: one HSET a round trip
    of `batch` records, as concurrent answers share one), 100 ads a record."""
    import redis.asyncio as aioredis

    from ctr.serving.canary.served import STORE_ERRORS

    client = aioredis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    log = ServedLog(client, 60.0, prefix="ctr:bench:")
    ads, scores = [f"a{i}" for i in range(100)], [0.05] * 100
    lines = []
    try:
        for batch in batches:
            cpu = 0.0
            for r in range(records // batch):
                for i in range(batch):
                    log.remember(f"n{r}-{i}.d", ads, scores, time.time())
                t0 = time.process_time()
                await log.flush()
                cpu += time.process_time() - t0
            lines.append(f"| served records written to Redis, {batch} a round trip: CPU per record (mean) | "
                         f"{cpu / (records // batch * batch) * 1e6:.0f} | | | |")  # fmt: skip
    except STORE_ERRORS as exc:
        return f"(served records not measured: {url} did not answer: {type(exc).__name__})"
    finally:
        await client.delete(*[k async for k in client.scan_iter("ctr:bench:*")] or ["ctr:bench:none"])
        await client.aclose()
    return "\n".join(lines)
