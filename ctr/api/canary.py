"""The canary's admin API, mounted by `ctr.api.routes.make_app`.

GET /admin/canary (phase, share, per-arm counts, gate estimates with their intervals,
decision history, whether Redis answers); POST /admin/canary/start
({"model_tag": ..., "urls": [...], "plan": {...} | "plan_scale": x, "shadow_s": s}), /pause, /resume,
/promote, /rollback ({"reason": ...} optional). Every endpoint needs
`Authorization: Bearer $CTR_ADMIN_TOKEN` (constant-time compare): missing or wrong is 401
and changes nothing; no token configured is 403 (admin endpoints disabled). Replica URLs
on a host that CTR_CANARY_ALLOWED_HOSTS does not allow are a 422 (the gateway's internal
token goes to no other host). With the canary store unreachable, every action is a 503
except a rollback: the process that takes it decides it at once and answers 202 (see
`CanaryRuntime.rollback_here` for what the other processes see, and when).

`edge.canary` is the process's CanaryRuntime (None: no Redis, 503) and `edge.stable_arm` the
Arm this gateway serves as stable (ctr.api.edge).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ctr.api.body import BodyTooLarge, read_body
from ctr.api.contract import BadRequest
from ctr.api.edge import Edge
from ctr.serving.canary.controller import CanaryError
from ctr.serving.canary.plan import Plan, default_plan
from ctr.serving.canary.runtime import STORE_ERRORS, CanaryRuntime
from ctr.serving.canary.state import Arm, Rollout

JSON = "application/json"


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers=headers, media_type=JSON)


def authorized(edge: Edge, request: Request) -> Response | None:
    """None when the bearer token matches CTR_ADMIN_TOKEN; else the 401/403 to send."""
    token = edge.admin_token
    if not token:
        return _json({"error": "admin endpoints are disabled; set CTR_ADMIN_TOKEN to enable them"}, 403)
    given = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(given, f"Bearer {token}".encode()):
        return _json({"error": "missing or wrong bearer token (Authorization: Bearer $CTR_ADMIN_TOKEN)"}, 401)
    return None


async def _body(edge: Edge, request: Request) -> dict[str, Any]:
    raw = await read_body(request, edge.max_body_bytes)  # bounded by CTR_MAX_BODY_BYTES, as every route's body
    if not raw.strip():
        return {}
    body = orjson.loads(raw)
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    return body


def _plan(body: dict[str, Any]) -> Plan:
    if "plan" in body:
        if not isinstance(body["plan"], dict):
            raise ValueError("plan must be a JSON object (see GET /admin/canary for the shape)")
        try:
            return Plan.from_dict(body["plan"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"plan: {type(exc).__name__}: {exc} (phases need share and duration_s)") from None
    scale = body.get("plan_scale", 1.0)
    if not isinstance(scale, int | float) or scale <= 0:
        raise ValueError("plan_scale must be a number > 0 (1 = the default 1 h / 2 h / 4 h / 8 h phases)")
    shadow_s = body.get("shadow_s", 0.0)  # a shadow phase before the split (seconds, times plan_scale)
    if not isinstance(shadow_s, int | float) or isinstance(shadow_s, bool) or not 0 <= shadow_s < 1e7:
        raise ValueError("shadow_s must be a number of seconds >= 0 (0: no shadow phase)")
    return default_plan(float(scale), shadow_s=float(shadow_s))


def _canary_arm(body: dict[str, Any]) -> Arm:
    tag, urls = body.get("model_tag"), body.get("urls", [])
    if not isinstance(tag, str) or not tag:
        raise ValueError("model_tag (the canary's BentoML model tag) is required")
    if not isinstance(urls, list) or not all(isinstance(u, str) and u.startswith("http") for u in urls):
        raise ValueError("urls must be a list of http(s) URLs of the canary's CTRModel replicas")
    return Arm(tag, tuple(u.strip().rstrip("/") for u in urls))


Handler = Callable[[CanaryRuntime, Edge, dict[str, Any]], Awaitable[Rollout | dict[str, Any]]]


def _endpoint(edge: Edge, action: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Auth, body parsing, the runtime's presence and the store's failures, once for all."""

    async def endpoint(request: Request) -> Response:
        denied = authorized(edge, request)
        if denied is not None:
            return denied
        runtime = edge.canary
        if runtime is None:
            return _json({"error": "canary releases need the shared state in Redis; set CTR_REDIS_URL"}, 503)
        try:
            body = await _body(edge, request) if request.method == "POST" else {}
            out = await action(runtime, edge, body)
        except BadRequest as exc:
            closing = {"connection": "close"} if isinstance(exc, BodyTooLarge) else None
            return _json({"error": exc.message}, exc.status, closing)
        except (orjson.JSONDecodeError, ValueError) as exc:
            status = 409 if isinstance(exc, CanaryError) else 400 if isinstance(exc, orjson.JSONDecodeError) else 422
            return _json({"error": str(exc)}, status)
        except STORE_ERRORS as exc:
            return _json({"error": f"the canary state store is unavailable: {type(exc).__name__}: {exc}"}, 503)
        if isinstance(out, Rollout):
            runtime.adopt(out)
            return _json(orjson.loads(out.to_json()))
        return _json(out, 202 if out.get("store") == "unavailable" else 200)

    return endpoint


