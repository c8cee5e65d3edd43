"""Capacity planning and the batch-size model of the benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctr.bench.batching import best_batch, fit
from ctr.bench.capacity import plan, qps_at_p99, servers_needed


def test_servers_needed_formula() -> None:
    """servers = ceil(peak / (per-server QPS x utilization))."""
    assert servers_needed(10_000, 400, 0.6) == 42
    assert servers_needed(240, 400, 0.6) == 1
    with pytest.raises(ValueError):
        servers_needed(100, 0, 0.5)


def test_qps_at_p99_takes_the_best_level_meeting_the_target(tmp_path: Path) -> None:
    """Levels over the p99 target or with errors do not count; fallback answers never count."""
    f = tmp_path / "b.json"
    f.write_text(json.dumps({"levels": [
        {"model_rps": 100, "fallback_rps": 0, "p99_ms": 10, "non_200": 0},
        {"model_rps": 300, "fallback_rps": 900, "p99_ms": 45, "non_200": 0},
        {"model_rps": 500, "fallback_rps": 0, "p99_ms": 80, "non_200": 0},
        {"model_rps": 350, "fallback_rps": 0, "p99_ms": 40, "non_200": 3}],
        "open_levels": [{"model_rps": 250, "fallback_rps": 0, "p99_ms": 30, "non_200": 0}]}))  # fmt: skip
    assert qps_at_p99(f, 50) == 300
    assert "| 300 |" in plan(1000, None, 50, 0.5, f) and "| 7 |" in plan(1000, None, 50, 0.5, f)


def test_a_report_that_counted_fallbacks_as_throughput_is_refused(tmp_path: Path) -> None:
    """An old report (one `rps` of every 200) cannot be read as model-scored capacity."""
    f = tmp_path / "old.json"
    f.write_text(json.dumps({"levels": [{"rps": 1400, "p99_ms": 45, "non_200": 0}]}))
    with pytest.raises(ValueError, match="re-run"):
        qps_at_p99(f, 50)


def test_loadgen_counts_model_scored_and_fallback_answers_apart() -> None:
    """A tally of mixed answers: only fallback false counts as model-scored throughput."""
    from ctr.bench.loadgen import _Tally

    t = _Tally()
    for status, body in [(200, b'{"fallback":false}'), (200, b'{"fallback":true,"degraded":["overload:shed"]}'),
                         (503, b""), (0, b"")]:  # fmt: skip
        t.add(0.010, status, body)
    t.add(0.200, 200, b'{"fallback":false}')
    r = t.result("open", 8, 100.0, 1.0, {})
    assert (r.model_scored, r.fallback, r.shed, r.non_200, r.requests) == (2, 1, 1, 2, 5)
    assert (r.model_rps, r.fallback_rps, r.fallback_share) == (2.0, 1.0, 0.2)
    assert r.max_ms == pytest.approx(200) and r.p50_ms == pytest.approx(10)


def test_fit_recovers_setup_and_per_sample_time() -> None:
    """A linear latency model is recovered exactly, and B* is the largest batch within budget."""
    t_setup, t_per = fit([1, 32, 128, 256], [0.002 + b * 1e-5 for b in (1, 32, 128, 256)])
    assert t_setup == pytest.approx(0.002) and t_per == pytest.approx(1e-5)
    assert best_batch(0.002, 1e-5, 0.003) == 100


def test_open_loop_latency_counts_the_wait_a_closed_loop_hides() -> None:
    """Against a server that serves one request per 20 ms, offered 100/s: the open loop's
    latencies (from the scheduled send time) grow with the queue; the closed loop's stay ~20 ms."""
    import asyncio

    from aiohttp import web

    from ctr.bench.loadgen import _level, open_level
    from ctr.bench.local_server import free_port

    async def go() -> tuple[float, float]:
        lock = asyncio.Lock()

        async def predict(request: web.Request) -> web.Response:
            async with lock:
                await asyncio.sleep(0.02)
            return web.Response(body=b'{"fallback":false}', content_type="application/json")

        async def metrics(request: web.Request) -> web.Response:
            return web.Response(text="")

        app = web.Application()
        app.add_routes([web.post("/predict", predict), web.get("/metrics", metrics)])
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            url = f"http://127.0.0.1:{port}"
            closed = await _level(url, 1, 0.5, [b"{}"])
            opened = await open_level(url, 100.0, 0.5, [b"{}"])
        finally:
            await runner.cleanup()
        assert opened.requests == 50 and opened.model_scored == 50
        return closed.p99_ms, opened.max_ms

    closed_p99, open_max = asyncio.run(go())
    assert closed_p99 < 100 and open_max > 300  # 50 requests queued behind 20 ms each: ~0.5 s for the last


def test_open_loop_reports_how_far_behind_schedule_it_sent() -> None:
    """A generator stall (here a request that blocks the loop for 30 ms) makes the next sends
    late, and open_loop says by how much: the burst the server then sees is the client's."""
    import asyncio
    import time

    from ctr.bench.loadgen import open_loop

    async def one(i: int, scheduled: float) -> None:
        if i == 2:
            time.sleep(0.03)

    # The schedule starts 100 ms ahead: the loop's start-up must not make every send late before
    # the stall (on a loaded machine it did, and the stall then ran after the last send).
    late = asyncio.run(open_loop(10, 1000.0, time.perf_counter() + 0.1, one))
    assert late >= 0.025


def test_open_loop_raises_a_requests_error_instead_of_dropping_it() -> None:
    """Only unfinished tasks are kept; a request that raised must still fail the run (else it
    would silently count as a request never sent)."""
    import asyncio
    import time

    from ctr.bench.loadgen import open_loop

    async def one(i: int, scheduled: float) -> None:
        if i == 0:
            raise RuntimeError("request 0 failed")

    with pytest.raises(RuntimeError, match="request 0 failed"):
        asyncio.run(open_loop(5, 1000.0, time.perf_counter(), one))
