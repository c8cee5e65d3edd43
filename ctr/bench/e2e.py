"""`ctr bench e2e`: the service, a monolith peer and the in-process limit, side by side."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import orjson

from ctr.bench import loadgen
from ctr.bench.capacity import best_rps
from ctr.bench.local_server import PeakRss, free_port, serving, tree_cpu_s
from ctr.settings import Settings

# The reference design's stage budget (ms) beside the measured stage means.
REFERENCE_MS = {"gateway": 0.3, "features": 2.0, "transform": 1.0, "inference": 3.0, "response": 0.5, "total": 7.0}


def _fill_l2(settings: Settings) -> None:
    """Every user and ad into Redis, so the peer's single MGET finds what the service finds."""
    from ctr.features import stack as feature_stack
    from ctr.features.warm import warm

    async def go() -> None:
        async with feature_stack.opened(settings) as stack:
            await warm(stack.store, 10**9)

    asyncio.run(go())


# The two monolith peers: (label, uvicorn factory).
PEERS = (
    ("FastAPI", "ctr.bench.peer:make_app"),
    ("Starlette", "ctr.bench.peer:make_starlette_app"),
)
# What HTTP alone costs here: the same uvicorn + Starlette route, parsing and validating the body,
# answering constant scores (no features, no model). Not a peer: its answers are no model's work.
FLOOR = ("HTTP floor", "ctr.bench.peer:make_floor_app")


def _peer_levels(
    settings: Settings, levels: list[int], duration: float, n_ads: int, factory: str, workers: int
) -> list[loadgen.LevelResult]:
    """The peer under uvicorn with `workers` processes (as many as the gateway has)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "uvicorn", factory, "--factory", "--host", "127.0.0.1", "--port",
           str(port), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
           "--log-level", "warning", "--workers", str(workers)]  # fmt: skip
    with serving(url, timeout_s=60, cmd=cmd) as proc:
        cpu = (lambda: tree_cpu_s(proc.pid)) if proc is not None else None
        return loadgen.run_levels(url, levels, duration, n_ads, settings.data_dir, server_cpu=cpu)


def _stages_line(rows: list[loadgen.LevelResult]) -> str:
    """Measured stage means at the lowest concurrency beside the reference budget."""
    r = rows[0]
    m = r.stage_ms
    request = m.get("request", float("nan"))
    inner = sum(m.get(k, 0.0) for k in ("features", "transform", "inference"))
    measured = {
        "gateway": (r.p50_ms - request) / 2,  # HTTP in and out of the gateway, split evenly
        "features": m.get("features", float("nan")),
        "transform": m.get("transform", float("nan")),
        "inference": m.get("inference", float("nan")),
        "response": (r.p50_ms - request) / 2 + (request - inner),
        "total": r.p50_ms,
    }
    head = f"| stage (c={r.concurrency}) | " + " | ".join(REFERENCE_MS) + " |"
    lines = [head, "|---" * (len(REFERENCE_MS) + 1) + "|"]
    lines.append("| reference ms | " + " | ".join(f"{v:g}" for v in REFERENCE_MS.values()) + " |")
    lines.append("| measured ms | " + " | ".join(f"{measured[k]:.2f}" for k in REFERENCE_MS) + " |")
    return "\n".join(lines)


OPEN_SHARES = (0.5, 0.7, 0.9, 1.1)  # open-loop rates, as shares of the best closed-loop model-scored rps


def open_rates(rows: list[loadgen.LevelResult], shares: tuple[float, ...] = OPEN_SHARES) -> list[float]:
    """Open-loop arrival rates around the closed loop's best model-scored rps at p99 <= 50 ms."""
    best = best_rps([asdict(r) for r in rows]) or max((r.model_rps for r in rows), default=0.0)
    return [round(best * k) for k in shares if best * k >= 1]


