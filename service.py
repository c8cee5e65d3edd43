"""The BentoML services of ctr-serve (../shared/DESIGN.md): thin wiring over the `ctr` package.

CTRGateway is the entry (POST /predict); it runs features, transform and the fallback
table in its own process and coalesces concurrent requests into one CTRModel call.
FeatureService and FallbackService serve the same `ctr` code over HTTP on their own.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import bentoml
import numpy as np
from pydantic import Field

from ctr.api import bento, bentoml_compat, internal
from ctr.api.contract import Context, EntityId
from ctr.api.edge import LateApp
from ctr.api.routes import make_app
from ctr.features import stack as feature_stack
from ctr.features.transform import Transformer
from ctr.features.writes import consumer_name, run_writer
from ctr.model import store as modelstore
from ctr.model.app import make_model_app
from ctr.observe import log as obslog
from ctr.observe.pauses import settle_gc
from ctr.serving import placement, root
from ctr.serving.model_client import ModelClient
from ctr.settings import Settings

internal.ensure_token()  # before Settings: a random shared token when CTR_INTERNAL_TOKEN is unset
SETTINGS = Settings()
INTERNAL_HEADERS = internal.headers(SETTINGS.internal_token)
MODEL = bentoml.models.BentoModel(SETTINGS.model_tag)
# The gateway runs the model itself (CTR_MODEL_REPLICA=local; auto on a CPU): then CTRModel is
# no dependency of it and `bentoml serve` starts no CTRModel process.
LOCAL_MODEL = placement.runs_local(SETTINGS)
GATEWAY_WORKERS = placement.gateway_workers(SETTINGS)

# Measured pitfalls (notes/bentoml.md): access logging costs ~14 % of throughput and most
# of the p99 tail; a caller's connection to a dependency is recycled every 100 requests
# while still in use (random 500s) unless the callee raises runner_connection limits.
# BentoML's OpenTelemetry middleware makes a span per request even with no exporter (12 %
# of the gateway's CPU, 19 % of CTRModel's under load, by py-spy): all URLs are excluded
# from it unless CTR_TRACING is on.
COMMON: dict[str, Any] = {
    "logging": {"access": {"enabled": False}},
    "runner_connection": {"max_requests": 2**31 - 1, "max_age": 1e9},
    "traffic": {"timeout": 30},
    **({} if SETTINGS.tracing else {"tracing": {"excluded_urls": [".*"]}}),
}


# BentoML mounts these when the classes are defined; each is served once its process built it.
model_app = LateApp()
predict_app = LateApp()


@bentoml.asgi_app(model_app, path="/")
@bentoml.service(name="ctr_model", workers=SETTINGS.model_workers, **COMMON)
class CTRModel:
    """The batchable model runner; the process that owns the device."""

    stored = MODEL

    def __init__(self) -> None:
        from ctr.model.runner import ModelRunner

        obslog.configure(SETTINGS.log_format, SETTINGS.log_level)
        art = modelstore.artifacts(str(self.stored.tag))
        self.runner = ModelRunner(art, SETTINGS.device, SETTINGS.torch_threads, SETTINGS.model_precision,
                                  SETTINGS.model_engine)  # fmt: skip
        model_app.serve(make_model_app(self.runner, SETTINGS.model_delay_ms / 1000.0, SETTINGS.model_score_scale))
        settle_gc()

    # max_latency_ms is BentoML's shedding cut-off, not a batching window: kept far above
    # the gateway's deadline so nothing is shed below saturation; max_batch_size is kept
    # above the gateway's largest coalesced call so no call is split into fragments.
    @bentoml.api(
        batchable=True,
        batch_dim=0,
        max_batch_size=SETTINGS.model_max_batch_rows,
        max_latency_ms=SETTINGS.model_max_latency_ms,
    )
    async def predict(self, features: np.ndarray) -> np.ndarray:
        return self.runner(features)


@bentoml.service(name="ctr_features", workers=SETTINGS.features_workers, **COMMON)
class FeatureService:
    """The tiered feature store and transform, over HTTP."""

    stored = MODEL

    def __init__(self) -> None:
        obslog.configure(SETTINGS.log_format, SETTINGS.log_level)  # after BentoML set up this process's logging
        art = modelstore.artifacts(str(self.stored.tag))
        self.stack = feature_stack.features(SETTINGS, shared=True)
        self.lookup = self.stack.lookup
        self.transformer = Transformer(art.spec, SETTINGS.encoded_rows)
        self._stop = asyncio.Event()
        self._writer: asyncio.Task[int] | None = None

    @bentoml.on_startup
    async def start_writer(self) -> None:
        """This process commits write-behind feature writes to L3 (durably, see ctr/features/writes.py)
        and hears every process's writes (ctr/features/coherence.py)."""
        await self.stack.start()
        if self.stack.writer.redis is not None:
            self._writer = asyncio.create_task(
                run_writer(self.stack.writer.redis, self.stack.store.origin, consumer_name(), self._stop,
                           fs=self.stack.schema, on_commit=self.stack.writer.refresh)
            )  # fmt: skip

    @bentoml.on_shutdown
    async def stop_writer(self) -> None:
        self._stop.set()
        if self._writer is not None:
            await asyncio.wait({self._writer}, timeout=2)
        await feature_stack.close(self.stack)

    @bentoml.api
    async def features(self, user_id: str, ad_ids: list[str]) -> dict[str, Any]:
        f = await self.lookup.lookup(user_id, ad_ids)
        return {
            "user": {"user_static": f.user_static, "user_behavioral": f.user_behavioral},
            "ads": [{"ad_meta": m, "ad_stats": s} for m, s in zip(f.ad_meta, f.ad_stats, strict=True)],
            "degraded": f.degraded,
        }

    @bentoml.api
    async def matrix(self, user_id: str, ad_ids: list[str], context: Context) -> dict[str, Any]:
        f = await self.lookup.lookup(user_id, ad_ids)
        x = self.transformer.matrix(f.user_static, f.user_behavioral, f.ad_meta, f.ad_stats, context.model_dump())
        return {"matrix": x, "degraded": f.degraded}


