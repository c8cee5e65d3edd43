"""The profile summary: py-spy's raw stacks summed by the package of the running frame."""

from pathlib import Path
from typing import Any

import pytest

from ctr.bench.profile import format_summary, package_of, summarize

RAW = [
    "run (asyncio/runners.py:118);predict (ctr/http.py:40);matrix (ctr/transform.py:148) 30",
    "run (asyncio/runners.py:118);__call__ (opentelemetry/instrumentation/asgi/__init__.py:724) 12",
    "run (asyncio/runners.py:118);forward (models/deepfm.py:80);linear (torch/nn/modules/linear.py:125) 50",
    "run (asyncio/runners.py:118);_run_once (asyncio/base_events.py:1922) 8",
    "",
    "not a stack line",
]


def test_package_of_names_the_innermost_frame_s_package() -> None:
    assert package_of("matrix (ctr/transform.py:148)") == "ctr (ours)"
    assert package_of("forward (models/deepfm.py:80)") == "models (ours)"
    assert package_of("linear (torch/nn/modules/linear.py:125)") == "torch"
    assert package_of("x (site-packages/opentelemetry/trace/__init__.py:1200)") == "opentelemetry"
    assert package_of("uuid4 (uuid.py:724)") == "other"


def test_summarize_counts_samples_by_package_and_skips_junk() -> None:
    total, by = summarize(RAW)
    assert total == 100
    assert by == {"ctr (ours)": 30, "opentelemetry": 12, "torch": 50, "asyncio": 8}


def test_format_summary_gives_shares_and_busy_fraction() -> None:
    total, by = summarize(RAW)
    text = format_summary("ctr_gateway", total, by, rate=100, duration_s=2.0)
    assert "busy 50% of one core" in text
    assert "| torch | 50.0% |" in text
    assert text.index("torch") < text.index("ctr (ours)") < text.index("opentelemetry")
    assert format_summary("idle", 0, summarize([])[1], rate=100, duration_s=1.0).startswith("idle: 0 samples")


def test_steady_reads_the_gateways_own_account_of_a_window() -> None:
    """`ctr bench steady` turns two /metrics scrapes into fallbacks by reason, the loop's lag
    quantiles (bucket upper bounds) and GC pauses by generation, over the window only."""
    from ctr.bench.steady import window_stats

    lag = "ctr_event_loop_lag_seconds_bucket"
    before = {(lag, 'le="0.001"'): 10.0, (lag, 'le="0.01"'): 10.0, (lag, 'le="+Inf"'): 10.0,
              ("ctr_fallbacks_total", 'reason="model:timeout"'): 3.0,
              ("ctr_gc_pause_seconds_count", 'generation="0"'): 5.0,
              ("ctr_gc_pause_seconds_sum", 'generation="0"'): 0.5}  # fmt: skip
    after = {(lag, 'le="0.001"'): 108.0, (lag, 'le="0.01"'): 110.0, (lag, 'le="+Inf"'): 110.0,
             ("ctr_fallbacks_total", 'reason="model:timeout"'): 3.0,
             ("ctr_fallbacks_total", 'reason="overload:shed"'): 2.0,
             ("ctr_gc_pause_seconds_count", 'generation="0"'): 7.0,
             ("ctr_gc_pause_seconds_sum", 'generation="0"'): 0.53}  # fmt: skip
    req, wait = "ctr_request_latency_seconds_bucket", "ctr_event_loop_cpu_wait_seconds_bucket"
    # summed over outcomes: 1,000 requests, the 5 fallbacks over 25 ms; "ok" alone would say 25 ms
    for outcome, under, n in (("ok", 995.0, 995.0), ("fallback", 0.0, 5.0)):
        after[(req, f'le="0.025",outcome="{outcome}"')] = under
        after[(req, f'le="0.05",outcome="{outcome}"')] = n
        after[(req, f'le="+Inf",outcome="{outcome}"')] = n
    after |= {(wait, 'le="0.001"'): 99.0, (wait, 'le="0.015"'): 100.0, (wait, 'le="+Inf"'): 100.0,
              ("ctr_event_loop_cpu_wait_seconds_sum", ""): 0.04,
              ("ctr_event_loop_cpu_wait_seconds_count", ""): 100.0}  # fmt: skip
    w = window_stats(before, after)
    assert w["gateway_p999_ms"] == 50.0
    assert (w["cpu_wait_ms"], w["cpu_wait_max_ms"]) == (40.0, 15.0)
    assert window_stats(before, before)["cpu_wait_ms"] is None  # no ticks: unknown, not 0
    assert w["fallbacks"] == {"overload:shed": 2}  # the timeouts were before the window
    assert (w["lag_p99_ms"], w["lag_max_ms"]) == (10.0, 10.0)  # 2 of 100 samples in (1, 10] ms
    gen0 = w["gc"]["0"]  # type: ignore[index]
    assert gen0[0] == 2 and abs(gen0[1] - 15.0) < 1e-6