def best_level(rows: list[loadgen.LevelResult], p99_ms: float = 50.0) -> loadgen.LevelResult | None:
    """The level with the best model-scored rps whose p99 met the target with no errors."""
    ok = [r for r in rows if r.p99_ms <= p99_ms and r.non_200 == 0]
    return max(ok, key=lambda r: r.model_rps, default=None)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _yardsticks(runs: dict[str, list[list[loadgen.LevelResult]]], workers: int) -> list[str]:
    """One row per measure: each contestant's passes and their median, and the ratio to each peer."""
    names = list(runs)
    proc = {n: f"{workers} gateway process(es)" if n == SERVICE else f"{workers} uvicorn worker(s)" for n in names}
    head = "| measure | " + " | ".join(f"{n} ({proc[n]})" for n in names) + " | "
    head += " | ".join(f"ratio to {n}" for n in names[1:]) + " |"
    lines = [head, "|---" * (2 * len(names)) + "|"]

    def c1(n: str, attr: str) -> list[float]:
        return [getattr(p[0], attr) for p in runs[n] if p and p[0].concurrency == 1]

    def best(n: str) -> list[float]:
        return [b.model_rps if (b := best_level(p)) else 0.0 for p in runs[n]]

    measures = [
        ("best model-scored rps at p99 <= 50 ms", best, "{:.0f}"),
        ("c=1 p50 ms", lambda n: c1(n, "p50_ms"), "{:.2f}"),
        ("c=1 p99 ms", lambda n: c1(n, "p99_ms"), "{:.2f}"),
        ("c=1 p99.9 ms", lambda n: c1(n, "p999_ms"), "{:.2f}"),
        ("fallbacks (all levels)", lambda n: [float(sum(r.fallback for r in p)) for p in runs[n]], "{:.0f}"),
        ("non-200 (all levels)", lambda n: [float(sum(r.non_200 for r in p)) for p in runs[n]], "{:.0f}"),
    ]
    for title, get, fmt in measures:
        vals = {n: get(n) for n in names}
        cells = [" / ".join(fmt.format(v) for v in vals[n]) + f" (median {fmt.format(_median(vals[n]))})"
                 for n in names]  # fmt: skip
        ratios = [f"{_median(vals[SERVICE]) / _median(vals[n]):.2f}x" if _median(vals[n]) else "-" for n in names[1:]]
        lines.append(f"| {title} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return lines


SERVICE = "ctr-serve"


def _per_core(best: list[loadgen.LevelResult], cores: int, workers: int) -> tuple[float, float, float]:
    """(median best rps, the load generator's cores, the server's cores: those the generator
    left, at most one per server process)."""
    client = _median([b.client_cores for b in best])
    return _median([b.model_rps for b in best]), client, max(min(float(workers), cores - client), 0.1)


def _floor_json_us(n_ads: int, calls: int = 2000) -> float:
    """The floor's own answer encoding (orjson of `n_ads` constant scores), us a call."""
    answer = {"request_id": "", "scores": [0.5] * n_ads, "model_version": "floor", "arm": "stable",
              "fallback": False, "degraded": []}  # fmt: skip
    t0 = time.perf_counter()
    for _ in range(calls):
        orjson.dumps(answer)
    return (time.perf_counter() - t0) / calls * 1e6


def _floor(
    rows: list[tuple[str, str, float, float, float, float]],
    floor_runs: list[list[loadgen.LevelResult]],
    n_ads: int = 100,
) -> tuple[list[str], dict[str, float]]:
    """The HTTP floor's CPU a request at its best level (its server's own, measured), less the
    parse the in-process limit (`rows`, `ctr bench stages`) already counts and the floor's own
    JSON (timed here): what HTTP adds to a request; and the most of the limit a service can
    serve behind it."""
    from ctr.bench import stages

    best = [b for p in floor_runs if (b := best_level(p)) is not None and b.requests and b.server_cpu_s > 0]
    if not best:
        return [], {}
    floor_us = _median([1e6 * b.server_cpu_s / b.requests for b in best])
    own = {key: med for key, _, med, *_ in rows}
    http_us = max(floor_us - own.get("parse", 0.0) - _floor_json_us(n_ads), 0.0)
    per_us = stages.limit_us(rows)
    ceiling = per_us / (per_us + http_us)
    line = (f"HTTP floor (uvicorn + Starlette, body parsed and validated, constant scores): its server's CPU "
            f"{floor_us:.0f} us a request at its best level ({_median([b.model_rps for b in best]):.0f} rps), "
            f"{http_us:.0f} us of it HTTP (less the parse the limit counts and its own JSON); the service's own "
            f"work behind it: {1e6 / (per_us + http_us):,.0f} requests/s per core = {ceiling:.0%} of the in-process "
            f"limit at most")  # fmt: skip
    return [line], {"floor_us": floor_us, "floor_http_us": http_us, "ceiling_share": ceiling}


def _limit_lines(
    settings: Settings,
    service_runs: list[list[loadgen.LevelResult]],
    cores: int,
    workers: int,
    floor_runs: list[list[loadgen.LevelResult]] | None = None,
    n_ads: int = 100,
) -> tuple[list[str], dict[str, float]]:
    """The in-process limit per core at the coalescer's batch, and the share of it served per core:
    the service's cores are the cores the load generator left, at most one per gateway process
    (each runs one event loop with one torch thread). With the HTTP floor's runs, also the share
    the limit allows behind that floor (its cost a request added to the service's own work)."""
    from ctr.bench import stages

    bests = [b for p in service_runs if (b := best_level(p)) is not None]
    if not bests:
        return ["in-process limit: no level met p99 <= 50 ms"], {}
    batch = _median([b.batch_requests for b in bests if b.batch_requests == b.batch_requests]) or 1.0
    k = max(1, round(batch if batch == batch else 1.0))
    rows = asyncio.run(stages.measure(settings, 1000, k))
    per_us = stages.limit_us(rows)
    limit = 1e6 / per_us
    served, client, service_cores = _per_core(bests, cores, workers)
    share = served / service_cores / limit
    lines = ["in-process limit per core (the service's own work for one request, no HTTP; "
             "`ctr bench stages --batch K`):", stages.format_rows(rows), "",
             f"the coalescer's batch at the best level: {batch:.1f} requests a model call (forward timed at {k}); "
             f"a request's own work {per_us:.0f} us = {limit:,.0f} requests/s per core",
             f"served: {served:.0f} model-scored rps on {cores} cores, of which the load generator took "
             f"{client:.2f}; {workers} gateway process(es) on {service_cores:.2f} cores: "
             f"{served / service_cores:.0f} rps per core = "
             f"{share:.0%} of the in-process limit per core"]  # fmt: skip
    out = {"limit_rps_per_core": limit, "limit_us": per_us, "batch_requests": batch, "client_cores": client,
           "served_per_core": served / service_cores, "share": share}  # fmt: skip
    floor_lines, floor = _floor(rows, floor_runs or [], n_ads)
    if floor:
        floor_lines[-1] += f"; served {share / floor['ceiling_share']:.0%} of it"
    return [*lines, *floor_lines], out | floor


def run(
    settings: Settings,
    url: str,
    levels: list[int],
    duration: float,
    n_ads: int,
    peers: bool,
    out: Path,
    rates: list[float] | None = None,
    passes: int = 2,
) -> str:
    """Closed-loop levels of the service and each peer in `passes` alternated passes (service,
    peers; peers, service; ...), the peers with as many uvicorn workers as the gateway has
    processes; then open-loop rates (`rates`, or shares of the best closed-loop model-scored
    rps when None; [] for none) for the service; beside them the in-process limit per core."""
    from ctr.serving.placement import gateway_workers, usable_cores

    workers, cores = gateway_workers(settings), usable_cores()
    with_peers = peers and bool(settings.redis_url)
    if with_peers:
        _fill_l2(settings)
    have_fastapi = importlib.util.find_spec("fastapi") is not None
    peer_list = [(lb, f) for lb, f in PEERS if lb != "FastAPI" or have_fastapi] if with_peers else []
    runs: dict[str, list[list[loadgen.LevelResult]]] = {SERVICE: [], **{label: [] for label, _ in peer_list}}
    floor_runs: list[list[loadgen.LevelResult]] = []  # no Redis needed; apart from the peers' ratios
    open_rows: list[loadgen.LevelResult] = []
    peak: int | None = None
    for p in range(max(1, passes)):
        order = [SERVICE, *(label for label, _ in peer_list), *([FLOOR[0]] if peers else [])]
        for who in order if p % 2 == 0 else reversed(order):
            if who == FLOOR[0]:
                floor_runs.append(_peer_levels(settings, levels, duration, n_ads, FLOOR[1], workers))
                continue
            if who != SERVICE:
                runs[who].append(_peer_levels(settings, levels, duration, n_ads, dict(peer_list)[who], workers))
                continue
            with serving(url) as proc:
                rss = PeakRss(proc.pid) if proc is not None else None
                with rss or contextlib.nullcontext():
                    rows = loadgen.run_levels(url, levels, duration, n_ads, settings.data_dir)
                    if p == 0:
                        rates = open_rates(rows) if rates is None else rates
                        open_rows = loadgen.run_rates(url, rates, duration, n_ads, settings.data_dir) if rates else []
                peak = max(peak or 0, rss.peak) if rss is not None else peak
            runs[SERVICE].append(rows)
    lines = [f"{cores} cores; the gateway runs {workers} process(es) (CTR_GATEWAY_WORKERS), each peer as many "
             f"uvicorn workers; {len(runs[SERVICE])} alternated pass(es) (service, peers; peers, service)",
             ""]  # fmt: skip
    for p, rows in enumerate(runs[SERVICE]):
        lines += [f"ctr-serve (BentoML, {workers} gateway process(es)), 1 user x {n_ads} ads, closed loop, "
                  f"pass {p + 1}:", loadgen.format_table(rows), "", _stages_line(rows), ""]  # fmt: skip
    if open_rows:
        lines += ["open loop (fixed arrival rate; latency from the scheduled send time):",
                  loadgen.format_table(open_rows, stages=False), ""]  # fmt: skip
    for label, _ in peer_list:
        for p, rows in enumerate(runs[label]):
            lines += [f"monolith peer ({label} + uvicorn, {workers} worker(s), one MGET, model per request), "
                      f"closed loop, pass {p + 1}:", loadgen.format_table(rows, stages=False), ""]  # fmt: skip
    for p, rows in enumerate(floor_runs):
        lines += [f"HTTP floor (uvicorn + Starlette, {workers} worker(s), constant scores: no features, no model; not "
                  f"model-scored work), closed loop, pass {p + 1}:", loadgen.format_table(rows, stages=False),
                  "server CPU a request (us): " + ", ".join(
                      f"c={r.concurrency} {1e6 * r.server_cpu_s / r.requests:.0f}" for r in rows if r.requests),
                  ""]  # fmt: skip
    if peak is not None:
        lines.append(f"peak RSS of the whole service graph: {peak / 2**20:.0f} MiB\n")
    lines += ["yardsticks (each pass's figure, and their median):", *_yardsticks(runs, workers), ""]
    limit: dict[str, float] = {}
    if peers:
        limit_lines, limit = _limit_lines(settings, runs[SERVICE], cores, workers, floor_runs, n_ads)
        lines += limit_lines
    best = _median([best_rps([asdict(r) for r in rows]) for rows in runs[SERVICE]])
    result: dict[str, object] = {
        "n_ads": n_ads, "workers": workers, "cores": cores,
        # `levels`, the service's last pass, is what `ctr capacity` reads
        "levels": [asdict(r) for r in runs[SERVICE][-1]], "passes": [[asdict(r) for r in p] for p in runs[SERVICE]],
        "open_levels": [asdict(r) for r in open_rows], "peak_rss_bytes": peak, "best_rps": best, "limit": limit,
        **{f"peer_{label.lower()}": [[asdict(r) for r in p] for p in runs[label]] for label, _ in peer_list},
        "floor": [[asdict(r) for r in p] for p in floor_runs],
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return "\n".join(lines)
