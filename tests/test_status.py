"""The status document and page: panels from providers (a panel appears when its part
exists), the pool and canary hooks, write-behind lag from a real Redis, and a page whose
every figure can be read back and matches the document."""

from __future__ import annotations

import asyncio
import re
from html.parser import HTMLParser
from typing import Any

import orjson
import pytest
from helpers import FakeClock

from ctr.api.status import fmt, render
from ctr.observe.sli import SliRecorder
from ctr.resilience.breaker import Breakers, CircuitBreaker
from ctr.serving.status import Sources, StatusBoard


def recorder() -> SliRecorder:
    clock = FakeClock(5000.0)
    rec = SliRecorder(clock=clock)
    for i in range(300):
        rec.record("stable", "fallback" if i % 20 == 0 else "model", 0.003, "model:timeout" if i % 20 == 0 else None)
        rec.stage("features", 0.0006)
        rec.stage("inference", 0.001)
        rec.stage("request", 0.003)
        clock.t += 0.2
    return rec


def doc(sources: Sources, board: StatusBoard | None = None) -> dict[str, Any]:
    return asyncio.run((board or StatusBoard(sources)).document())


def panel(d: dict[str, Any], pid: str) -> dict[str, Any] | None:
    return next((p["data"] for p in d["panels"] if p["id"] == pid), None)


def test_the_document_has_the_panels_of_the_parts_present() -> None:
    """Without a feature store, pool or canary, their panels are left out; the rest are there."""
    d = doc(Sources(recorder()))
    ids = [p["id"] for p in d["panels"]]
    assert ids == ["traffic", "slo", "stages", "breakers", "fallbacks"]
    t = panel(d, "traffic")
    assert t is not None and t["requests"] == 300 and t["model_scored"] == pytest.approx(0.95)
    assert "this gateway process" in d["scope"]["text"] and d["scope"]["kind"] == "process"


def test_stages_against_the_reference_budget() -> None:
    """Each reference stage with its budget; response is the rest of the request's time."""
    st = panel(doc(Sources(recorder())), "stages")
    assert st is not None
    rows = {r["stage"]: r for r in st["rows"]}
    assert [r["budget_ms"] for r in st["rows"]] == [0.3, 2.0, 1.0, 3.0, 0.5] and st["budget_ms"] == 7.0
    assert rows["features"]["mean_ms"] == pytest.approx(0.6)
    assert rows["response"]["mean_ms"] == pytest.approx(3.0 - 0.6 - 1.0)
    assert rows["balancer"]["mean_ms"] is None


class Part:
    def __init__(self, status: dict[str, Any], is_async: bool = False) -> None:
        self._status, self._async = status, is_async

    def status(self) -> Any:
        if self._async:

            async def later() -> dict[str, Any]:
                return self._status

            return later()
        return self._status

    public_status = status


class FakeGateway:
    model_version = "ctr_model:test"


def test_pool_and_canary_panels_appear_when_their_parts_exist() -> None:
    """The hooks: a gateway with a `pool` / `canary` having status() gets their panels, sync or async."""
    gw = FakeGateway()
    d = doc(Sources(recorder(), gw))
    assert panel(d, "pool") is None and panel(d, "canary") is None
    gw.pool = Part({"replicas": [{"name": "r0", "healthy": True, "ejected": False, "ejections": 0}]})  # type: ignore[attr-defined]
    gw.canary = Part({"phase": "5%", "share": 0.05, "gates": [{"name": "auc", "estimate": 0.7}]}, is_async=True)  # type: ignore[attr-defined]
    d = doc(Sources(recorder(), gw))
    assert panel(d, "pool") == {"replicas": [{"name": "r0", "healthy": True, "ejected": False, "ejections": 0}]}
    assert panel(d, "canary")["phase"] == "5%"  # type: ignore[index]
    html = render(d)
    assert 'data-field="pool.replicas.0.healthy"' in html and 'data-field="canary.gates.0.estimate"' in html


def test_a_slow_provider_does_not_hold_the_page() -> None:
    """A provider past its wait is shown as unknown; another panel is added with add()."""

    async def slow(src: Sources) -> dict[str, Any]:
        await asyncio.Event().wait()  # never answers
        return {}

    async def extra(src: Sources) -> dict[str, Any]:
        return {"answer": 42}

    board = StatusBoard(Sources(recorder()), panels=[("slow", "Slow", slow)])
    board.add("extra", "Extra", extra)
    d = doc(board.sources, board)
    assert panel(d, "slow")["state"] == "unknown"  # type: ignore[index]
    assert panel(d, "extra") == {"answer": 42}


