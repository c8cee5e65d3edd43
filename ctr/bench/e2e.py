"""`ctr bench e2e`: the service, a monolith peer and the in-process limit, side by side."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import sys
from dataclasses import asdict
from pathlib import Path

from ctr.bench import loadgen
from ctr.bench.capacity import best_rps
from ctr.bench.local_server import PeakRss, free_port, serving
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


def _peer_levels(
    settings: Settings, levels: list[int], duration: float, n_ads: int, factory: str
) -> list[loadgen.LevelResult]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "uvicorn", factory, "--factory", "--host", "127.0.0.1", "--port",
           str(port), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
           "--log-level", "warning"]  # fmt: skip
    with serving(url, timeout_s=60, cmd=cmd):
        return loadgen.run_levels(url, levels, duration, n_ads, settings.data_dir)


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


def run(
    settings: Settings,
    url: str,
    levels: list[int],
    duration: float,
    n_ads: int,
    peers: bool,
    out: Path,
    rates: list[float] | None = None,
) -> str:
    """Closed-loop levels, then open-loop rates (`rates`, or shares of the best closed-loop
    model-scored rps when None; [] for none), beside the peer and the in-process limit."""
    lines = []
    if peers and settings.redis_url:
        _fill_l2(settings)
    with serving(url) as proc:
        rss = PeakRss(proc.pid) if proc is not None else None
        with rss or contextlib.nullcontext():
            rows = loadgen.run_levels(url, levels, duration, n_ads, settings.data_dir)
            rates = open_rates(rows) if rates is None else rates
            open_rows = loadgen.run_rates(url, rates, duration, n_ads, settings.data_dir) if rates else []
        peak = rss.peak if rss is not None else None
    lines += [f"ctr-serve (BentoML), 1 user x {n_ads} ads, closed loop (c workers):",
              loadgen.format_table(rows), "", _stages_line(rows)]  # fmt: skip
    if open_rows:
        lines += ["", "open loop (fixed arrival rate; latency from the scheduled send time):",
                  loadgen.format_table(open_rows, stages=False)]  # fmt: skip
    if peak is not None:
        lines.append(f"\npeak RSS of the whole service graph: {peak / 2**20:.0f} MiB")
    result: dict[str, object] = {"n_ads": n_ads, "levels": [asdict(r) for r in rows],
                                 "open_levels": [asdict(r) for r in open_rows], "peak_rss_bytes": peak}  # fmt: skip
    best = best_rps([asdict(r) for r in rows])
    best_open = f"; open loop: {best_rps([asdict(r) for r in open_rows]):.0f} rps" if open_rows else ""
    lines.append(f"\nbest model-scored throughput at p99 <= 50 ms, closed loop: {best:.0f} rps{best_open}")
    if peers and settings.redis_url:
        from ctr.bench.peer import run_inprocess

        c1 = rows[0] if rows else None
        for label, factory in PEERS:
            if label == "FastAPI" and importlib.util.find_spec("fastapi") is None:
                lines += ["", "FastAPI peer skipped: FastAPI is not installed (pip install -e '.[bench]')"]
                continue
            peer_rows = _peer_levels(settings, levels, duration, n_ads, factory)
            best_peer = best_rps([asdict(r) for r in peer_rows])
            ratio = best / best_peer if best_peer else float("nan")
            p1 = peer_rows[0] if peer_rows else None
            lines += ["", f"monolith peer ({label} + uvicorn, one MGET, model per request), closed loop:",
                      loadgen.format_table(peer_rows), "",
                      f"best model-scored throughput at p99 <= 50 ms (closed loop): ctr-serve {best:.0f} rps, "
                      f"{label} peer {best_peer:.0f} rps, ratio {ratio:.2f}"]  # fmt: skip
            if c1 is not None and p1 is not None:
                lines.append(f"c={c1.concurrency} p50 / p99: ctr-serve {c1.p50_ms:.2f} / {c1.p99_ms:.2f} ms, "
                             f"{label} peer {p1.p50_ms:.2f} / {p1.p99_ms:.2f} ms")  # fmt: skip
            result[f"peer_{label.lower()}"] = [asdict(r) for r in peer_rows]
        bodies = loadgen.Traffic(settings.data_dir, n_ads).bodies(2000)
        limit_rps, limit_p99 = run_inprocess(settings, bodies, duration)
        lines += ["", f"in-process limit (fetch + transform + forward in a loop, no HTTP): {limit_rps:.0f} requests/s "
                  f"({limit_rps * n_ads:,.0f} candidates/s), p99 {limit_p99:.2f} ms",
                  f"model-scored candidates/s at p99 <= 50 ms / in-process limit: {best / limit_rps:.0%}"]  # fmt: skip
        result.update(inprocess_rps=limit_rps)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return "\n".join(lines)