async def _status(rt: CanaryRuntime, edge: Edge, body: dict[str, Any]) -> dict[str, Any]:
    await rt.refresh()  # when the store is down, status() says so and shows the last known split
    out = rt.status()
    shadow = edge.shadow
    if shadow is not None and (paired := await shadow.status()) is not None:
        out["shadow"] = paired  # the shadow phase's paired gate (ctr/serving/canary/shadow.py)
    return out


async def _start(rt: CanaryRuntime, edge: Edge, body: dict[str, Any]) -> Rollout:
    stable = edge.stable_arm
    if stable is None:
        raise ValueError("this gateway has no stable arm to compare a canary with")
    canary = _canary_arm(body)
    if not canary.urls:
        if not rt.canary_urls:
            raise ValueError("no canary replicas: give urls, or set CTR_CANARY_URLS on the gateway")
        canary = Arm(canary.tag, rt.canary_urls)
    rt.hosts.check(canary.urls)
    return await rt.controller.start(stable, canary, _plan(body), by="admin")


def _manual(name: str) -> Handler:
    async def act(rt: CanaryRuntime, edge: Edge, body: dict[str, Any]) -> Rollout | dict[str, Any]:
        reason = body.get("reason", f"{name} by hand")
        if not isinstance(reason, str):
            raise ValueError("reason must be a string")
        try:
            return await getattr(rt.controller, name)(by="admin", reason=reason)
        except STORE_ERRORS as exc:
            if name != "rollback":
                raise
            rt.unavailable(exc)
            ended = rt.rollback_here(by="admin", reason=reason)
            return {**orjson.loads(ended.to_json()), "store": "unavailable", "decided": "here", "note": HERE}

    return act


HERE = ("the canary store is unreachable: rolled back in this gateway process and recorded on its machine; the "
        "machine's other gateway processes follow within CTR_CANARY_SYNC_S, other machines send every user to "
        "stable after CTR_CANARY_STALE_S, and the first process holding the decision that reaches the store "
        "puts it there")  # fmt: skip


def routes(edge: Edge) -> list[Route]:
    return [
        Route("/admin/canary", _endpoint(edge, _status), methods=["GET"]),
        Route("/admin/canary/start", _endpoint(edge, _start), methods=["POST"]),
        *(
            Route(f"/admin/canary/{a}", _endpoint(edge, _manual(a)), methods=["POST"])
            for a in ("pause", "resume", "promote", "rollback")
        ),
    ]
