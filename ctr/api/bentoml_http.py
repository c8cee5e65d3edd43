"""POST /predict past BentoML's per-request HTTP middlewares (issue 25, part 2).

BentoML wraps every request to a service's HTTP app, mounts included, in its own ASGI
middlewares: Prometheus traffic metrics (a histogram, a counter, an in-progress gauge and
a timestamp gauge per request, each a write to a multiprocess file), OpenTelemetry (a
span, or with every URL excluded a URL rebuilt and matched), a 30 s timeout (a task and a
timer per request) and the service context (a Request object per request), then routes
through its own router to the mounted app. Measured in process (`ctr bench http`) that is
about 150-170 us a request around a handler of about 25 us. /predict needs none of it: the
gateway counts and times its own requests (`ctr_requests_total`,
`ctr_request_latency_seconds`), keeps its own deadline (50 ms, far inside BentoML's
30 s timeout) and reads no BentoML context. So `FastPath`, installed as the gateway
service's own ASGI middleware (BentoML's public `add_asgi_middleware`), puts `Dispatch` in
front of BentoML's whole stack when the server starts: POST to a fast path goes straight
to the mounted app; every other request (BentoML's /readyz, /livez, /metrics, its API
routes, the gateway's other routes) takes BentoML's stack as before.

What this relies on, beyond BentoML's public API (fold into ctr/api/bentoml_compat.py;
tests/test_bentoml_http.py and tests/test_e2e.py fail when a pinned version changes it):
- BentoML builds a service's HTTP app as a `starlette.applications.Starlette`
  (`_bentoml_impl.server.app.ServiceAppFactory.__call__`), with a service's own ASGI
  middlewares inside its metrics, tracing and timeout middlewares, and passes the ASGI
  lifespan scope down through all of them;
- Starlette puts the application in `scope["app"]` and calls its `middleware_stack`
  attribute (built once, on the first call: the lifespan's) for every request, so
  replacing that attribute puts a dispatcher in front of every middleware of the app.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Dispatch:
    """POST to one of `routes` (exact path) goes to its app; everything else to `rest`."""

    __slots__ = ("rest", "routes")

    def __init__(self, rest: ASGIApp, routes: Mapping[str, ASGIApp]) -> None:
        self.rest, self.routes = rest, dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            app = self.routes.get(scope["path"])
            if app is not None:
                await app(scope, receive, send)
                return
        await self.rest(scope, receive, send)


def install(server_app: Any, routes: Mapping[str, ASGIApp]) -> bool:
    """Put `Dispatch(routes)` in front of a built Starlette app's middleware stack; False when
    the app is not one (or has no stack yet), or when it is installed already."""
    stack = getattr(server_app, "middleware_stack", None)
    if stack is None or isinstance(stack, Dispatch):
        return False
    server_app.middleware_stack = Dispatch(stack, routes)
    return True


def installed(server_app: Any) -> Mapping[str, ASGIApp]:
    """The fast paths installed in front of `server_app` (empty when none)."""
    stack = getattr(server_app, "middleware_stack", None)
    return stack.routes if isinstance(stack, Dispatch) else {}


class FastPath:
    """A service ASGI middleware that installs `Dispatch` in front of BentoML's server app
    when that app's lifespan starts (`Service.add_asgi_middleware(FastPath, routes=...)`).
    Requests that reach it here took BentoML's stack (every path but the fast ones)."""

    def __init__(self, app: ASGIApp, routes: Mapping[str, ASGIApp]) -> None:
        self.app, self.routes = app, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            server_app = scope.get("app")
            if not install(server_app, self.routes) and not installed(server_app):
                log.warning("no fast path for %s: BentoML's server app is no built Starlette app (%s); they "
                            "take BentoML's whole stack", sorted(self.routes), type(server_app))  # fmt: skip
        await self.app(scope, receive, send)
