"""The composition root of a gateway process: `build(settings, art, ...)` makes every object a
request passes through, in one place a reader can follow, and `Root` starts and closes them.

    telemetry (SLI recorder, fallback bursts)   breakers (the status page lists them)
    feature stack (L1 -> L2 -> L3, writer, coherence)
    model pool (replicas: this process's model, CTRModel in the graph, or CTR_MODEL_URLS)
    canary arms (a pool per rollout; the runtime syncs the rollout from Redis)
    gateway (admission -> features -> transform -> model -> fallback), request-id signer
    status board, and the Edge the HTTP routes read (ctr.api.edge)

Nothing here is a module-level singleton: a test builds as many roots as it likes. What
BentoML gives the gateway (calls to its in-graph dependencies, the process count) comes in
as arguments from service.py, the only file that knows BentoML's service classes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctr.api.edge import Edge
from ctr.api.request_id import Signer, resolve_key
from ctr.features import stack as feature_stack
from ctr.features.stack import FeatureStack
from ctr.features.transform import Transformer
from ctr.features.warm import warm
from ctr.model.store import ModelArtifacts
from ctr.observe import pauses, sli
from ctr.observe.telemetry import Telemetry
from ctr.resilience.breaker import Breakers
from ctr.resilience.deadline import REMOTE_ERRORS, guarded
from ctr.resilience.limit import AimdLimit
from ctr.resilience.retry import Retrier, RetryBudget
from ctr.serving import fleet
from ctr.serving.canary.arms import Arms
from ctr.serving.canary.controller import Controller
from ctr.serving.canary.feedback import FeedbackDesk
from ctr.serving.canary.hosts import HostPolicy
from ctr.serving.canary.paired import PairedConfig
from ctr.serving.canary.runtime import CanaryRuntime
from ctr.serving.canary.served import ServedLog
from ctr.serving.canary.shadow import RedisShadowStore, Shadow, keyed_draw
from ctr.serving.canary.state import Arm, RedisStore
from ctr.serving.canary.stats import GateConfig
from ctr.serving.canary.tombstones import SUBDIR as TOMBSTONES
from ctr.serving.canary.tombstones import Tombstones
from ctr.serving.coalesce import ModelCall, Upstream
from ctr.serving.fallback import Fallback, RemoteFallback
from ctr.serving.features import FeatureProvider, local_features, remote_features
from ctr.serving.gateway import Gateway, IdIssuer, Model
from ctr.serving.model_client import InvalidAnswer
from ctr.serving.pool import (
    CallReplica,
    FixedSource,
    HealthConfig,
    HttpReplica,
    LocalReplica,
    ModelPool,
    PoolConfig,
    UrlSource,
    parse_urls,
)
from ctr.serving.pool.replica import Replica
from ctr.serving.pool.warm import warm_pool
from ctr.serving.status import Sources, StatusBoard
from ctr.settings import Settings

log = logging.getLogger(__name__)
IN_GRAPH = "in-graph"
LOCAL = "local"


@dataclass
class Root:
    """One gateway process's objects, built by `build`; `start` before serving, `close` after."""

    settings: Settings
    art: ModelArtifacts
    telemetry: Telemetry
    breakers: Breakers
    stack: FeatureStack
    pool: ModelPool
    arms: Arms | None
    shadow: Shadow | None
    gateway: Gateway
    status: StatusBoard
    edge: Edge
    width: int
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _model_warm: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Hear other processes' feature writes, warm L1 and L2, start the pool, the canary's
        sync and the once-a-second ticker; warm the model replicas in the background (`ready`)."""
        s = self.settings
        await self.stack.start()
        if s.warm and not s.features_remote:
            await warm(self.stack.store, s.warm_top_users, self.stack.schema)
        pauses.settle_gc()
        await self.pool.start()
        if self.arms is not None:
            self.arms.start()
        if self.shadow is not None:
            self.shadow.start(s.canary_sync_s)
        self._tasks.append(start_ticker(self.status))
        self._model_warm = asyncio.create_task(
            warm_pool(self.pool, self.width, s.deadline_ms / 1000, s.warm_model_round_s)
        )

    def ready(self) -> bool:
        """Whether a model replica answered in time (warm_model logs why it has not)."""
        t = self._model_warm
        return t is not None and t.done() and not t.cancelled() and t.exception() is None

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._model_warm] if self._model_warm else [])]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.shadow is not None:
            await self.shadow.close()
        if self.arms is not None:
            await self.arms.close()
        await self.pool.close()
        await feature_stack.close(self.stack)


def build(
    settings: Settings,
    art: ModelArtifacts,
    *,
    local: Callable[[np.ndarray], np.ndarray] | None = None,
    in_graph: ModelCall | None = None,
    features_call: Callable[..., Awaitable[Any]] | None = None,
    fallback_call: RemoteFallback | None = None,
    headers: dict[str, str] | None = None,
    workers: int = 1,
) -> Root:
    """A gateway process's objects from the settings and the served model. The model runs in
    this process (`local`, a runner), or in CTRModel reached through `in_graph`, unless
    CTR_MODEL_URLS names replicas; `features_call` and `fallback_call` reach FeatureService and
    FallbackService (used with CTR_FEATURES_REMOTE, CTR_FALLBACK_REMOTE); `headers` go with
    every internal call; `workers` is the number of gateway processes (the status page)."""
    telemetry = Telemetry.from_settings(settings)
    breakers = Breakers(settings)
    upstream = Upstream()  # the gateway's requests in their feature stage, for the pools' coalescers
    width = len(art.architecture["cardinalities"])
    pool = model_pool(settings, in_graph, width, headers=headers, local=local, breakers=breakers, upstream=upstream)
    stack = feature_stack.features(settings, shared=True, breakers=breakers)
    arms = canary_arms(settings, pool, art.tag, width, headers, breakers, upstream)  # None without Redis
    id_key = resolve_key(settings.request_id_key, settings.admin_token, settings.data_dir)
    shadow = shadow_tap(settings, arms, id_key)  # the canary's shadow phase; None without Redis
    receipts = arms.runtime.served if arms else None  # what each answer served, for /feedback
    signer = Signer(id_key, receipts=receipts)
    gw = gateway(settings, art, pool, stack, features_call, fallback_call, arms, signer.issue,
                 telemetry, breakers, shadow, upstream)  # fmt: skip
    board = status_board(gw, stack, workers, breakers)
    edge = Edge(
        gateway=gw, max_ads=settings.max_ads, max_body_bytes=settings.max_body_bytes, request_id_key=id_key,
        admin_token=settings.admin_token, writer=stack.writer, canary=arms.runtime if arms else None,
        stable_arm=Arm(art.tag, tuple(u for u in settings.model_urls.split(",") if u)),
        model_info=model_info(art), status=board, shadow=shadow, feedback=feedback_desk(settings, arms),
    )  # fmt: skip
    return Root(settings, art, telemetry, breakers, stack, pool, arms, shadow, gw, board, edge, width)


def local_runner(settings: Settings, art: ModelArtifacts) -> Callable[[np.ndarray], np.ndarray]:
    """The forward pass in this process (a local replica, when placement.runs_local)."""
    from ctr.model.runner import ModelRunner

    return ModelRunner(art, settings.device, settings.torch_threads, settings.model_precision, settings.model_engine)


def model_pool(settings: Settings, in_graph: ModelCall | None = None, width: int = 16, name: str = "model",
               urls: str | None = None, headers: dict[str, str] | None = None,
               local: Callable[[np.ndarray], np.ndarray] | None = None,
               breakers: Breakers | None = None, upstream: Upstream | None = None) -> ModelPool:  # fmt: skip
    """The pool of model replicas: CTR_MODEL_URLS (or `urls`, e.g. a canary arm's), or, when
    empty, the model in this process (`local`, a runner) or else the in-graph CTRModel reached
    through `in_graph`, as the pool's one replica."""
    breakers = breakers or Breakers(settings)
    spec = settings.model_urls if urls is None else urls
    weights = settings.model_weights if urls is None else []  # CTR_MODEL_WEIGHTS belong to CTR_MODEL_URLS
    source: UrlSource | FixedSource
    if spec:
        source = UrlSource(parse_urls(spec, weights))
    elif local is not None:
        source = FixedSource([LOCAL])
    elif in_graph is not None:
        source = FixedSource([IN_GRAPH])
    else:
        raise ValueError("no model replicas: set CTR_MODEL_URLS")

    def factory(url: str) -> Replica:
        if url == LOCAL and local is not None:
            return LocalReplica(local, width, thread=settings.local_forward == "thread")
        if url == IN_GRAPH and in_graph is not None:
            return CallReplica(IN_GRAPH, in_graph, width)
        return HttpReplica(url, headers)

    config = PoolConfig(
        policy=settings.lb_policy, deadline_s=settings.deadline_ms / 1000.0,
        health=HealthConfig.from_settings(settings),
        load_factor=settings.hash_load_factor, probe_interval_s=settings.probe_interval_s,
        probe_timeout_s=settings.probe_timeout_ms / 1000.0, refresh_s=settings.dns_refresh_s,
        max_inflight=settings.batch_max_inflight, max_rows=settings.batch_max_rows,
        window_s=settings.batch_window_ms / 1000.0, window=settings.batch_window, hedge=settings.hedge,
        upstream=upstream,
    )  # fmt: skip
    # An invalid answer is a failure of that replica: retried on another one like an error.
    retrier = Retrier(
        name, (*REMOTE_ERRORS, InvalidAnswer), RetryBudget(name, settings.retry_budget_ratio), settings.retry_attempts
    )
    return ModelPool(name, source, factory, config, retrier, breakers.make)


def gateway(
    settings: Settings,
    art: ModelArtifacts,
    model: Model,
    stack: FeatureStack,
    features_call: Callable[..., Awaitable[Any]] | None = None,
    fallback_call: RemoteFallback | None = None,
    arms: Arms | None = None,
    new_id: IdIssuer | None = None,
    telemetry: Telemetry | None = None,
    breakers: Breakers | None = None,
    shadow: Shadow | None = None,
    upstream: Upstream | None = None,
) -> Gateway:
    """The gateway core. Features come from this process, or from FeatureService through
    `features_call` with CTR_FEATURES_REMOTE; fallback scores from the in-process table, or
    from FallbackService through `fallback_call` with CTR_FALLBACK_REMOTE. Every remote call
    is guarded by its breaker and a timeout; `model` (the pool, `model_pool`) does the same per
    replica, with the deadline as the timeout. Admission (CTR_LIMIT, CTR_OVERLOAD) is its first stage."""
    telemetry = telemetry or Telemetry.from_settings(settings)
    breakers = breakers or Breakers(settings)
    transformer = Transformer(art.spec, settings.encoded_rows)
    provider: FeatureProvider = local_features(stack.lookup, transformer, telemetry)
    if settings.features_remote and features_call is not None:
        provider = remote_features(features_call, breakers.make("features"), transformer, telemetry)
    remote_fallback = None
    if settings.fallback_remote and fallback_call is not None:
        remote_fallback = guarded(fallback_call, breakers.make("fallback"), settings.fallback_timeout_ms / 1000.0)
    deadline_s = settings.deadline_ms / 1000.0
    limiter = AimdLimit.from_settings(settings) if settings.limit == "aimd" else None
    return Gateway(
        provider, model, Fallback(art.segments, remote_fallback), art.tag, deadline_s, arms, new_id,
        telemetry=telemetry, limiter=limiter, overload=settings.overload, shadow=shadow,
        upstream=upstream,
    )  # fmt: skip


def status_board(
    gw: Gateway, stack: FeatureStack | None, workers: int = 1, breakers: Breakers | None = None
) -> StatusBoard:
    """The status page's panels over this process's gateway, feature store and write-behind stream."""
    store = None if stack is None else stack.store
    stream = None if stack is None else stack.writer.redis
    return StatusBoard(Sources(gw.sli, gw, store, stream, workers, fleet_dir=fleet.directory(), breakers=breakers))


def start_ticker(board: StatusBoard) -> asyncio.Task[None]:
    """Once a second: the SLI gauges, the cache-rate samples, the end of fallback bursts; and
    the event loop's lag, twenty times a second (ctr.observe.pauses)."""
    gw = board.sources.gateway
    bursts = gw.telemetry.bursts
    pauses.watch_gc()  # the gateway's own collections (the other services' would blur them)

    async def run() -> None:
        await asyncio.gather(sli.run_ticker(board.sources.recorder, board.tick, bursts.tick), pauses.watch_loop())

    return asyncio.create_task(run())


def canary_arms(
    settings: Settings,
    stable: ModelPool,
    stable_version: str,
    width: int = 16,
    headers: dict[str, str] | None = None,
    breakers: Breakers | None = None,
    upstream: Upstream | None = None,
) -> Arms | None:
    """The canary's two arms over `stable` and a pool per rollout, with the rollout state in
    Redis (CTR_CANARY_REDIS_URL, else a plain CTR_REDIS_URL), the served answers' records for
    /feedback in the same Redis, and ended rollouts remembered in CTR_DATA_DIR; None without a Redis."""
    url = settings.canary_redis_url or (settings.redis_url if settings.redis_url.startswith("redis://") else "")
    if not url:
        return None
    store = RedisStore(canary_redis(url))
    urls = tuple(u for u in settings.canary_urls.split(",") if u)
    controller = Controller(store, GateConfig(alpha=settings.canary_alpha))
    baseline = tuple(u for u in settings.canary_baseline_urls.split(",") if u)
    runtime = CanaryRuntime(
        store, controller, sync_s=settings.canary_sync_s, canary_urls=urls, baseline_urls=baseline,
        stale_s=settings.canary_stale_s, tombstones=Tombstones(settings.data_dir / TOMBSTONES),
        served=ServedLog(canary_redis(url, timeout_s=1.0), settings.feedback_max_age_s),
        hosts=HostPolicy.from_settings(settings),
    )  # fmt: skip

    def make_pool(urls: tuple[str, ...]) -> ModelPool:
        return model_pool(
            settings,
            width=width,
            name="canary",
            urls=",".join(urls),
            headers=headers,
            breakers=breakers,
            upstream=upstream,
        )

    return Arms(runtime, stable, stable_version, make_pool)


def canary_redis(url: str, timeout_s: float = 0.2, max_connections: int = 32) -> Any:
    """A client of the canary's Redis: the rollout's sync loop takes short timeouts (it retries
    each second); /feedback and the served records a longer one (a busy event loop delays a
    connect). The pool is bounded: a flood of /feedback queues for a connection instead of
    opening thousands that then time out."""
    import redis.asyncio as aioredis

    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout_s * 5, socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )  # fmt: skip
    return aioredis.Redis(connection_pool=pool)


