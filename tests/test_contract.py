"""The served OpenAPI document and the server agree: what the document allows is accepted,
what the server refuses is declared (issue 24, item 3)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import CTX, routes_app, serve_in_thread
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

BIN = Path(sys.executable).parent


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    return TestClient(routes_app(tmp_path, max_ads=50))


@pytest.mark.parametrize(("field", "value", "status"), [
    ("hour", 13.0, 200), ("banner_pos", 1.0, 200), ("hour", 13.5, 422), ("hour", "13", 422), ("hour", True, 422),
    ("hour", 24.0, 422),
])  # fmt: skip
def test_an_integer_is_what_json_schema_calls_one(client: TestClient, field: str, value: Any, status: int) -> None:
    """13.0 is an integer by JSON Schema and is accepted (it was a 422); 13.5, "13", true are not."""
    r = client.post("/predict", json={"user_id": "u1", "ad_ids": ["a1"], "context": {**CTX, field: value}})
    assert r.status_code == status, r.text


def _keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _keys(v)}
    return set()


def test_the_document_declares_what_the_server_refuses(client: TestClient) -> None:
    """Ids without control characters, request ids of the issued shape, at most CTR_MAX_ADS ads,
    no unknown context keys, bounds as JSON Schema keywords (not pydantic's "ge")."""
    doc = client.get("/openapi.json").json()
    s = doc["components"]["schemas"]
    pattern = s["PredictRequest"]["properties"]["user_id"]["pattern"]
    assert re.match(pattern, "u1") and not re.match(pattern, "u\x85") and not re.match(pattern, "u\x00")
    assert s["PredictRequest"]["properties"]["ad_ids"]["maxItems"] == 50
    assert s["Context"]["additionalProperties"] is False
    assert s["Context"]["properties"]["hour"] == {"minimum": 0, "exclusiveMaximum": 24, "title": "Hour",
                                                  "type": "integer"}  # fmt: skip
    assert re.match(s["Feedback"]["properties"]["request_id"]["pattern"], "abc.def")
    assert not {"ge", "gt", "le", "lt"} & _keys(doc)
    assert set(doc["paths"]["/model_info"]) == {"get", "post"}


def test_a_405_names_the_allowed_methods(client: TestClient) -> None:
    """OPTIONS /model_info: 405 with an Allow header listing what the document lists."""
    r = client.options("/model_info")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) >= {"GET", "POST"}


@pytest.mark.integration  # ~20 s of schemathesis
def test_schemathesis_with_every_check_finds_nothing_in_process(tmp_path: Path) -> None:
    """The routes over a constant model, served by uvicorn in a thread: schemathesis with
    `--checks all` (positive and negative data, Allow on 405, conformance) finds no failure.
    The real `bentoml serve` gets the same in tests/test_fuzz.py."""
    app = routes_app(tmp_path, max_ads=50)
    ok = Route("/livez", lambda r: Response(b"")), Route("/readyz", lambda r: Response(b""))
    app.router.routes.extend(ok)
    with serve_in_thread(app) as url:
        cmd = [str(BIN / "schemathesis"), "run", f"{url}/openapi.json", "--url", url, "-H", "Authorization: Bearer tok",
               "-n", "20", "--seed", "20261201", "--checks", "all", "--no-color", "--report", "json",
               "--report-json-path", str(tmp_path / "report.json")]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert run.returncode == 0 and report["failures"] == [] and report["errors"] == [], run.stdout[-6000:]
    assert report["operations"]["tested"] == 8
