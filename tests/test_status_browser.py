"""The status page in a real browser: the real service (`bentoml serve`, all four services,
two gateway processes) under traffic from many connections, /status opened in headless
Chromium, every figure read back from the rendered DOM and compared with /status.json and
with what the load generator sent; a screenshot is kept in reports/status.png.
`ctr status` prints the same document as tables.

Chromium is Debian's `chromium` (`make test` installs it; this installs it with apt-get when
missing and it may). CTR_SKIP_BROWSER=1 skips the browser test where neither is possible.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import ROOT, Server
from test_status import Figures, lookup

from ctr.cli import main

CTX = {"hour": 14, "device_type": "mobile", "site_category": "news", "banner_pos": 1, "conn_type": "wifi"}
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic", "--window-size=1280,1400"]  # fmt: skip
SCREENSHOT = ROOT / "reports" / "status.png"
PANELS = {"traffic", "processes", "slo", "stages", "cache", "breakers", "fallbacks", "write_behind"}
WORKERS = 2
SENT = 240  # requests the load generator sends, each on a connection of its own


def chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, check=False, capture_output=True)
        exe = shutil.which("chromium")
    if exe is None:
        if os.environ.get("CTR_SKIP_BROWSER") == "1":
            pytest.skip("CTR_SKIP_BROWSER=1 and no chromium")
        pytest.fail("chromium is not installed (make test installs it: apt-get install chromium)")
    return exe


def browse(url: str, *mode: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium(), *FLAGS, f"--user-data-dir={profile}", *mode, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url + "/predict", json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/status.json", timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def two_processes(small_setup: dict[str, str]) -> Iterator[Server]:
    """A gateway of two worker processes: the page speaks for both, whichever answers it. Ready
    once both publish (the server answers as soon as one is up: on a loaded machine the second
    was still starting while every request went to the first, and the page showed one)."""
    server = Server("service:CTRGateway", {**small_setup, "CTR_GATEWAY_WORKERS": str(WORKERS)})
    try:
        end = time.monotonic() + 120
        while _alive(server.url) < WORKERS and time.monotonic() < end:
            time.sleep(0.2)
        yield server
    finally:
        server.stop()


def _alive(url: str) -> int:
    """Gateway processes the page counts as alive (0 while it has no processes panel)."""
    try:
        return int(lookup(_get(url), "processes")["processes"])
    except (KeyError, TypeError, StopIteration):
        return 0


def _settled(url: str, want: int, timeout_s: float = 10.0) -> dict[str, Any]:
    """/status.json once its total is `want` (other processes publish once a second), else the last one."""
    end = time.monotonic() + timeout_s
    while True:
        doc = _get(url)
        if lookup(doc, "traffic.requests") == want or time.monotonic() > end:
            return doc
        time.sleep(0.2)


@pytest.fixture(scope="module")
def served(two_processes: Server) -> Server:
    """The gateway after SENT requests from 8 threads, each on a new connection, so the kernel
    hands them to both processes (a few with unknown users and ads)."""
    gateway = two_processes

    def one(i: int) -> None:
        ads = [f"a{(i * 7 + k) % 300}" for k in range(5)] + (["a999999"] if i % 10 == 0 else [])
        out = _post(gateway.url, {"user_id": f"u{i}" if i % 10 else f"nobody{i}", "ad_ids": ads, "context": CTX})
        assert len(out["scores"]) == len(ads)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(SENT)))
    _settled(gateway.url, SENT)
    return gateway


def test_the_totals_are_what_was_sent_across_both_processes(served: Server) -> None:
    """/status.json counts every request the load generator sent, whichever process served it,
    and its per-process breakdown adds up to the same total over both processes."""
    doc = _settled(served.url, SENT)
    assert doc["scope"]["kind"] == "service"
    assert lookup(doc, "traffic.requests") == SENT
    assert lookup(doc, "traffic.requests_5m") == SENT
    procs = lookup(doc, "processes")
    rows = procs["rows"]
    assert procs["processes"] == WORKERS and len(rows) == WORKERS, rows
    assert sum(r["requests"] for r in rows) == procs["requests"] == SENT
    assert all(r["alive"] for r in rows) and sum(r["answering"] for r in rows) == 1
    print("per process:", {r["pid"]: r["requests"] for r in rows})


def test_status_json_has_the_panels_and_counts_the_traffic(served: Server) -> None:
    """The machine twin: every panel of the parts present, the requests counted, who it speaks for."""
    doc = _get(served.url)
    ids = {p["id"] for p in doc["panels"]}
    assert ids >= PANELS
    traffic = lookup(doc, "traffic")
    assert traffic["requests"] >= 60 and traffic["availability"] == 1.0 and traffic["p99_ms"] > 0
    assert {r["name"] for r in lookup(doc, "breakers")["rows"]} >= {"model:0", "l2", "l3"}  # <pool>:<replica>
    assert lookup(doc, "write_behind")["state"] == "ok"
    assert doc["scope"]["kind"] == "service" and f"all {WORKERS} gateway processes" in doc["scope"]["text"]


def test_the_page_renders_in_chromium_with_the_documents_figures(served: Server) -> None:
    """The DOM Chromium rendered has every panel, every figure non-empty, and the same values
    as /status.json fetched right after (traffic is quiet, so the counts agree exactly)."""
    dom = browse(served.url + "/status", "--dump-dom").stdout
    doc = _get(served.url)
    page = Figures()
    page.feed(dom)
    panels = {a.get("data-panel") for t, a in page.tags if t == "section"}
    assert panels >= PANELS
    charts = [a.get("data-chart") for t, a in page.tags if t == "figure"]
    assert {"requests/s", "latency ms", "availability, model-scored", "fallback share", "stages"} <= set(charts)
    assert sum(t == "polyline" for t, _ in page.tags) >= 4
    assert len(page.fields) > 60
    assert all(text for text, _ in page.fields.values()), [p for p, (t, _) in page.fields.items() if not t]
    for path in ("traffic.requests", "traffic.requests_5m", "traffic.availability", "traffic.model_scored",
                 "cache.lookups", "fallbacks.fallbacks", "breakers.open", "write_behind.queued"):  # fmt: skip
        text, value = page.fields[path]
        assert json.loads(value) == lookup(doc, path), path
        assert text not in ("", "–"), path
    states = {lookup(doc, f"breakers.rows.{i}.name"): lookup(doc, f"breakers.rows.{i}.state")
              for i in range(len(lookup(doc, "breakers.rows")))}  # fmt: skip
    for path, (text, _) in page.fields.items():
        if path.startswith("breakers.rows.") and path.endswith(".state"):
            name = page.fields[path.replace(".state", ".name")][0]
            assert text == states[name]
    requests = page.fields["traffic.requests"][0].replace(",", "")
    assert int(requests) == lookup(doc, "traffic.requests") == SENT
    per_process = [int(text.replace(",", "")) for p, (text, _) in page.fields.items()
                   if p.startswith("processes.rows.") and p.endswith(".requests")]  # fmt: skip
    assert len(per_process) == WORKERS and sum(per_process) == SENT


def test_a_screenshot_is_kept(served: Server) -> None:
    """reports/status.png: what a person sees (kept as a test artifact)."""
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    browse(served.url + "/status", f"--screenshot={SCREENSHOT}")
    data = SCREENSHOT.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_ctr_status_prints_tables(served: Server) -> None:
    """`ctr status --url` prints the document of the running service as tables."""
    out = CliRunner().invoke(main, ["status", "--url", served.url, "--width", "160"])
    assert out.exit_code == 0, out.output
    for title in ("Traffic", "Gateway processes", "SLOs and error-budget burn", "Circuit breakers",
                  "Feature cache hit rates"):  # fmt: skip
        assert title in out.output
    assert "availability" in out.output and "model" in out.output
    raw = CliRunner().invoke(main, ["status", "--url", served.url, "--json"])
    assert json.loads(raw.output)["service"] == "ctr-serve"


def test_first_answers_carry_no_degradation(served: Server) -> None:
    """With L2 present (as make serve now ensures) a known user and known ads get no substitution."""
    out = _post(served.url, {"user_id": "u3", "ad_ids": ["a1", "a2", "a3"], "context": CTX})
    assert out["degraded"] == [] and out["fallback"] is False
