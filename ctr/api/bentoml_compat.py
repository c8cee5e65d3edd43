"""Every use of BentoML beyond its documented API, in one module.

ctr-serve relies on six things BentoML 1.4 does without promising them; each is here, and
tests/test_bentoml_compat.py fails when the pinned BentoML stops doing it:

1. `add_default_header`: a dependency's client (`bentoml.depends` -> RemoteProxy) has no public
   way to send a header on every call; its async client's `default_headers` dict and its
   session manager's `_headers` (given to each new aiohttp session) take one.
2. `START_MODULE`: one service of the graph is served alone (a Kubernetes Deployment, `ctr
   serve --service`) by BentoML's internal `start-http-server` command, as the image's
   entrypoint does (`--service-name`, `--depends NAME=URL`).
3. `dependency_url`: a resolved `bentoml.depends` descriptor knows the URL it calls (`.url`),
   set only once the server runs.
4. `shared_token`: every process of `bentoml serve` is started with the environment of the
   process that imported service.py first (its circus watchers copy it); a secret drawn
   into the environment there reaches every service of the graph and nothing else.
5. A Starlette app mounted with `@bentoml.asgi_app(app, path="/")` is matched route by route
   (`_bentoml_impl.server.mount.PassiveMount`), its routes read on each request: BentoML's
   own routes stay reachable beside it, and routes given to it after the class is defined
   are served (ctr.api.edge.LateApp). Any other kind of app at "/" would shadow them all.
6. `FastPath` (POST /predict past BentoML's per-request middlewares, CTR_PREDICT_FAST_PATH):
   BentoML builds a service's HTTP app as a Starlette app (`ServiceAppFactory.__call__`),
   with a service's own ASGI middlewares inside its traffic-metrics, OpenTelemetry and
   timeout middlewares, and passes the ASGI lifespan down through all of them; Starlette
   puts the application in `scope["app"]` and calls its `middleware_stack` attribute for
   every request. So a service middleware can, at lifespan start, put `Dispatch` in front of
   that stack: POST to a fast path goes straight to the mounted app, every other request
   (/readyz, /livez, /metrics, BentoML's API routes, the gateway's other routes) takes
   BentoML's stack. Measured in process (`ctr bench http`): BentoML's stack cost about
   150-300 us a request around a handler of about 25 us. /predict needs none of it: the
   gateway counts and times its own requests (ctr_requests_total,
   ctr_request_latency_seconds), keeps its own 50 ms deadline (far inside BentoML's 30 s
   timeout) and reads no BentoML context; BentoML's bentoml_service_request_* metrics no
   longer count /predict.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PINNED = "1.4.40"  # pyproject.toml; the test below checks the two agree
START_MODULE = "bentoml_cli._internal.start"
START_COMMAND = "start-http-server"


def add_default_header(proxy: Any, name: str, value: str) -> Any:
    """Make a dependency's client (a RemoteProxy) send `name: value` on every call, on sessions
    made before and after; idempotent. A dependency built in-process (no server) has no such
    client and is returned as is."""
    client = getattr(proxy, "to_async", None)
    default = getattr(client, "default_headers", None)
    if not isinstance(default, dict) or default.get(name) == value:
        return proxy
    default[name] = value
    manager = getattr(client, "_session_manager", None)
    if manager is not None:
        manager._headers[name] = value
        if manager._session is not None:
            manager._session.headers[name] = value
    return proxy


def dependency_url(service_class: type, attribute: str) -> str | None:
    """The URL a `bentoml.depends` attribute of `service_class` calls (None before it resolves,
    or when the dependency runs in this process)."""
    return getattr(getattr(service_class, attribute, None), "url", None)


def start_command(python: str, target: str) -> list[str]:
    """The head of the command that serves one service of `target` ("service:CTRGateway") alone."""
    return [python, "-m", START_MODULE, START_COMMAND, target]


def shared_token(name: str, environ: MutableMapping[str, str] | None = None) -> str:
    """The secret in environment variable `name`, or a random one drawn into the environment
    (`environ`, default os.environ) for the processes BentoML starts from this one."""
    env = os.environ if environ is None else environ
    token = env.get(name, "")
    if not token:
        token = secrets.token_urlsafe(32)
        env[name] = token
        log.info("%s unset: drew a random one for this process tree", name)
    return token


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
