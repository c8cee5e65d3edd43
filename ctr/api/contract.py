"""The public request schema of /predict, and readable validation errors."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
)

from ctr.api import request_id
from ctr.features import schema

MAX_FEATURE_ROWS = 10_000  # rows in one /admin/features write
MAX_READ_IDS = 1000  # ids one /admin/features/read may ask for


# No C0/C1 control characters (schema.CONTROL_CHARS), as ECMA-262 (JSON Schema) writes it.
NO_CONTROL_CHARS = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"


def _no_control_chars(value: str) -> str:
    if schema.CONTROL_CHARS.search(value):
        raise ValueError("must not contain control characters")
    return value


EntityId = Annotated[
    StrictStr,
    Field(
        min_length=1,
        max_length=schema.MAX_ID_CHARS,
        description="1-128 characters, no control characters",
        json_schema_extra={"pattern": NO_CONTROL_CHARS},  # declared; checked by _no_control_chars
    ),
    AfterValidator(_no_control_chars),
]


def _integral(value: object) -> object:
    """13.0 as 13: JSON Schema counts a number with a zero fraction as an integer, so the
    contract's "integer" admits it; 13.5, "13" and true stay refused (StrictInt)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def json_int(**bounds: int) -> Any:
    """An integer as JSON Schema defines one (a number with no fractional part), within `bounds`
    (ge, lt, ...); no strings or booleans. The bounds come before the validator: after it,
    pydantic wrote them into the JSON schema as unknown keys ("ge") instead of "minimum"."""
    return Annotated[StrictInt, Field(**bounds), BeforeValidator(_integral)]  # type: ignore[arg-type]


class Context(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hour: json_int(ge=0, lt=schema.HOURS)  # type: ignore[valid-type]
    device_type: Literal[schema.DEVICE_TYPES]  # type: ignore[valid-type]
    site_category: Literal[schema.SITE_CATEGORIES]  # type: ignore[valid-type]
    banner_pos: json_int(ge=0, lt=schema.BANNER_POSITIONS)  # type: ignore[valid-type]
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
        Field(
            min_length=1,
            max_length=request_id.MAX_CHARS,
            description="the request_id of a /predict answer; any other is refused (403), one older than "
            "CTR_FEEDBACK_MAX_AGE_S too (410)",
            json_schema_extra={"pattern": request_id.PATTERN},
        ),
    ]
    ad_id: Annotated[EntityId, Field(description="one of the ad_ids that answer scored (else 409)")]
    clicked: StrictBool
    arm: Literal["stable", "canary"] | None = Field(
        None, description="Ignored: the arm is the one the request id carries.", json_schema_extra={"deprecated": True}
    )
    score: Annotated[float, Field(gt=0, lt=1)] | None = Field(
        None,
        description="Ignored: the calibration gate takes the score that was served for this ad, never the client's.",
        json_schema_extra={"deprecated": True},
    )


class Prediction(BaseModel):
    """The /predict answer (documentation of the response; the gateway builds a dataclass)."""

    request_id: str = Field(description="Signed by this service; /feedback accepts only these.")
    scores: list[Annotated[float, Field(gt=0, lt=1)]]
    model_version: str
    arm: Literal["stable", "canary"]
    fallback: bool
    degraded: list[str]


MAX_DETAIL_ITEMS = 5  # an error names the first few problems and counts the rest
MAX_DETAIL_CHARS = 200  # one item (a field path can hold a client's 1 MB key)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_DETAIL_CHARS else f"{text[: MAX_DETAIL_CHARS - 1]}…"


def cap_detail(detail: list[str]) -> list[str]:
    """The first MAX_DETAIL_ITEMS items, each clipped, and a count of the rest: an error body
    stays under a kilobyte whatever the request held (300,000 bad ids made a 17 MB one)."""
    head = [_clip(d) for d in detail[:MAX_DETAIL_ITEMS]]
    rest = len(detail) - len(head)
    return [*head, f"... and {rest} more"] if rest else head


class BadRequest(Exception):
    """A request the client must fix; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, detail: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = cap_detail(detail or [])

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
    ads = payload.get("ad_ids")
    if isinstance(ads, list) and len(ads) > max_ads:  # before any element is looked at
        raise BadRequest(422, f"too many ad_ids: {len(ads)} given, at most {max_ads} (CTR_MAX_ADS) per request")
    try:
        return PredictRequest.model_validate(payload)
    except ValidationError as exc:
        raise _invalid("invalid request", exc) from None


def _invalid(what: str, exc: ValidationError) -> BadRequest:
    bad = BadRequest(422, what, [_describe(e) for e in exc.errors(include_url=False)])
    bad.message = f"{what}: {'; '.join(bad.detail)}"  # the capped detail: under a kilobyte in all
    return bad


def parse_feedback(body: bytes) -> Feedback:
    """Parse a /feedback body, raising BadRequest with the field at fault."""
    try:
        return Feedback.model_validate_json(body)
    except ValidationError as exc:
        raise _invalid("invalid feedback", exc) from None
