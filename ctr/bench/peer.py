"""The yardsticks of `ctr bench e2e`, on the same data and model as the service:

- a competent monolith peer: one FastAPI/uvicorn process (uvloop, httptools, orjson)
  that fetches a request's features with one Redis MGET and runs the model per request:
  no batching, no cache tiers, no resilience; what a good engineer writes in an afternoon;
- the same monolith as a plain Starlette app (no FastAPI layer): the leaner yardstick.

(The in-process limit is the service's own work in a loop: `ctr.bench.stages`.)

Both read features from Redis under the service's own L2 keys (`ctr features warm`
fills them first).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

if TYPE_CHECKING:
    from fastapi import FastAPI

from ctr.api.contract import BadRequest, parse_predict
from ctr.features import schema
from ctr.features.redis_tier import Entry, connect, decode
from ctr.features.tiers import NEGATIVE, feature_key
from ctr.features.transform import Transformer
from ctr.model import store as modelstore
from ctr.settings import Settings


def _row(entry: Entry | None) -> tuple[Any, ...] | None:
    """An L2 entry's feature row; None for a miss or a cached absence (default features)."""
    return None if entry is None or entry[0] is NEGATIVE else entry[0]


class Monolith:
    """Fetch (one MGET) + transform + forward, per request."""

    def __init__(self, settings: Settings) -> None:
        from ctr.model.runner import ModelRunner

        art = modelstore.artifacts(settings.model_tag)
        # the service's precision (float32 where it is a GPU's) and engine: the yardstick differs
        # in its serving, not its model
        precision = settings.model_precision if settings.model_precision not in ("float16",) else "float32"
        self.runner = ModelRunner(art, "cpu", settings.torch_threads, precision, settings.model_engine)
        self.transformer = Transformer(art.spec, memo=0)  # the afternoon's version: no pre-encoded rows
        self.redis = connect(settings.redis_url, timeout_s=1.0)
        self.tag = art.tag

    async def predict(self, user_id: str, ad_ids: list[str], context: dict[str, Any]) -> list[float]:
        keys = [feature_key(schema.USER_STATIC, user_id), feature_key(schema.USER_BEHAVIORAL, user_id)]
        keys += [feature_key(schema.AD_META, a) for a in ad_ids] + [feature_key(schema.AD_STATS, a) for a in ad_ids]
        now_s = time.time()
        raw = [_row(decode(r, now_s)) for r in await self.redis.mget(keys)]
        n = len(ad_ids)
        x = self.transformer.matrix(raw[0], raw[1], raw[2 : 2 + n], raw[2 + n :], context)
        return self.runner(x).astype(float).tolist()


async def _respond(mono: Monolith, body: bytes, max_ads: int) -> Response:
    """One /predict of either peer: parse, fetch + transform + forward, answer."""
    try:
        req = parse_predict(body, max_ads)
    except BadRequest as exc:
        return Response(exc.body(), exc.status, media_type="application/json")
    scores = await mono.predict(req.user_id, req.ad_ids, req.context.model_dump())
    answer = {"request_id": "", "scores": scores, "model_version": mono.tag, "arm": "stable", "fallback": False,
              "degraded": []}  # fmt: skip
    return Response(orjson.dumps(answer), media_type="application/json")


def make_starlette_app(settings: Settings | None = None) -> Starlette:
    """The monolith as a bare Starlette app: one route, no FastAPI dependency machinery."""
    s = settings or Settings()
    mono: dict[str, Monolith] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        mono["m"] = Monolith(s)
        yield
        await mono["m"].redis.aclose()

    async def predict(request: Request) -> Response:
        return await _respond(mono["m"], await request.body(), s.max_ads)

    async def readyz(request: Request) -> Response:
        return Response(b"ok")

    routes = [Route("/predict", predict, methods=["POST"]), Route("/readyz", readyz)]
    return Starlette(routes=routes, lifespan=lifespan)


def make_floor_app(settings: Settings | None = None) -> Starlette:
    """The HTTP floor: the same uvicorn + Starlette route that parses and validates the body and
    answers as many constant scores, with no features and no model. No service served this way
    here can be faster; its answers are not model-scored work (`ctr bench e2e` reports it apart)."""
    s = settings or Settings()

    async def predict(request: Request) -> Response:
        try:
            req = parse_predict(await request.body(), s.max_ads)
        except BadRequest as exc:
            return Response(exc.body(), exc.status, media_type="application/json")
        answer = {"request_id": "", "scores": [0.5] * len(req.ad_ids), "model_version": "floor", "arm": "stable",
                  "fallback": False, "degraded": []}  # fmt: skip
        return Response(orjson.dumps(answer), media_type="application/json")

    async def readyz(request: Request) -> Response:
        return Response(b"ok")

    return Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/readyz", readyz)])


def make_app(settings: Settings | None = None) -> FastAPI:
    """The monolith as a FastAPI app (FastAPI is the `bench` extra: only this peer uses it)."""
    from fastapi import FastAPI

    app = FastAPI()
    mono: dict[str, Monolith] = {}
    s = settings or Settings()

    @app.on_event("startup")
    async def load() -> None:
        mono["m"] = Monolith(s)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        return await _respond(mono["m"], await request.body(), s.max_ads)

    @app.get("/readyz")
    async def readyz() -> Response:
        return Response(b"ok")

    return app
