"""The internal contract between ctr-serve's own services: a shared token on every call.

CTRModel, FeatureService and FallbackService are not entry services: BentoML accepts
pickled bodies on them, and CTRModel's `/infer` takes raw matrices. Started as their own
deployments (one per Kubernetes Deployment) their ports are reachable by anything the
network lets through, so a NetworkPolicy (deploy/k8s/networkpolicy.yaml) is not enough on
a cluster whose network plugin ignores it. Every internal service therefore refuses a
request that does not carry the shared token in `X-CTR-Internal-Token`, except the probes
and the metrics scrape, which carry no body. The gateway sends the token on every call
it makes (the raw `/infer` hop and BentoML's dependency clients).

The token comes from `CTR_INTERNAL_TOKEN` (the Kubernetes Secret). When it is unset,
`ensure_token` draws a random one into the environment before the services start: under
`bentoml serve` every process of the graph inherits it from the parent (BentoML's circus
watchers copy the environment), so the default single-machine set-up works and nothing
outside it knows the token; a service started on its own with no token set refuses every
internal call (nobody else holds its random token) instead of serving strangers.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from ctr.api import bentoml_compat

HEADER = "x-ctr-internal-token"
ENV = "CTR_INTERNAL_TOKEN"
# What probes and Prometheus call: no body, nothing to exploit, and they carry no token.
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def ensure_token(environ: MutableMapping[str, str] | None = None) -> str:
    """The shared token: CTR_INTERNAL_TOKEN, or a random one drawn for this process tree (see
    ctr.api.bentoml_compat.shared_token)."""
    return bentoml_compat.shared_token(ENV, environ)


def headers(token: str) -> dict[str, str]:
    """The header a caller adds to each internal call."""
    return {HEADER: token}


class InternalAuth:
    """ASGI middleware: 401 unless the request carries the shared token (probes excepted)."""

    def __init__(self, app: ASGIApp, token: str, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        if not token:
            raise ValueError("InternalAuth needs a non-empty token (see ensure_token)")
        self.app = app
        self._token = token.encode()
        self._open = open_paths

    def allowed(self, scope: Scope) -> bool:
        if scope.get("path", "") in self._open:
            return True
        got = next((v for k, v in scope.get("headers", ()) if k == HEADER.encode()), b"")
        return hmac.compare_digest(got, self._token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.allowed(scope):
            await self.app(scope, receive, send)
            return
        body = orjson.dumps({"error": f"internal service: missing or wrong {HEADER} header"})
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 401, "headers": head})
        await send({"type": "http.response.body", "body": body})


def authorize_proxy(proxy: Any, token: str) -> Any:
    """Make BentoML's client of a dependency (a RemoteProxy) send the token; idempotent
    (ctr.api.bentoml_compat.add_default_header)."""
    return bentoml_compat.add_default_header(proxy, HEADER, token)