def test_steal_and_busy_are_shares_of_the_window(tmp_path: Path) -> None:
    """Steal is the hypervisor's share; busy is what ran (neither idle, iowait nor stolen)."""
    from ctr.bench.steady import busy_share, cpu_times, steal_share

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 1 2 3\n")
    assert cpu_times(str(stat)) == (1000.0, 35.0, 810.0)
    assert steal_share((1000.0, 35.0, 810.0), (2000.0, 85.0, 1110.0)) == 0.05
    assert busy_share((1000.0, 35.0, 810.0), (2000.0, 85.0, 1110.0)) == 0.65
    assert steal_share((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)) is None
    assert busy_share((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)) is None
    assert cpu_times(str(tmp_path / "absent")) == (0.0, 0.0, 0.0)


def test_the_pool_table_reads_the_load_generators_result() -> None:
    """`ctr bench pool`'s table is built from loadgen's LevelResult (it read a `rps` field
    that result does not have, so the command failed after its whole run)."""
    from ctr.bench.loadgen import LevelResult
    from ctr.bench.pool import PolicyRow, format_rows

    res = LevelResult("closed", 4, 0.0, 100.0, 800, 792, 8, 0, 3, 0, 99.0, 1.0, 5.0, 20.0, 30.0, 41.0, {})
    text = format_rows([PolicyRow("peak_ewma", True, res, [0.45, 0.45, 0.10], [0.0, 0.0, 2.0])], 4, 8, 100, 10, "2,2,1")
    row = text.splitlines()[-1]
    assert row.startswith("| peak_ewma | on | 99 | 5.00 | 20.00 | 30.00 | 41.00 | 1.00% | 45.0% |"), row


def test_one_metrics_parser_serves_the_stage_columns_and_the_pool_table() -> None:
    """parse_metrics sums repeated samples; the pool table reads replicas of the model pool only."""
    from ctr.bench.loadgen import label, parse_metrics
    from ctr.bench.pool import _per_replica

    text = "\n".join([
        "# HELP ctr_replica_requests_total x",
        'ctr_replica_requests_total{pool="model",replica="0",outcome="ok"} 5.0',
        'ctr_replica_requests_total{pool="model",replica="0",outcome="error"} 1.0',
        'ctr_replica_requests_total{pool="model",replica="1",outcome="ok"} 7.0',
        'ctr_replica_requests_total{pool="canary",replica="0",outcome="ok"} 100.0',
        'ctr_stage_latency_seconds_sum{stage="features"} 0.5',
        "bentoml_other 3",
    ])  # fmt: skip
    samples = parse_metrics(text)
    assert label('stage="features"', "stage") == "features" and label('xstage="a"', "stage") is None
    assert _per_replica(samples, "ctr_replica_requests_total", 3) == [6.0, 7.0, 0.0]
    assert samples[("ctr_stage_latency_seconds_sum", 'stage="features"')] == 0.5
    assert not any(name.startswith("bentoml") for name, _ in samples)


def test_the_tally_reads_shed_and_past_deadline_answers() -> None:
    import orjson

    from ctr.bench.loadgen import _Tally

    t = _Tally()
    for degraded in (["overload:shed"], ["model:timeout"], ["model:deadline"], ["model:unavailable"], None):
        body = {"scores": [0.1], "fallback": degraded is not None, "degraded": degraded or []}
        t.add(0.001, 200, orjson.dumps(body))
    assert (t.model, t.fallback, t.shed, t.deadline) == (1, 4, 1, 2)


def _level(c: int, rps: float, p99: float, p50: float = 1.0, fallback: int = 0, **kw: float) -> Any:
    from ctr.bench.loadgen import LevelResult

    return LevelResult("closed", c, 0.0, rps, int(rps), int(rps), fallback, 0, 0, 0, rps, 0.0, p50, p99, p99 * 1.5,
                       p99 * 2, {}, **kw)  # fmt: skip


def test_the_yardsticks_compare_the_median_of_alternated_passes() -> None:
    """`ctr bench e2e`'s summary: each pass's best model-scored rps at p99 <= 50 ms and c=1
    p50, their median, and the service's ratio to each peer; the peers' process count is said."""
    from ctr.bench.e2e import SERVICE, _yardsticks, best_level

    service = [[_level(1, 500, 3.0, p50=2.0), _level(8, 1500, 20.0), _level(32, 2500, 80.0)],
               [_level(1, 480, 3.0, p50=2.2), _level(8, 1300, 30.0)]]  # fmt: skip
    peer = [[_level(1, 400, 3.0, p50=2.5), _level(8, 600, 20.0)], [_level(1, 400, 3.0, p50=2.5), _level(8, 700, 9.0)]]
    b = best_level(service[0])
    assert b is not None and b.model_rps == 1500  # c=32 missed the p99 target
    lines = _yardsticks({SERVICE: service, "Starlette": peer}, 2)
    assert "ctr-serve (2 gateway process(es))" in lines[0] and "Starlette (2 uvicorn worker(s))" in lines[0]
    best_row = next(line for line in lines if line.startswith("| best model-scored rps"))
    assert "1500 / 1300 (median 1400)" in best_row and "600 / 700 (median 650)" in best_row
    assert best_row.endswith(f"| {1400 / 650:.2f}x |")
    p50_row = next(line for line in lines if line.startswith("| c=1 p50 ms"))
    assert p50_row.endswith(f"| {2.1 / 2.5:.2f}x |")