def test_breakers_panel_shows_live_breakers() -> None:
    """An open breaker shows as open, with its window's calls and failures."""
    breakers = Breakers()
    b = breakers.add(CircuitBreaker("status-test", min_calls=2, clock=FakeClock(5000.0)))
    b.record_failure()
    b.record_failure()
    rows = {r["name"]: r for r in panel(doc(Sources(recorder(), breakers=breakers)), "breakers")["rows"]}  # type: ignore[index]
    assert rows["status-test"]["state"] == "open" and rows["status-test"]["transitions"] == 1


def test_write_behind_lag_from_a_real_stream(redis_url: str) -> None:
    """Queued entries and the age of the oldest, read from Redis (entries are deleted when committed)."""
    import redis.asyncio as aioredis

    from ctr.features.writes import STREAM

    async def go() -> dict[str, Any] | None:
        r = aioredis.Redis.from_url(redis_url)
        try:
            await r.delete(STREAM)
            secs, _ = await r.time()
            await r.xadd(STREAM, {"group": "ad_stats", "rows": "[]"}, id=f"{(int(secs) - 3) * 1000}-0")
            await r.xadd(STREAM, {"group": "ad_stats", "rows": "[]"})
            d = await StatusBoard(Sources(recorder(), stream=r)).document()
            await r.delete(STREAM)
            return panel(d, "write_behind")
        finally:
            await r.aclose()

    wb = asyncio.run(go())
    assert wb is not None and wb["queued"] == 2 and 2.5 < wb["lag_s"] < 10


class Figures(HTMLParser):
    """Every `data-field` element: its text and data-value."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, tuple[str, str]] = {}
        self._open: list[tuple[str, str]] = []
        self._text: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if "data-field" in a:
            self._open.append((a["data-field"] or "", a.get("data-value") or ""))
            self._text = []

    def handle_data(self, data: str) -> None:
        self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "span" and self._open:
            path, value = self._open.pop()
            self.fields[path] = ("".join(self._text).strip(), value)


def lookup(d: dict[str, Any], path: str) -> Any:
    head, *rest = path.split(".")
    node: Any = next((p["data"] for p in d["panels"] if p["id"] == head), d.get(head))
    for part in rest:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def test_every_figure_on_the_page_matches_the_document() -> None:
    """Each data-field's value is the document's, and its text is that value formatted."""
    gw = FakeGateway()
    gw.pool = Part({"replicas": [{"name": "r0", "healthy": True}]})  # type: ignore[attr-defined]
    d = doc(Sources(recorder(), gw))
    page = Figures()
    page.feed(render(d))
    assert len(page.fields) > 60
    for path, (text, value) in page.fields.items():
        if path == "scope":
            continue
        want = lookup(d, path)
        assert text, path
        assert text == fmt(path.rsplit(".", 1)[-1], want), path
        if not isinstance(want, str):
            assert orjson.loads(value) == want if value else want is None, path


def test_the_page_needs_nothing_from_outside() -> None:
    """No external script, style, image or font; it refreshes itself; the document is embedded."""
    d = doc(Sources(recorder()))
    html = render(d)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert "<link" not in html and "@import" not in html and "url(" not in html
    assert re.search(r'<meta http-equiv="refresh" content="\d+">', html)
    embedded = re.search(r'<script type="application/json" id="status-data">(.*?)</script>', html, re.S)
    assert embedded is not None and orjson.loads(embedded.group(1).replace("<\\/", "</")) == d
    assert html.count("<svg") >= 4 and "<polyline" in html  # traffic charts, fallback chart, stage bars


def test_the_routes_and_a_request_that_raises() -> None:
    """/status and /status.json answer 503 without a board, else the page and the document;
    a /predict that raises is a 500 counted as an error against availability."""
    from starlette.testclient import TestClient

    from ctr.api.edge import Edge
    from ctr.api.routes import make_app
    from ctr.model.segments import SegmentTable
    from ctr.serving.coalesce import Coalescer
    from ctr.serving.fallback import Fallback
    from ctr.serving.gateway import Gateway

    async def broken(user_id: str, ad_ids: list[str], context: dict, deadline: float) -> Any:
        raise RuntimeError("a bug in the feature path")

    async def model(x: Any) -> Any:
        raise AssertionError("not reached")

    table = SegmentTable({}, {}, 1.0, 10.0)
    gw = Gateway(broken, Coalescer(model), Fallback(table), "ctr_model:test", 1.0)
    gw.sli = SliRecorder(clock=FakeClock(5000.0))
    bare = TestClient(make_app(Edge(gw, max_ads=10)))
    assert bare.get("/status.json").status_code == 503 and bare.get("/status").status_code == 503
    app = make_app(Edge(gw, max_ads=10, status=StatusBoard(Sources(gw.sli, gw))))
    client = TestClient(app, raise_server_exceptions=False)
    body = {"user_id": "u1", "ad_ids": ["a1"], "context": {"hour": 1, "device_type": "mobile",
            "site_category": "news", "banner_pos": 0, "conn_type": "wifi"}}  # fmt: skip
    assert client.post("/predict", json=body).status_code == 500
    d = client.get("/status.json").json()
    traffic = panel(d, "traffic")
    assert traffic is not None and traffic["requests"] == 1 and traffic["availability"] == 0.0
    page = client.get("/status")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'data-field="traffic.availability" data-value="0.0"' in page.text


def test_the_document_merges_every_gateway_process(tmp_path: Any) -> None:
    """Two processes' snapshots in the shared directory: the document's totals, windows and
    quantiles are both processes' together, and the breakdown has one row per process."""
    from ctr.observe.sli import quantile
    from ctr.serving import fleet

    a, b = recorder(), SliRecorder(clock=FakeClock(5000.0))
    for _ in range(100):
        b.record("stable", "model", 0.040)  # the other process is slower
        b.stage("request", 0.040)
    other = fleet.snapshot(b, None, [{"name": "model:0", "state": "open"}])
    other["pid"] = 1  # init: alive in any container
    fleet.publish(tmp_path, other)
    board = StatusBoard(Sources(a, fleet_dir=tmp_path))
    d = doc(board.sources, board)
    assert d["scope"]["kind"] == "service" and "all 2 gateway processes" in d["scope"]["text"]
    t = panel(d, "traffic")
    assert t is not None and t["requests"] == 400 and t["requests_5m"] == 400
    assert t["model_scored"] == pytest.approx(385 / 400)
    both = [x + y for x, y in zip(a.window(60).hist, b.window(60).hist, strict=True)]  # type: ignore[arg-type]
    assert t["p99_ms"] == pytest.approx(quantile(both, 0.99), abs=1e-3) and t["p99_ms"] > a.window(60).p99_ms
    st = {r["stage"]: r for r in panel(d, "stages")["rows"]}  # type: ignore[index]
    assert st["response"]["calls"] == 0 and panel(d, "stages")["total_mean_ms"] == pytest.approx(  # type: ignore[index]
        (300 * 3.0 + 100 * 40.0) / 400
    )
    procs = panel(d, "processes")
    assert procs is not None and procs["processes"] == 2 and procs["requests"] == 400
    rows = {r["pid"]: r for r in procs["rows"]}
    assert rows[1]["requests"] == 100 and rows[1]["open_breakers"] == 1 and not rows[1]["answering"]
    assert sum(r["answering"] for r in procs["rows"]) == 1
    assert {r.get("pid") for r in panel(d, "breakers")["rows"]} >= {1}  # type: ignore[index]
    assert panel(d, "breakers")["open"] >= 1  # type: ignore[index]
    page = Figures()
    page.feed(render(d))
    assert page.fields["processes.requests"][1] == "400" and "processes.rows.1.pid" in page.fields


