"""The gateway's own routes: a lean Starlette app mounted into the BentoML service.

/predict: parsing and validation are ours (orjson + pydantic), so every bad input gets a
4xx with a message a person can act on, and the hot path skips BentoML's per-call
IO-descriptor machinery (notes/bentoml.md: about 1.5-1.8 ms of CPU per request). Every
answer carries a signed request id (ctr.api.request_id).
/feedback: counted under the arm its (signed) request id carries, once per (id, ad), for an
ad that answer served; ids this service did not issue are refused (ctr.serving.canary.feedback).
/admin/features: authenticated feature writes (write-through or write-behind per group).
/openapi.json: the OpenAPI document of these routes (ctr.api.openapi).
Every body is bounded (CTR_MAX_BODY_BYTES, ctr.api.body) before it is read into memory or parsed.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ctr import metrics
from ctr.api import canary, openapi, request_id, status
from ctr.api.body import BodyTooLarge, read_body
from ctr.api.contract import MAX_FEATURE_ROWS, MAX_READ_IDS, BadRequest, parse_feedback, parse_predict
from ctr.api.edge import Edge, bind
from ctr.degraded import Reason
from ctr.features.schema import valid_id
from ctr.features.store import L2_ERRORS, L3_ERRORS
from ctr.features.writes import validate_rows
from ctr.serving.canary.feedback import Refused
from ctr.serving.canary.served import STORE_ERRORS as SERVED_ERRORS
from ctr.serving.gateway import Overloaded

log = logging.getLogger(__name__)

JSON = "application/json"


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers=headers, media_type=JSON)


def _error(exc: BadRequest) -> Response:
    # A 413's body may not have been read to its end: the connection is not reused.
    headers = {"connection": "close"} if isinstance(exc, BodyTooLarge) else None
    return Response(exc.body(), exc.status, headers=headers, media_type=JSON)


async def read_json(request: Request, limit: int) -> Any:
    """The body (bounded, as `read_body`) parsed as JSON; BadRequest 400 if it is not JSON."""
    raw = await read_body(request, limit)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, f"request body is not valid JSON ({exc})") from None


async def predict(edge: Edge, request: Request) -> Response:
    gateway = edge.gateway
    if gateway is None:
        return _json({"error": "the gateway is starting; retry shortly"}, 503)
    try:
        req = parse_predict(await read_body(request, edge.max_body_bytes), edge.max_ads)
    except BadRequest as exc:
        metrics.REQUESTS.labels("bad_request").inc()
        return _error(exc)
    t0 = time.perf_counter()
    try:
        client_id = request.headers.get("x-request-id")  # echoed and logged beside ours, to join the client's logs
        result = await gateway.predict(req, client_id)
    except Overloaded as exc:
        gateway.failed(time.perf_counter() - t0)  # a 503 counts against availability
        body = orjson.dumps({"error": str(exc)})
        return Response(body, 503, {"retry-after": str(exc.retry_after_s)}, media_type=JSON)
    except Exception:  # answered 500 by Starlette; counted against availability first
        gateway.failed(time.perf_counter() - t0)
        raise
    headers = {"x-request-id": client_id} if client_id else None
    return _json(result, headers=headers)


async def feedback(edge: Edge, request: Request) -> Response:
    """POST {"request_id", "ad_id", "clicked"}: checked and counted by the FeedbackDesk
    (ctr.serving.canary.feedback): once per (id, ad), for a served ad, within the maximum age,
    in the online CTR of the id's arm and, for an id of the running rollout, its gates; then
    joined to its shadow pair when the rollout is in its shadow phase (a refused feedback joins nothing)."""
    try:
        fb = parse_feedback(await read_body(request, edge.max_body_bytes))
    except BadRequest as exc:
        return _error(exc)
    claims = request_id.verify(fb.request_id, edge.request_id_key)
    if claims is None:
        metrics.FEEDBACK_REFUSED.labels("forged").inc()
        return _json({"error": "request_id was not issued by this service (use the request_id of a /predict answer)",
                      "detail": ["request_id"]}, 403)  # fmt: skip
    desk = edge.feedback
    if desk is None:
        return _json({"error": "the gateway is starting; retry shortly"}, 503)
    try:
        done = await desk.take(claims, fb.ad_id, fb.clicked)
    except Refused as exc:
        return _json({"error": exc.message, "detail": [exc.reason]}, exc.status)
    except SERVED_ERRORS as exc:
        log.warning("feedback not counted: the feedback store is unavailable: %s: %s", type(exc).__name__, exc)
        metrics.FEEDBACK_REFUSED.labels("store_unavailable").inc()
        return _json({"error": "the feedback store is unavailable; send the feedback again later"}, 503)
    if (shadow := edge.shadow) is not None:  # the shadow phase's paired gate (a failing store degrades, never raises)
        await shadow.join(fb.request_id, fb.ad_id, fb.clicked)
    return _json({"accepted": True, "arm": claims.arm, "gates": done.gates}, 202)


def _integral_values(rows: Any) -> Any:
    """Values such as 1052.0 as 1052: an integer by JSON Schema, as the OpenAPI document says."""
    if not isinstance(rows, list):
        return rows
    return [{**r, "values": [int(v) if isinstance(v, float) and v.is_integer() else v for v in r["values"]]}
            if isinstance(r, dict) and isinstance(r.get("values"), list) else r for r in rows]  # fmt: skip


async def admin_features(edge: Edge, request: Request) -> Response:
    """POST {"group": "...", "rows": [{"id": "...", "values": [...]}]} with a bearer token."""
    token, writer = edge.admin_token, edge.writer
    if not token or writer is None:
        return _json({"error": "admin endpoints are disabled; set CTR_ADMIN_TOKEN to enable them"}, 403)
    if not hmac.compare_digest(request.headers.get("authorization", "").encode(), f"Bearer {token}".encode()):
        return _json({"error": "missing or wrong bearer token (Authorization: Bearer $CTR_ADMIN_TOKEN)"}, 401)
    try:
        body: Any = await read_json(request, edge.max_body_bytes)
    except BadRequest as exc:
        return _error(exc)
    try:
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object with group and rows")
        if isinstance(rows := body.get("rows"), list) and len(rows) > MAX_FEATURE_ROWS:  # before any row is read
            raise ValueError(f"too many rows: {len(rows)} given, at most {MAX_FEATURE_ROWS} per write")
        group, rows = validate_rows(body.get("group"), _integral_values(rows), writer.schema)
    except ValueError as exc:
        return _json({"error": str(exc)}, 422)
    try:
        done = await writer.put(group, rows)
    except (*L2_ERRORS, *L3_ERRORS) as exc:
        # No address or driver message in the body: the log has them. A retry becomes the
        # newest write of its rows (as any write does), whether or not this one had landed.
        where = "the feature database (L3)" if isinstance(exc, L3_ERRORS) else "the write-behind stream (Redis)"
        log.warning("feature write of %s refused: %s unavailable: %s: %s", group.name, where, type(exc).__name__, exc)
        return _json({"error": f"write not done: {where} is unavailable; retry later"}, 503)
    out: dict[str, Any] = {"group": group.name, "written": len(rows), "mode": done.mode}
    if done.cache_deferred:  # committed; the caches follow when Redis answers again
        out["degraded"] = [Reason.L2_DEFERRED]
    return _json(out)


async def admin_features_read(edge: Edge, request: Request) -> Response:
    """POST {"group": "...", "ids": [...]} with the bearer token: what THIS gateway process
    would serve for those ids (through its L1, L2 and L3), with its pid and whether its L1
    hears the other processes' writes. For operators, and for the consistency checker."""
    writer = edge.writer
    if (refused := canary.authorized(edge, request)) is not None or writer is None:
        return refused or _json({"error": "the gateway is starting; retry shortly"}, 503)
    try:
        body: Any = await read_json(request, edge.max_body_bytes)
    except BadRequest as exc:
        return _error(exc)
    group = writer.schema.group(body.get("group")) if isinstance(body, dict) else None
    ids = body.get("ids") if isinstance(body, dict) else None
    if group is None or not isinstance(ids, list) or not 0 < len(ids) <= MAX_READ_IDS or not all(map(valid_id, ids)):
        return _json({"error": f"want {{'group': <a feature group>, 'ids': [1-{MAX_READ_IDS} entity ids]}}"}, 422)
    (values,), degraded = await writer.store.get([(group, ids)])
    coherence = writer.coherence
    return _json(
        {
            "pid": os.getpid(),
            "l1_synced": coherence is not None and coherence.listening,
            "rows": [{"id": i, "values": v} for i, v in zip(ids, values, strict=True)],
            "degraded": degraded,
        }
    )