def test_the_load_generator_reads_the_coalescers_batch_and_its_own_cpu() -> None:
    """A level's mean requests per model call comes from ctr_model_batch_requests, apart from
    the stage means; the generator's cores are its CPU seconds over the level's wall seconds."""
    from ctr.bench.loadgen import BATCH_REQUESTS, _stage_means, _Tally

    before = {"features": (1.0, 100.0), BATCH_REQUESTS: (100.0, 100.0)}
    after = {"features": (1.2, 200.0), BATCH_REQUESTS: (400.0, 200.0)}
    means = _stage_means(before, after)
    assert means == pytest.approx({"features": 2.0, BATCH_REQUESTS: 3.0})
    t = _Tally()
    t.add(0.001, 200, b'{"fallback":false}')
    r = t.result("closed", 8, 0.0, 10.0, means, client_cpu_s=4.0)
    assert r.batch_requests == 3.0 and r.client_cores == 0.4 and BATCH_REQUESTS not in r.stage_ms


def test_the_in_process_limit_adds_a_requests_own_stages() -> None:
    """The limit's cost of a request is parse + lookup + transform + the forward pass at the
    coalesced batch (per request) + response + the served record for /feedback; batch 100 alone
    when no batch was timed."""
    from ctr.bench.stages import limit_us

    rows = [(k, k, us, 0.0, 0.0, 0.0) for k, us in
            [("parse", 30.0), ("features", 60.0), ("transform", 20.0), ("gateway", 200.0), ("respond", 10.0),
             ("served", 5.0), ("forward_100", 240.0)]]  # fmt: skip
    assert limit_us(rows) == 365.0
    assert limit_us([*rows, ("forward", "f", 90.0, 0.0, 0.0, 0.0)]) == 215.0


def test_the_monolith_peer_reads_the_row_of_an_l2_entry() -> None:
    """The peer's MGET answers are L2 entries (value, version, seconds left): a miss and a cached
    absence are default features, a row is its values (the peer answered 500 to every request
    when decode's result changed shape)."""
    from ctr.bench.peer import _row
    from ctr.features.redis_tier import decode

    assert _row(None) is None and _row(((), 3, 10.0)) is None
    assert _row(decode(b"3:99999999999999:[1,2]", 0.0)) == (1, 2)


def test_the_http_floor_validates_and_answers_constant_scores() -> None:
    """`ctr bench e2e`'s HTTP floor parses and validates as /predict does (a bad body is a 4xx)
    and answers one constant score an ad: what HTTP alone costs, no features and no model."""
    import orjson
    from starlette.testclient import TestClient

    from ctr.bench.loadgen import Traffic
    from ctr.bench.peer import make_floor_app
    from ctr.settings import Settings

    body = orjson.loads(Traffic(Settings().data_dir, 2).bodies(1)[0])
    with TestClient(make_floor_app(Settings())) as client:
        ok = client.post("/predict", content=orjson.dumps(body))
        assert ok.status_code == 200 and ok.json()["scores"] == [0.5, 0.5] and ok.json()["model_version"] == "floor"
        assert client.post("/predict", content=b"{not json").status_code == 400
        assert client.post("/predict", content=orjson.dumps({**body, "ad_ids": []})).status_code == 422


def test_the_http_floor_bounds_the_share_of_the_in_process_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The floor's server spent 405 us a request (its own CPU, measured); less the parse (30) the
    limit already counts and its own JSON (10, as timed), HTTP adds 365 us to the limit's 365: at
    most half the limit behind it. No best level, or no CPU reading: no line."""
    from ctr.bench import e2e
    from ctr.bench.e2e import _floor

    assert 0 < e2e._floor_json_us(100, calls=50) < 1000
    monkeypatch.setattr(e2e, "_floor_json_us", lambda n_ads: 10.0)

    rows = [(k, k, us, 0.0, 0.0, 0.0) for k, us in
            [("parse", 30.0), ("features", 60.0), ("transform", 20.0), ("gateway", 200.0), ("respond", 10.0),
             ("served", 5.0), ("forward_100", 240.0)]]  # fmt: skip
    lines, out = _floor(rows, [[_level(32, 10_000, 20.0, server_cpu_s=4.05)]])
    assert out == pytest.approx({"floor_us": 405.0, "floor_http_us": 365.0, "ceiling_share": 0.5})
    assert "405 us a request" in lines[0] and "365 us of it HTTP" in lines[0] and "50% of the in-process" in lines[0]
    assert _floor(rows, [[_level(32, 10_000, 80.0, server_cpu_s=4.05)]]) == ([], {})  # p99 past 50 ms
    assert _floor(rows, [[_level(32, 10_000, 20.0)]]) == ([], {})  # the server's CPU was not read


def test_a_process_trees_cpu_is_read_and_a_gone_one_reads_zero() -> None:
    import os

    from ctr.bench.local_server import tree_cpu_s

    assert tree_cpu_s(os.getpid()) > 0 and tree_cpu_s(2**22 + 12345) == 0.0
