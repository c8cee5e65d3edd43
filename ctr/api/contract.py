"""The public request schema of /predict, and readable validation errors."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from ctr.api import request_id
from ctr.features import schema


def _no_control_chars(value: str) -> str:
    if schema.CONTROL_CHARS.search(value):
        raise ValueError("must not contain control characters")
    return value


EntityId = Annotated[
    StrictStr,
    Field(min_length=1, max_length=schema.MAX_ID_CHARS, description="1-128 characters, no control characters"),
    AfterValidator(_no_control_chars),
]


class Context(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hour: Annotated[StrictInt, Field(ge=0, lt=schema.HOURS)]
    device_type: Literal[schema.DEVICE_TYPES]  # type: ignore[valid-type]
    site_category: Literal[schema.SITE_CATEGORIES]  # type: ignore[valid-type]
    banner_pos: Annotated[StrictInt, Field(ge=0, lt=schema.BANNER_POSITIONS)]
    conn_type: Literal[schema.CONN_TYPES]  # type: ignore[valid-type]


class PredictRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    user_id: EntityId
    ad_ids: Annotated[list[EntityId], Field(min_length=1)]
    context: Context


class Feedback(BaseModel):
    """What happened to one shown ad: the online CTR (an SLI) is clicks over impressions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: Annotated[
        StrictStr,
        Field(min_length=1, max_length=request_id.MAX_CHARS, description="the request_id of a /predict answer"),
    ]
    ad_id: EntityId
    clicked: StrictBool
    arm: Literal["stable", "canary"] | None = Field(
        None, description="Ignored: the arm is the one the request id carries.", json_schema_extra={"deprecated": True}
    )
    score: Annotated[float, Field(gt=0, lt=1)] | None = Field(
        None, description="The score /predict returned for this ad: feeds the canary's calibration gate."
    )


class Prediction(BaseModel):
    """The /predict answer (documentation of the response; the gateway builds a dataclass)."""

    request_id: str = Field(description="Signed by this service; /feedback accepts only these.")
    scores: list[Annotated[float, Field(gt=0, lt=1)]]
    model_version: str
    arm: Literal["stable", "canary"]
    fallback: bool
    degraded: list[str]


class BadRequest(Exception):
    """A request the client must fix; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, detail: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail or []

    def body(self) -> bytes:
        return orjson.dumps({"error": self.message, "detail": self.detail})


def _describe(err: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "body"
    return f"{where}: {err['msg']}"


def parse_predict(body: bytes, max_ads: int) -> PredictRequest:
    """Parse and validate a /predict body, raising BadRequest with a message a person can act on."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, f"request body is not valid JSON ({exc}); send a JSON object") from None
    if not isinstance(payload, dict):
        raise BadRequest(400, "request body must be a JSON object with user_id, ad_ids and context")
    try:
        req = PredictRequest.model_validate(payload)
    except ValidationError as exc:
        detail = [_describe(e) for e in exc.errors(include_url=False)]
        raise BadRequest(422, f"invalid request: {'; '.join(detail[:5])}", detail) from None
    if len(req.ad_ids) > max_ads:
        raise BadRequest(422, f"too many ad_ids: {len(req.ad_ids)} given, at most {max_ads} (CTR_MAX_ADS) per request")
    return req


def parse_feedback(body: bytes) -> Feedback:
    """Parse a /feedback body, raising BadRequest with the field at fault."""
    try:
        return Feedback.model_validate_json(body)
    except ValidationError as exc:
        detail = [_describe(e) for e in exc.errors(include_url=False)]
        raise BadRequest(422, f"invalid feedback: {'; '.join(detail[:5])}", detail) from None
