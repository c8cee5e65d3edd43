"""What the gateway's HTTP routes read, in one typed object, and the mount that serves them.

`Edge` is built once by the composition root (ctr.serving.root.build) and handed to
`ctr.api.routes.make_app`, whose handlers get it by closure: no `app.state`, no lookups by
name that a typo turns into a default. `LateApp` is the app BentoML mounts when the service
class is defined, before the composition root has run in the process that serves it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette

from ctr.api.body import DEFAULT_MAX_BODY_BYTES

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from ctr.features.writes import FeatureWriter
    from ctr.serving.canary.feedback import FeedbackDesk
    from ctr.serving.canary.runtime import CanaryRuntime
    from ctr.serving.canary.shadow import Shadow
    from ctr.serving.canary.state import Arm
    from ctr.serving.gateway import Gateway
    from ctr.serving.status import StatusBoard


@dataclass(frozen=True, slots=True)
class Edge:
    """The gateway (admission included), the limits of a request, the secrets that check a
    caller, and what the admin and status routes read; None where this gateway has none."""

    gateway: Gateway | None = None
    max_ads: int = 1000
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_id_key: bytes = b""
    admin_token: str = ""
    writer: FeatureWriter | None = None
    canary: CanaryRuntime | None = None
    stable_arm: Arm | None = None
    model_info: dict[str, Any] | None = None
    status: StatusBoard | None = None
    shadow: Shadow | None = None  # the canary's shadow phase (its feedback join)
    feedback: FeedbackDesk | None = None  # /feedback's checks against what each answer served


Handler = Callable[[Edge, "Request"], Awaitable["Response"]]


def bind(edge: Edge, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """`handler` as a Starlette endpoint over `edge`."""

    async def endpoint(request: Request) -> Response:
        return await handler(edge, request)

    endpoint.__name__ = endpoint.__qualname__ = handler.__name__
    return endpoint


class LateApp(Starlette):
    """A Starlette app with no routes until `serve(app)` gives it `app`'s routes.

    BentoML takes a mounted app when the service class is defined and matches a Starlette
    app at "/" route by route (ctr.api.bentoml_compat, item 5), reading its routes on each
    request: so BentoML's own routes (/readyz, /metrics, /schema.json) stay reachable and the
    routes served are those `serve` gave it, once the composition root built them."""

    def serve(self, app: Starlette) -> None:
        self.router.routes[:] = app.router.routes