@bentoml.service(name="ctr_fallback", workers=SETTINGS.fallback_workers, **COMMON)
class FallbackService:
    """Historical segment CTR blended with the global CTR, over HTTP."""

    stored = MODEL

    def __init__(self) -> None:
        obslog.configure(SETTINGS.log_format, SETTINGS.log_level)  # after BentoML set up this process's logging
        art = modelstore.artifacts(str(self.stored.tag))
        self.table = art.segments
        self.version = f"fallback:{art.tag}"

    @bentoml.api
    async def predict(self, ad_ids: list[str], context: Context) -> dict[str, Any]:
        return {"scores": self.table.scores(context.model_dump(), len(ad_ids)), "model_version": self.version}


# Internal services answer only callers holding the shared token (ctr/api/internal.py).
for _internal in (CTRModel, FeatureService, FallbackService):
    _internal.add_asgi_middleware(internal.InternalAuth, token=SETTINGS.internal_token)


@bentoml.asgi_app(predict_app, path="/")
@bentoml.service(name="ctr_gateway", workers=GATEWAY_WORKERS, **COMMON)
class CTRGateway:
    """The entry: /predict, features in-process, the model pool (CTR_MODEL_URLS; else the model
    in this process or the in-graph CTRModel as its one replica), fallback."""

    stored = MODEL
    model = None if LOCAL_MODEL else bentoml.depends(CTRModel)
    feature_service = bentoml.depends(FeatureService)
    fallback_service = bentoml.depends(FallbackService)

    def __init__(self) -> None:
        obslog.configure(SETTINGS.log_format, SETTINGS.log_level)  # after BentoML set up this process's logging
        art = modelstore.artifacts(str(self.stored.tag))
        self.model_client = ModelClient(self._resolve_model, SETTINGS.model_hop, INTERNAL_HEADERS)
        self.root = root.build(
            SETTINGS, art, local=root.local_runner(SETTINGS, art) if LOCAL_MODEL else None,
            in_graph=None if LOCAL_MODEL else self.model_client, features_call=self._remote_features,
            fallback_call=self._remote_fallback, headers=INTERNAL_HEADERS, workers=GATEWAY_WORKERS,
        )  # fmt: skip

    @bentoml.on_startup
    async def start(self) -> None:
        """Hear other processes' feature writes, then warm L1 and L2 before traffic (the server
        does not listen until done); the model replicas warm in the background (`__is_ready__`)."""
        await self.root.start()
        predict_app.serve(make_app(self.root.edge))

    async def __is_ready__(self) -> bool:
        """Ready once a model replica answered in time (ctr.serving.pool.warm logs why it has not)."""
        return self.root.ready()

    @bentoml.on_shutdown
    async def close(self) -> None:
        await self.root.close()
        await self.model_client.close()

    @bentoml.api(route=bento.ROUTE)
    async def predict(
        self, user_id: EntityId, ad_ids: Annotated[list[EntityId], Field(min_length=1)], context: Context
    ) -> dict[str, Any]:
        """The /predict contract for BentoML's clients (ctr/api/bento.py); /predict itself is the lean mount."""
        return await bento.predict(self.root.edge, user_id, ad_ids, context)

    def _resolve_model(self) -> tuple[str | None, Any]:
        """CTRModel's URL (set when the dependency resolves, under `bentoml serve`) and BentoML's call."""
        client = internal.authorize_proxy(self.model, SETTINGS.internal_token)
        return bentoml_compat.dependency_url(type(self), "model"), client.to_async.predict

    async def _remote_features(self, **kwargs: Any) -> dict[str, Any]:
        return await internal.authorize_proxy(self.feature_service, SETTINGS.internal_token).to_async.matrix(**kwargs)

    async def _remote_fallback(self, ad_ids: list[str], context: dict[str, Any]) -> list[float]:
        proxy = internal.authorize_proxy(self.fallback_service, SETTINGS.internal_token)
        out = await proxy.to_async.predict(ad_ids=ad_ids, context=context)
        return list(out["scores"])


# POST /predict past BentoML's per-request middlewares (ctr/api/bentoml_compat.py, item 6; `ctr bench http`).
if SETTINGS.predict_fast_path and not SETTINGS.tracing:
    CTRGateway.add_asgi_middleware(bentoml_compat.FastPath, routes={"/predict": predict_app})
