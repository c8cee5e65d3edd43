"""The soak: open-loop /predict load and a stream of feature writes for a fixed time, while
faults are injected on a schedule; a report per time bucket.

What a soak answers that the fault tests do not: does the service keep answering through
one fault after another under steady load (availability, model-scored share and p99 per
bucket), does memory stay flat (RSS of every process at start and end), and is every
acknowledged feature write in L3 at the end. The caller starts the servers and provides
the faults (tests/test_soak.py, `make soak`); this module only drives and reports.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import numpy as np
import orjson

from ctr.bench.loadgen import _post, _session, open_loop


@dataclass(frozen=True, slots=True)
class Fault:
    """`inject` at `at_s` after the start, `repair` `hold_s` later."""

    at_s: float
    name: str
    inject: Callable[[], None]
    repair: Callable[[], None]
    hold_s: float


@dataclass(frozen=True, slots=True)
class Sample:
    t_s: float  # scheduled send time, from the start
    latency_s: float  # from the scheduled send time
    outcome: str  # "model" (200, fallback false), "shed" (200, overload:shed), "fallback" (other 200s), "error"
    status: int  # HTTP status; 0 for a connection error or client timeout


@dataclass
class Traffic:
    """What the soak sent and what came back."""

    samples: list[Sample] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)  # entity ids of writes answered 200
    refused_writes: int = 0  # answered 503 (store down) or failed: not acknowledged, not expected in L3
    events: list[tuple[float, str]] = field(default_factory=list)


async def _predicts(url: str, rate: float, duration_s: float, bodies: list[bytes], t0: float, out: Traffic) -> None:
    n = int(rate * duration_s)
    async with _session(512) as session:

        async def one(i: int, scheduled: float) -> None:
            status, body = await _post(session, url, bodies[i % len(bodies)])
            if status != 200:
                outcome = "error"
            elif b'"fallback":true' not in body:
                outcome = "model"
            else:
                outcome = "shed" if b"overload:shed" in body else "fallback"
            out.samples.append(Sample(scheduled - t0, time.perf_counter() - scheduled, outcome, status))

        await open_loop(n, rate, t0, one)


async def _writes(url: str, token: str, group: str, every_s: float, duration_s: float, prefix: str,
                  t0: float, out: Traffic) -> None:  # fmt: skip
    """One write-behind row per `every_s`, each to a new entity id, so L3 must hold them all."""
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=5)) as session:
        n = 0
        while time.perf_counter() - t0 < duration_s:
            entity = f"{prefix}{n}"
            body = orjson.dumps({"group": group, "rows": [{"id": entity, "values": [1000 + n, n % 50]}]})
            try:
                async with session.post(url + "/admin/features", data=body) as r:
                    ok = r.status == 200 and (await r.json())["written"] == 1
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                out.acknowledged.append(entity)
            else:
                out.refused_writes += 1
            n += 1
            await asyncio.sleep(every_s)


def run(
    url: str,
    rate: float,
    duration_s: float,
    bodies: list[bytes],
    faults: list[Fault],
    admin_token: str,
    write_group: str = "ad_stats",
    write_every_s: float = 0.05,
    prefix: str = "soak-",
) -> Traffic:
    """Drive the load and the writes in a thread for `duration_s`; inject the faults from this one."""
    out = Traffic()
    t0 = time.perf_counter()

    async def both() -> None:
        await asyncio.gather(
            _predicts(url, rate, duration_s, bodies, t0, out),
            _writes(url, admin_token, write_group, write_every_s, duration_s, prefix, t0, out),
        )

    thread = threading.Thread(target=asyncio.run, args=(both(),), daemon=True)
    thread.start()
    for f in sorted(faults, key=lambda f: f.at_s):
        time.sleep(max(0.0, t0 + f.at_s - time.perf_counter()))
        out.events.append((time.perf_counter() - t0, f"{f.name}: inject"))
        f.inject()
        time.sleep(f.hold_s)
        f.repair()
        out.events.append((time.perf_counter() - t0, f"{f.name}: repaired"))
    thread.join(duration_s + 60)
    return out


@dataclass(frozen=True, slots=True)
class Bucket:
    start_s: float
    requests: int
    availability: float  # 200 answers / requests
    model_share: float  # model-scored answers / requests
    shed_share: float  # answered at once from the segment table at the concurrency limit / requests
    p99_ms: float
    faults: str


def _share(samples: list[Sample], pred: Callable[[Sample], bool]) -> float:
    return sum(map(pred, samples)) / len(samples) if samples else float("nan")


def buckets(traffic: Traffic, bucket_s: float, duration_s: float) -> list[Bucket]:
    out = []
    for k in range(int(np.ceil(duration_s / bucket_s))):
        lo, hi = k * bucket_s, (k + 1) * bucket_s
        s = [x for x in traffic.samples if lo <= x.t_s < hi]
        n = len(s)
        lat = np.array([x.latency_s for x in s]) * 1000
        names = sorted({e.split(":")[0] for t, e in traffic.events if lo <= t < hi})

        p99 = float(np.percentile(lat, 99)) if n else float("nan")
        out.append(Bucket(lo, n, _share(s, lambda x: x.outcome != "error"), _share(s, lambda x: x.outcome == "model"),
                          _share(s, lambda x: x.outcome == "shed"), p99, ", ".join(names)))  # fmt: skip
    return out


def report(
    traffic: Traffic,
    bucket_s: float,
    duration_s: float,
    rate: float,
    rss_start: dict[str, int],
    rss_end: dict[str, int],
    in_l3: int,
) -> str:
    lines = [f"open loop at {rate:.0f} requests/s for {duration_s:.0f} s; buckets of {bucket_s:.0f} s", "",
             "| from s | requests | availability | model-scored | shed | p99 ms | faults in the bucket |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for b in buckets(traffic, bucket_s, duration_s):
        lines.append(f"| {b.start_s:.0f} | {b.requests} | {b.availability:.2%} | {b.model_share:.1%} "
                     f"| {b.shed_share:.1%} | {b.p99_ms:.1f} | {b.faults} |")  # fmt: skip
    n = len(traffic.samples)
    errors = sum(x.outcome == "error" for x in traffic.samples)
    model = sum(x.outcome == "model" for x in traffic.samples)
    statuses = Counter(x.status for x in traffic.samples if x.outcome == "error")
    failed = ", ".join(f"{k or 'connection error/timeout'}: {v}" for k, v in sorted(statuses.items())) or "none"
    lines += ["", f"all: {n} requests, availability {(n - errors) / n:.3%}, model-scored {model / n:.1%}; "
              f"not answered 200: {failed}", "",
              "| process | RSS at start MiB | RSS at end MiB |", "|---|---|---|"]  # fmt: skip
    for name in sorted(set(rss_start) | set(rss_end)):
        lines.append(f"| {name} | {rss_start.get(name, 0) / 2**20:.0f} | {rss_end.get(name, 0) / 2**20:.0f} |")
    lines += ["", f"feature writes: {len(traffic.acknowledged)} acknowledged, {in_l3} found in L3, "
              f"{traffic.refused_writes} refused (503 while a store was down: not acknowledged)", "",
              "events: " + "; ".join(f"{t:.1f} s {e}" for t, e in traffic.events)]  # fmt: skip
    return "\n".join(lines)