def feedback_desk(settings: Settings, arms: Arms | None) -> FeedbackDesk:
    """/feedback's checks: with the canary's Redis, against what each answer served (ServedLog)."""
    runtime = None if arms is None else arms.runtime
    served = None if runtime is None else runtime.served
    return FeedbackDesk(runtime, served, settings.feedback_max_age_s)


def shadow_tap(settings: Settings, arms: Arms | None, id_key: bytes) -> Shadow | None:
    """The rollout's shadow phase in this process (ctr/serving/canary/shadow.py), in the canary's
    Redis; its paired gate is the controller's evidence in a shadow phase. None without a canary.
    The sample is drawn from the request id keyed by the request-id key, which every gateway
    process (and replica) shares: the process that takes an id's feedback draws what the one
    that served it drew."""
    store = None if arms is None else arms.runtime.store
    if arms is None or not isinstance(store, RedisStore):
        return None
    cfg = PairedConfig(settings.canary_alpha, settings.canary_shadow_margin, settings.canary_shadow_min_pairs)
    tap = Shadow(arms, RedisShadowStore(store.r, store.prefix), settings.canary_shadow_sample,
                 settings.canary_shadow_max_inflight, settings.deadline_ms / 1000.0 * 4, settings.canary_shadow_ttl_s,
                 cfg, keyed_draw(id_key))  # fmt: skip
    arms.runtime.controller.paired = tap.gate
    return tap


def model_info(art: ModelArtifacts) -> dict[str, Any]:
    """What /model_info answers: the served model's tag, test metrics, feature versions and
    data fingerprint."""
    md = art.metadata
    keys = ("metrics", "feature_versions", "data_fingerprint", "data_config")
    return {"model_version": art.tag, **{k: md.get(k) for k in keys}}
