"""The gateway's /predict route: a lean Starlette app mounted into the BentoML service.

Parsing and validation are ours (orjson + pydantic), so every bad input gets a 4xx with
a message a person can act on, and the hot path skips BentoML's per-call IO-descriptor
machinery (notes/bentoml.md: about 1.5-1.8 ms of CPU per request).
"""

from __future__ import annotations

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ctr import metrics
from ctr.api import BadRequest, parse_predict
from ctr.gateway import Gateway

JSON = "application/json"


def make_app() -> Starlette:
    """A Starlette app serving POST /predict; set `app.state.gateway` and `app.state.max_ads`."""

    async def predict(request: Request) -> Response:
        gateway: Gateway | None = getattr(request.app.state, "gateway", None)
        if gateway is None:
            return Response(b'{"error": "the gateway is starting; retry shortly"}', 503, media_type=JSON)
        try:
            req = parse_predict(await request.body(), request.app.state.max_ads)
        except BadRequest as exc:
            metrics.REQUESTS.labels("bad_request").inc()
            return Response(exc.body(), exc.status, media_type=JSON)
        result = await gateway.predict(req, request.headers.get("x-request-id"))
        return Response(orjson.dumps(result.to_dict()), media_type=JSON)

    return Starlette(routes=[Route("/predict", predict, methods=["POST"])])
