"""The /predict fast path past BentoML's per-request middlewares (ctr/api/bentoml_compat.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from ctr.api.bentoml_compat import Dispatch, FastPath, install, installed

ROOT = Path(__file__).resolve().parent.parent


class Counting:
    """Stands in for BentoML's middlewares: counts the HTTP requests that pass through it."""

    seen: list[str]

    def __init__(self, app: Any) -> None:
        self.app, self.seen = app, []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            Counting.seen.append(f"{scope['method']} {scope['path']}")
        await self.app(scope, receive, send)


def _server(inner: Starlette, started: list[str]) -> Starlette:
    """A server app shaped like BentoML's: counting middleware outside the service's own
    FastPath middleware, the inner app mounted at /, a lifespan."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        started.append("up")
        yield

    async def livez(request: Request) -> PlainTextResponse:
        return PlainTextResponse("\n")

    return Starlette(
        routes=[Route("/livez", livez), Mount("/", inner)],
        middleware=[Middleware(Counting), Middleware(FastPath, routes={"/predict": inner})],
        lifespan=lifespan,
    )


def _inner() -> Starlette:
    async def predict(request: Request) -> PlainTextResponse:
        return PlainTextResponse("scored " + (await request.body()).decode())

    async def other(request: Request) -> PlainTextResponse:
        return PlainTextResponse("other")

    return Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/other", other, methods=["POST"])])


def test_post_predict_skips_the_server_middlewares_once_the_server_started() -> None:
    """After the lifespan starts, POST /predict reaches the mounted app past every outer middleware;
    every other request (and /predict before the start) still takes them."""
    Counting.seen = []
    started: list[str] = []
    server = _server(_inner(), started)
    with TestClient(server) as client:
        assert started == ["up"] and set(installed(server)) == {"/predict"}
        r = client.post("/predict", content=b"x")
        assert (r.status_code, r.text) == (200, "scored x")
        assert client.post("/other").text == "other"
        assert client.get("/predict").status_code == 405  # not the fast path's method: BentoML's stack answers
        assert client.get("/livez").status_code == 200
    assert Counting.seen == ["POST /other", "GET /predict", "GET /livez"]


def test_install_is_idempotent_and_refuses_what_is_no_built_starlette_app() -> None:
    """A second install keeps the first dispatcher; an app without a middleware stack is refused."""
    server = _server(_inner(), [])
    assert not install(server, {})  # not built yet: no stack
    with TestClient(server):
        stack = server.middleware_stack
        assert isinstance(stack, Dispatch) and not install(server, {"/x": _inner()})
        assert server.middleware_stack is stack
    assert not install(object(), {}) and installed(object()) == {}


SHAPE = """
import json, service
from starlette.testclient import TestClient
app = service.CTRGateway.to_asgi(is_main=True)
try:
    TestClient(app).get("/nope")  # builds the middleware stack without the service's lifespan
except Exception:
    pass
names, a = [], app.middleware_stack
while a is not None and a is not app.router:
    names.append(type(a).__name__)
    a = getattr(a, "app", None)
print(json.dumps(names))
"""


def test_bentoml_puts_the_fast_path_inside_its_per_request_middlewares() -> None:
    """On the pinned BentoML the gateway's server app is a built Starlette app whose traffic
    metrics, tracing and timeout middlewares sit outside FastPath: the ones the fast path skips.
    Fails when a BentoML upgrade changes that shape (then see ctr/api/bentoml_compat.py)."""
    import json

    out = subprocess.run([sys.executable, "-c", SHAPE], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    names = json.loads(out.stdout.strip().splitlines()[-1])
    fast = names.index("FastPath")
    assert {"RunnerTrafficMetricsMiddleware", "OpenTelemetryMiddleware", "TimeoutMiddleware"} <= set(names[:fast])
    assert names[0] == "ServerErrorMiddleware" and "ContextMiddleware" in names[fast:]
