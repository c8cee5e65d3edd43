"""The OpenAPI document of the gateway's public routes, built from the pydantic models.

The routes are a plain Starlette app (lean on the hot path), so BentoML's /docs.json does
not list them; the gateway serves this document at /openapi.json instead. It lists
/predict, /feedback, /admin/features, /model_info and BentoML's probes, with every
status each can answer, so a schema-driven fuzzer (schemathesis with every check, `make
fuzz`) can check the answers against it. It declares what the server refuses (unknown
context keys, ids with control characters, request ids not of the issued shape, more ads
than CTR_MAX_ADS), and the server accepts what it allows (13.0 is an integer).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import orjson
from pydantic import BaseModel

from ctr.api.contract import MAX_FEATURE_ROWS, MAX_READ_IDS, NO_CONTROL_CHARS, Feedback, Prediction, PredictRequest
from ctr.features import schema
from ctr.features.writes import KINDS, MAX_INT

REF = "#/components/schemas/{model}"


class Error(BaseModel):
    error: str
    detail: list[str] = []


class FeedbackAccepted(BaseModel):
    accepted: Literal[True]
    arm: Literal["stable", "canary"]
    gates: bool  # counted in the running rollout's gates (an id of it, answered by a model)


class FeatureWritten(BaseModel):
    group: str
    written: int
    mode: Literal["through", "behind"]
    degraded: list[Literal["cache:l2:deferred"]] = []  # present when the announcement was deferred


class FeatureRow(BaseModel):
    id: str
    values: list[int | str] | None  # None: an unknown entity


class FeaturesRead(BaseModel):
    pid: int
    l1_synced: bool
    rows: list[FeatureRow]
    degraded: list[str]


_MODELS: tuple[type[BaseModel], ...] = (
    PredictRequest, Prediction, Feedback, FeedbackAccepted, FeatureWritten, FeaturesRead, Error
)  # fmt: skip
_VALUE = {
    int: {"type": "integer", "minimum": 0, "maximum": MAX_INT - 1},
    str: {"type": "string", "minLength": 1, "maxLength": schema.MAX_ID_CHARS, "pattern": NO_CONTROL_CHARS},
}


def _feature_write(group: schema.FeatureGroup) -> dict[str, Any]:
    """A write of one group: its values' kinds in field order (what validate_rows checks)."""
    kinds = KINDS[group.name]
    values = {"type": "array", "prefixItems": [_VALUE[k] for k in kinds], "items": False,
              "minItems": len(kinds), "maxItems": len(kinds), "description": ", ".join(group.fields)}  # fmt: skip
    entity_id = PredictRequest.model_json_schema()["properties"]["user_id"]
    row = {"type": "object", "required": ["id", "values"], "properties": {"id": entity_id, "values": values}}
    rows = {"type": "array", "minItems": 1, "maxItems": MAX_FEATURE_ROWS, "items": row}
    props = {"group": {"const": group.name}, "rows": rows}
    return {"type": "object", "required": ["group", "rows"], "properties": props}


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel] | dict[str, Any], description: str) -> dict[str, Any]:
    s = _ref(model) if isinstance(model, type) else model
    return {"description": description, "content": {"application/json": {"schema": s}}}


def _errors(*codes: int) -> dict[str, Any]:
    what = {400: "body is not JSON", 401: "missing or wrong bearer token", 403: "refused",
            409: "conflicts with what was counted or is running", 410: "too old or no longer known",
            413: "body over CTR_MAX_BODY_BYTES", 422: "invalid field", 503: "not ready or a store is down"}  # fmt: skip
    return {str(c): _json(Error, what[c]) for c in codes}


def _body(model: type[BaseModel] | str) -> dict[str, Any]:
    ref = {"$ref": REF.format(model=model)} if isinstance(model, str) else _ref(model)
    return {"required": True, "content": {"application/json": {"schema": ref}}}


def _components(max_ads: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in _MODELS:
        s = m.model_json_schema(ref_template=REF)
        out.update(s.pop("$defs", {}))
        out[m.__name__] = s
    out["PredictRequest"]["properties"]["ad_ids"]["maxItems"] = max_ads  # CTR_MAX_ADS, a setting
    out["FeatureWrite"] = {"oneOf": [_feature_write(g) for g in schema.GROUPS]}
    entity_id = PredictRequest.model_json_schema()["properties"]["user_id"]
    out["FeaturesReadRequest"] = {
        "type": "object", "required": ["group", "ids"],
        "properties": {"group": {"enum": [g.name for g in schema.GROUPS]},
                       "ids": {"type": "array", "minItems": 1, "maxItems": MAX_READ_IDS, "items": entity_id}},
    }  # fmt: skip
    return out


@functools.cache
def document(max_ads: int = 1000) -> dict[str, Any]:
    """The document for a gateway accepting at most `max_ads` ads a request (CTR_MAX_ADS)."""
    probe = {"200": {"description": "yes"}, "503": {"description": "no"}}
    info = {"responses": {"200": _json({"type": "object", "required": ["model_version"]}, "the served model"),
                          **_errors(400, 413, 503)}}  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {"title": "ctr-serve gateway", "version": "1"},
        "paths": {
            "/predict": {"post": {
                "operationId": "predict", "requestBody": _body(PredictRequest),
                "responses": {"200": _json(Prediction, "scores, one per ad"), **_errors(400, 413, 422, 503)},
            }},
            "/feedback": {"post": {
                "operationId": "feedback", "requestBody": _body(Feedback),
                "responses": {"202": _json(FeedbackAccepted, "counted"),
                              **_errors(400, 403, 409, 410, 413, 422, 503)},
            }},
            "/admin/features": {"post": {
                "operationId": "admin_features", "requestBody": _body("FeatureWrite"),
                "security": [{"bearer": []}],
                "responses": {"200": _json(FeatureWritten, "written"), **_errors(400, 401, 403, 413, 422, 503)},
            }},
            "/admin/features/read": {"post": {
                "operationId": "admin_features_read", "requestBody": _body("FeaturesReadRequest"),
                "security": [{"bearer": []}],
                "responses": {"200": _json(FeaturesRead, "what this gateway process serves"),
                              **_errors(400, 401, 403, 413, 422, 503)},
            }},
            "/model_info": {"get": {"operationId": "model_info_get", **info},
                            "post": {"operationId": "model_info", **info}},
            "/livez": {"get": {"operationId": "livez", "responses": probe}},
            "/readyz": {"get": {"operationId": "readyz", "responses": probe}},
        },
        "components": {
            "schemas": _components(max_ads),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }  # fmt: skip


@functools.cache
def document_bytes(max_ads: int = 1000) -> bytes:
    return orjson.dumps(document(max_ads))
