"""The gateway's own routes: a lean Starlette app mounted into the BentoML service.

/predict: parsing and validation are ours (orjson + pydantic), so every bad input gets a
4xx with a message a person can act on, and the hot path skips BentoML's per-call
IO-descriptor machinery (notes/bentoml.md: about 1.5-1.8 ms of CPU per request).
/admin/features: authenticated feature writes (write-through or write-behind per group).
"""

from __future__ import annotations

import hmac

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ctr import metrics
from ctr.api import canary
from ctr.api.contract import BadRequest, parse_feedback, parse_predict
from ctr.features.store import L2_ERRORS, L3_ERRORS
from ctr.features.writes import FeatureWriter, validate_rows
from ctr.serving.gateway import Gateway

JSON = "application/json"


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type=JSON)


async def predict(request: Request) -> Response:
    gateway: Gateway | None = getattr(request.app.state, "gateway", None)
    if gateway is None:
        return _json({"error": "the gateway is starting; retry shortly"}, 503)
    try:
        req = parse_predict(await request.body(), request.app.state.max_ads)
    except BadRequest as exc:
        metrics.REQUESTS.labels("bad_request").inc()
        return Response(exc.body(), exc.status, media_type=JSON)
    result = await gateway.predict(req, request.headers.get("x-request-id"))
    return _json(result)


async def feedback(request: Request) -> Response:
    """POST {"request_id", "ad_id", "clicked", "arm"?, "score"?}: counted for the online CTR and,
    during a rollout, in the arm's counters of the canary's gates."""
    try:
        fb = parse_feedback(await request.body())
    except BadRequest as exc:
        return Response(exc.body(), exc.status, media_type=JSON)
    metrics.FEEDBACK.labels(fb.arm, "impression").inc()
    if fb.clicked:
        metrics.FEEDBACK.labels(fb.arm, "click").inc()
    if (canary_runtime := getattr(request.app.state, "canary", None)) is not None:
        canary_runtime.record_feedback(fb.arm, fb.clicked, fb.score)  # the canary's CTR and calibration gates
    return _json({"accepted": True}, 202)


async def admin_features(request: Request) -> Response:
    """POST {"group": "...", "rows": [{"id": "...", "values": [...]}]} with a bearer token."""
    token: str = getattr(request.app.state, "admin_token", "")
    writer: FeatureWriter | None = getattr(request.app.state, "writer", None)
    if not token or writer is None:
        return _json({"error": "admin endpoints are disabled; set CTR_ADMIN_TOKEN to enable them"}, 403)
    if not hmac.compare_digest(request.headers.get("authorization", "").encode(), f"Bearer {token}".encode()):
        return _json({"error": "missing or wrong bearer token (Authorization: Bearer $CTR_ADMIN_TOKEN)"}, 401)
    try:
        body = orjson.loads(await request.body())
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object with group and rows")
        group, rows = validate_rows(body.get("group"), body.get("rows"), writer.schema)
    except (orjson.JSONDecodeError, ValueError) as exc:
        return _json({"error": str(exc)}, 422 if not isinstance(exc, orjson.JSONDecodeError) else 400)
    try:
        mode = await writer.put(group, rows)
    except (*L2_ERRORS, *L3_ERRORS) as exc:
        return _json({"error": f"write not done, a store is unavailable: {type(exc).__name__}: {exc}"}, 503)
    return _json({"group": group.name, "written": len(rows), "mode": mode})


def make_app() -> Starlette:
    """Set `app.state.gateway`, `.max_ads`, `.writer` and `.admin_token` before serving."""
    return Starlette(
        routes=[
            Route("/predict", predict, methods=["POST"]),
            Route("/feedback", feedback, methods=["POST"]),
            Route("/admin/features", admin_features, methods=["POST"]),
            *canary.routes(),
        ]
    )