async def model_info(edge: Edge, request: Request) -> Response:
    """The served model (any body, bounded, is ignored). Served here rather than as a BentoML
    API: BentoML's answered 500 to a multipart Content-Type without a boundary (schemathesis)."""
    try:
        await read_body(request, edge.max_body_bytes)
    except BadRequest as exc:
        return _error(exc)
    info = edge.model_info
    return _json(info) if info is not None else _json({"error": "the gateway is starting; retry shortly"}, 503)


async def openapi_json(edge: Edge, request: Request) -> Response:
    return Response(openapi.document_bytes(edge.max_ads), media_type=JSON)


def make_app(edge: Edge) -> Starlette:
    """The gateway's routes over `edge` (built by ctr.serving.root.build)."""
    return Starlette(
        routes=[
            Route("/predict", bind(edge, predict), methods=["POST"]),
            Route("/feedback", bind(edge, feedback), methods=["POST"]),
            Route("/admin/features", bind(edge, admin_features), methods=["POST"]),
            Route("/admin/features/read", bind(edge, admin_features_read), methods=["POST"]),
            Route("/model_info", bind(edge, model_info), methods=["GET", "POST"]),
            Route("/openapi.json", bind(edge, openapi_json), methods=["GET"]),
            *status.routes(edge),
            *canary.routes(edge),
        ]
    )