def test_a_process_that_is_gone_counts_in_the_totals_only(tmp_path: Any) -> None:
    """A snapshot whose process no longer runs: its requests stay in the totals since start,
    not in the windows, and its row says it is not alive."""
    from ctr.serving import fleet

    gone = fleet.snapshot(recorder(), None, [])
    gone["pid"] = 2**22 + 12345  # above the default pid_max: no such process
    fleet.publish(tmp_path, gone)
    board = StatusBoard(Sources(recorder(), fleet_dir=tmp_path))
    d = doc(board.sources, board)
    t = panel(d, "traffic")
    assert t is not None and t["requests"] == 600 and t["requests_5m"] == 300
    rows = panel(d, "processes")["rows"]  # type: ignore[index]
    assert [r["alive"] for r in rows] == [True, False]


def test_the_ticker_publishes_this_process(tmp_path: Any) -> None:
    """Each tick writes this process's snapshot where the others read it."""
    import json
    import os

    board = StatusBoard(Sources(recorder(), fleet_dir=tmp_path / "ctr-status"))
    board.tick(1.0)
    snap = json.loads((tmp_path / "ctr-status" / f"{os.getpid()}.json").read_text())
    assert snap["totals"]["stable"]["model"] == 285 and snap["windows"]["all"]["60"]["hist"]


def test_a_fallback_reason_from_the_enum_keeps_the_document_and_the_fleet_snapshot_json() -> None:
    """Reasons are `ctr.degraded.Reason` (a StrEnum): counted under a plain str key, the status
    document and the snapshot other processes read serialize (orjson refuses a str subclass as
    a key: every ticker round failed and the page showed one process of two)."""
    from ctr.degraded import Reason
    from ctr.serving import fleet

    rec = recorder()
    rec.record("stable", "fallback", 0.01, Reason.MODEL_TIMEOUT)
    d = doc(Sources(rec))
    orjson.dumps(d)
    orjson.dumps(fleet.snapshot(rec, None, []))
