"""The gateway's own routes: a lean Starlette app mounted into the BentoML service.

/predict: parsing and validation are ours (orjson + pydantic), so every bad input gets a
4xx with a message a person can act on, and the hot path skips BentoML's per-call
IO-descriptor machinery (notes/bentoml.md: about 1.5-1.8 ms of CPU per request). Every
answer carries a signed request id (ctr.api.request_id).
/feedback: counted under the arm its (signed) request id carries; ids this service did
not issue are refused.
/admin/features: authenticated feature writes (write-through or write-behind per group).
/openapi.json: the OpenAPI document of these routes (ctr.api.openapi).
Every body is bounded (CTR_MAX_BODY_BYTES) before it is read into memory or parsed.
"""

from __future__ import annotations

import dataclasses
import hmac
import time
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ctr import metrics
from ctr.api import canary, openapi, request_id, status
from ctr.api.contract import BadRequest, parse_feedback, parse_predict
from ctr.features.store import L2_ERRORS, L3_ERRORS
from ctr.features.writes import FeatureWriter, validate_rows
from ctr.serving.overload import Admission, Overloaded

JSON = "application/json"
DEFAULT_MAX_BODY_BYTES = 1_048_576


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers=headers, media_type=JSON)


def _error(exc: BadRequest) -> Response:
    return Response(exc.body(), exc.status, media_type=JSON)


async def read_body(request: Request) -> bytes:
    """The body, refused with a 413 as soon as it is known to exceed the limit: from its
    Content-Length before reading, or while streaming it when there is none."""
    limit: int = getattr(request.app.state, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)
    too_large = BadRequest(413, f"request body over {limit} bytes (CTR_MAX_BODY_BYTES)")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def predict(request: Request) -> Response:
    gateway: Admission | None = getattr(request.app.state, "gateway", None)
    if gateway is None:
        return _json({"error": "the gateway is starting; retry shortly"}, 503)
    try:
        req = parse_predict(await read_body(request), request.app.state.max_ads)
    except BadRequest as exc:
        metrics.REQUESTS.labels("bad_request").inc()
        return _error(exc)
    t0 = time.perf_counter()
    try:
        result = await gateway.predict(req)
    except Overloaded as exc:
        gateway.failed(time.perf_counter() - t0)  # a 503 counts against availability
        body = orjson.dumps({"error": str(exc)})
        return Response(body, 503, {"retry-after": str(exc.retry_after_s)}, media_type=JSON)
    except Exception:  # answered 500 by Starlette; counted against availability first
        gateway.failed(time.perf_counter() - t0)
        raise
    runtime = getattr(request.app.state, "canary", None)
    unit = runtime.unit(req.user_id) if runtime is not None else 0
    signed = request_id.issue(result.arm, result.model_version, request.app.state.request_id_key, time.time(), unit)
    client_id = request.headers.get("x-request-id")  # echoed as a header only, to join the client's logs
    headers = {"x-request-id": client_id} if client_id else None
    return _json(dataclasses.replace(result, request_id=signed), headers=headers)


async def feedback(request: Request) -> Response:
    """POST {"request_id", "ad_id", "clicked", "score"?}: counted for the online CTR of the id's arm and,
    during a rollout, in that arm's counters for the canary's gates."""
    try:
        fb = parse_feedback(await read_body(request))
    except BadRequest as exc:
        return _error(exc)
    claims = request_id.verify(fb.request_id, request.app.state.request_id_key)
    if claims is None:
        return _json({"error": "request_id was not issued by this service (use the request_id of a /predict answer)",
                      "detail": ["request_id"]}, 403)  # fmt: skip
    metrics.FEEDBACK.labels(claims.arm, "impression").inc()
    if fb.clicked:
        metrics.FEEDBACK.labels(claims.arm, "click").inc()
    if (canary_runtime := getattr(request.app.state, "canary", None)) is not None:
        canary_runtime.record_feedback(
            claims.arm, fb.clicked, fb.score, claims.unit
        )  # the canary's CTR and calibration gates
    return _json({"accepted": True, "arm": claims.arm}, 202)


async def admin_features(request: Request) -> Response:
    """POST {"group": "...", "rows": [{"id": "...", "values": [...]}]} with a bearer token."""
    token: str = getattr(request.app.state, "admin_token", "")
    writer: FeatureWriter | None = getattr(request.app.state, "writer", None)
    if not token or writer is None:
        return _json({"error": "admin endpoints are disabled; set CTR_ADMIN_TOKEN to enable them"}, 403)
    if not hmac.compare_digest(request.headers.get("authorization", "").encode(), f"Bearer {token}".encode()):
        return _json({"error": "missing or wrong bearer token (Authorization: Bearer $CTR_ADMIN_TOKEN)"}, 401)
    try:
        body: Any = orjson.loads(await read_body(request))
    except BadRequest as exc:
        return _error(exc)
    except orjson.JSONDecodeError as exc:
        return _json({"error": f"request body is not valid JSON ({exc})"}, 400)
    try:
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object with group and rows")
        group, rows = validate_rows(body.get("group"), body.get("rows"), writer.schema)
    except ValueError as exc:
        return _json({"error": str(exc)}, 422)
    try:
        mode = await writer.put(group, rows)
    except (*L2_ERRORS, *L3_ERRORS) as exc:
        return _json({"error": f"write not done, a store is unavailable: {type(exc).__name__}: {exc}"}, 503)
    return _json({"group": group.name, "written": len(rows), "mode": mode})


async def model_info(request: Request) -> Response:
    """The served model (any body, bounded, is ignored). Served here rather than as a BentoML
    API: BentoML's answered 500 to a multipart Content-Type without a boundary (schemathesis)."""
    try:
        await read_body(request)
    except BadRequest as exc:
        return _error(exc)
    info = getattr(request.app.state, "model_info", None)
    return _json(info) if info is not None else _json({"error": "the gateway is starting; retry shortly"}, 503)


async def openapi_json(request: Request) -> Response:
    return Response(openapi.document_bytes(), media_type=JSON)


def make_app() -> Starlette:
    """Set `app.state.gateway` (an `Admission` around the Gateway), `.max_ads`, `.writer`,
    `.admin_token`, `.request_id_key`, `.max_body_bytes`, `.model_info` and `.status` (a
    StatusBoard, for /status and /status.json) before serving."""
    return Starlette(
        routes=[
            Route("/predict", predict, methods=["POST"]),
            Route("/feedback", feedback, methods=["POST"]),
            Route("/admin/features", admin_features, methods=["POST"]),
            Route("/model_info", model_info, methods=["GET", "POST"]),
            Route("/openapi.json", openapi_json, methods=["GET"]),
            *status.ROUTES,
            *canary.routes(),
        ]
    )
