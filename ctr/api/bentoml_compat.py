"""Every use of BentoML beyond its documented API, in one module.

ctr-serve relies on five things BentoML 1.4 does without promising them; each is here, and
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
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import MutableMapping
from typing import Any

log = logging.getLogger(__name__)

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
