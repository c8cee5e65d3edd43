"""`ctr bench coalescing`: the deadline-aware window beside the fixed one, in this process.

The gateway as the service builds it (L1 warmed, the model in this process as CTR_MODEL_REPLICA
=local runs it, CTR_LOCAL_FORWARD as set), driven without HTTP by a closed loop of `c`
concurrent callers of `Gateway.predict` (1 user x 100 ads, the load generator's Zipf
traffic), for each window and level, the windows alternated pass by pass. Per run: p50 and
p99 latency, model-scored answers a second, fallbacks, and the mean rows per model call.
HTTP is left out on purpose: it costs the same under both windows and would drown the
difference in noise on a shared machine (ctr bench e2e measures it over HTTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ctr.api.contract import parse_predict
from ctr.bench.loadgen import Traffic
from ctr.features import stack as feature_stack
from ctr.features.warm import warm
from ctr.model import store as modelstore
from ctr.settings import Settings

WINDOWS = ("fixed", "deadline")


async def _level(gw: Any, pool: Any, reqs: list[Any], c: int, duration_s: float) -> dict[str, float]:
    lat: list[float] = []
    fallbacks = 0
    end = time.perf_counter() + duration_s
    coalescers = [m.coalescer for m in pool.members]

    async def client(k: int) -> None:
        nonlocal fallbacks
        i = k
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            p = await gw.predict(reqs[i % len(reqs)])
            lat.append(time.perf_counter() - t0)
            fallbacks += p.fallback
            i += c

    rows_calls = _RowsPerCall(coalescers)  # counts this run's calls only
    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(c)))
    took = time.perf_counter() - t0
    a = np.array(lat) * 1e3
    return {
        "p50_ms": float(np.median(a)),
        "p99_ms": float(np.percentile(a, 99)),
        "model_rps": (len(lat) - fallbacks) / took,
        "fallbacks": float(fallbacks),
        "rows_per_call": rows_calls.rows / max(1, rows_calls.calls),
    }


class _RowsPerCall:
    """Counts the model calls of the coalescers and their rows (wraps each coalescer's call)."""

    def __init__(self, coalescers: list[Any]) -> None:
        self.calls = self.rows = 0
        for co in coalescers:
            inner = co._call

            async def call(x: np.ndarray, inner: Any = inner) -> np.ndarray:
                self.calls += 1
                self.rows += len(x)
                return await inner(x)

            co._call = call


async def measure(settings: Settings, levels: list[int], duration_s: float, passes: int) -> list[tuple[Any, ...]]:
    from ctr.model.runner import ModelRunner
    from ctr.observe.pauses import settle_gc
    from ctr.serving import root
    from ctr.serving.coalesce import Upstream

    art = modelstore.artifacts(settings.model_tag)
    reqs = [parse_predict(b, settings.max_ads) for b in Traffic(settings.data_dir, 100).bodies(2000)]
    runner = ModelRunner(art, "cpu", settings.torch_threads, settings.model_precision, settings.model_engine)
    rows: list[tuple[Any, ...]] = []
    async with feature_stack.opened(settings.model_copy(update={"redis_url": ""})) as stack:
        await warm(stack.store, 10**9, stack.schema)
        for r in reqs:  # every key in L1 from here on
            await stack.lookup.lookup(r.user_id, r.ad_ids)
        settle_gc()
        gws = {}
        for w in WINDOWS:
            s = settings.model_copy(update={"model_urls": "", "batch_window": w})
            up = Upstream()  # one counter for the gateway and its pool, as root.build makes it
            pool = root.model_pool(s, None, runner.n_fields, local=runner, upstream=up)
            await pool.start()
            gws[w] = (root.gateway(s, art, pool, stack, upstream=up), pool)
        for c in levels:
            for w in WINDOWS:  # warm each: the deadline window learns its call cost
                await _level(*gws[w], reqs, c, min(1.0, duration_s))
            for p in range(passes):
                for w in WINDOWS if p % 2 == 0 else reversed(WINDOWS):
                    rows.append((c, w, p, await _level(*gws[w], reqs, c, duration_s)))
        for _, pool in gws.values():
            await pool.close()
    return rows


def measure_http(settings: Settings, levels: list[int], duration_s: float, passes: int) -> list[tuple[Any, ...]]:
    """The same comparison over HTTP: one `bentoml serve` per window (each its own BENTOML_HOME,
    a copy of this one's models), both up, the load alternating between them."""
    from ctr.bench import loadgen
    from ctr.bench.local_server import free_port, serving

    home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    rows: list[tuple[Any, ...]] = []
    with tempfile.TemporaryDirectory(prefix="ctr-coalescing-") as tmp, contextlib.ExitStack() as stack:
        urls = {}
        for w in WINDOWS:
            shutil.copytree(home / "models", Path(tmp) / w / "models", symlinks=True)
            urls[w] = f"http://127.0.0.1:{free_port()}"
            env = {"CTR_BATCH_WINDOW": w, "BENTOML_HOME": str(Path(tmp) / w)}
            stack.enter_context(serving(urls[w], timeout_s=300, env=env))
        for w in WINDOWS:  # warm: caches, connections, the deadline window's call cost
            loadgen.run_levels(urls[w], [8], min(3.0, duration_s), 100, settings.data_dir)
        for c in levels:
            for p in range(passes):
                for w in WINDOWS if p % 2 == 0 else reversed(WINDOWS):
                    (r,) = loadgen.run_levels(urls[w], [c], duration_s, 100, settings.data_dir, warm_up=False)
                    got = {"p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "model_rps": r.model_rps,
                           "fallbacks": float(r.fallback), "rows_per_call": float("nan")}  # fmt: skip
                    rows.append((c, w, p, got))
    return rows


def _rows(x: float) -> str:
    return "–" if x != x else f"{x:.0f}"  # over HTTP the calls are in the server: not counted


def run(settings: Settings, levels: list[int], duration_s: float = 5.0, passes: int = 4, http: bool = False) -> str:
    if http:
        rows = measure_http(settings, levels, duration_s, passes)
    else:
        rows = asyncio.run(measure(settings, levels, duration_s, passes))
    head = [
        f"| c | window | p50 ms | p99 ms | model-scored rps | fallbacks | rows per call | (median of {passes} "
        f"alternated runs of {duration_s:g} s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    out = []
    for c in levels:
        med = {}
        for w in WINDOWS:
            runs = [r[3] for r in rows if r[0] == c and r[1] == w]
            med[w] = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
            m = med[w]
            out.append(f"| {c} | {w} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['model_rps']:.0f} | "
                       f"{sum(x['fallbacks'] for x in runs):.0f} | {_rows(m['rows_per_call'])} | |")  # fmt: skip
        f, d = med["fixed"], med["deadline"]
        out.append(f"| {c} | deadline / fixed | {d['p50_ms'] / f['p50_ms']:.2f}x | {d['p99_ms'] / f['p99_ms']:.2f}x | "
                   f"{d['model_rps'] / f['model_rps']:.2f}x | | | |")  # fmt: skip
    window_ms = settings.batch_window_ms
    notes = [
        "",
        ("over HTTP, one `bentoml serve` per window; " if http else "in process, no HTTP; ")
        + f"fixed: CTR_BATCH_WINDOW_MS={window_ms:g}; CTR_LOCAL_FORWARD={settings.local_forward}; "
        f"CTR_BATCH_MAX_INFLIGHT={settings.batch_max_inflight}; deadline {settings.deadline_ms:g} ms",
    ]
    return "\n".join(head + out + notes)
