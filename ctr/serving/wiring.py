"""Builds the gateway's request path from the settings and a stored model."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from ctr.features.stack import FeatureStack
from ctr.features.transform import Transformer
from ctr.model.store import ModelArtifacts
from ctr.observe import log as obslog
from ctr.observe import pauses, sli
from ctr.resilience.breaker import CircuitBreaker
from ctr.resilience.deadline import REMOTE_ERRORS, guarded
from ctr.resilience.limit import AimdLimit
from ctr.resilience.retry import Retrier, RetryBudget
from ctr.serving import fleet
from ctr.serving.canary.arms import Arms
from ctr.serving.canary.controller import Controller
from ctr.serving.canary.feedback import FeedbackDesk
from ctr.serving.canary.hosts import HostPolicy
from ctr.serving.canary.runtime import CanaryRuntime
from ctr.serving.canary.served import ServedLog
from ctr.serving.canary.state import RedisStore
from ctr.serving.canary.stats import GateConfig
from ctr.serving.canary.tombstones import SUBDIR as TOMBSTONES
from ctr.serving.canary.tombstones import Tombstones
from ctr.serving.coalesce import ModelCall
from ctr.serving.fallback import Fallback, RemoteFallback
from ctr.serving.features import FeatureProvider, local_features, remote_features
from ctr.serving.gateway import Gateway, IdIssuer, Model
from ctr.serving.model_client import InvalidAnswer
from ctr.serving.overload import Admission
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
from ctr.serving.status import Sources, StatusBoard
from ctr.settings import Settings

log = logging.getLogger(__name__)
IN_GRAPH = "in-graph"
LOCAL = "local"


def runs_local(settings: Settings) -> bool:
    """Whether the gateway runs the model itself (CTR_MODEL_REPLICA; auto: on a CPU) rather than
    calling the CTRModel service; CTR_MODEL_URLS, when set, wins over both."""
    if settings.model_urls or settings.model_replica == "in-graph":
        return False
    return settings.model_replica == "local" or settings.device == "cpu" or not _gpu_visible()


def _gpu_visible() -> bool:
    """Whether an NVIDIA device node exists. Every process of `bentoml serve` imports
    service.py, so torch is not asked (its import costs each process ~180 MB): with a device
    node the model goes in-graph, and CTRModel finds out whether the GPU works."""
    return any(Path("/dev").glob("nvidia[0-9]*"))


def gateway_workers(settings: Settings) -> int:
    """CTR_GATEWAY_WORKERS, or for 0: a process per core when each runs the model itself (it does
    all of a request's work), else half the cores (CTRModel's processes need the rest)."""
    if settings.gateway_workers:
        return settings.gateway_workers
    cores = usable_cores()
    return cores if runs_local(settings) else max(1, cores // 2)


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a
    container's or pod's CPU limit), at least 1; os.cpu_count() is the host's."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # no cgroup v2 file, or an unexpected one: no quota known
        pass
    return max(1, cores)


def local_runner(settings: Settings, art: ModelArtifacts) -> Callable[[np.ndarray], np.ndarray]:
    """The forward pass for a local replica (when `runs_local`)."""
    from ctr.model.runner import ModelRunner

    return ModelRunner(art, settings.device, settings.torch_threads, settings.model_precision)


def model_pool(settings: Settings, in_graph: ModelCall | None = None, width: int = 16, name: str = "model",
               urls: str | None = None, headers: dict[str, str] | None = None,
               local: Callable[[np.ndarray], np.ndarray] | None = None) -> ModelPool:  # fmt: skip
    """The pool of model replicas: CTR_MODEL_URLS (or `urls`, e.g. a canary arm's), or, when
    empty, the model in this process (`local`, a runner) or else the in-graph CTRModel reached
    through `in_graph`, as the pool's one replica."""
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
        window_s=settings.batch_window_ms / 1000.0, hedge=settings.hedge,
    )  # fmt: skip
    # An invalid answer is a failure of that replica: retried on another one like an error.
    retrier = Retrier(
        name, (*REMOTE_ERRORS, InvalidAnswer), RetryBudget(name, settings.retry_budget_ratio), settings.retry_attempts
    )
    return ModelPool(name, source, factory, config, retrier, lambda n: CircuitBreaker.from_settings(settings, n))


def gateway(
    settings: Settings,
    art: ModelArtifacts,
    model: Model,
    stack: FeatureStack,
    features_call: Callable[..., Awaitable[Any]] | None = None,
    fallback_call: RemoteFallback | None = None,
    arms: Arms | None = None,
    new_id: IdIssuer | None = None,
) -> Gateway:
    """The gateway core. Features come from this process, or from FeatureService through
    `features_call` with CTR_FEATURES_REMOTE; fallback scores from the in-process table, or
    from FallbackService through `fallback_call` with CTR_FALLBACK_REMOTE. Every remote call
    is guarded by its breaker and a timeout; `model` (the pool, `model_pool`) does the same per
    replica, with the deadline as the timeout."""
    transformer = Transformer(art.spec, settings.encoded_rows)
    provider: FeatureProvider = local_features(stack.lookup, transformer)
    if settings.features_remote and features_call is not None:
        provider = remote_features(features_call, CircuitBreaker.from_settings(settings, "features"), transformer)
    remote_fallback = None
    if settings.fallback_remote and fallback_call is not None:
        remote_fallback = guarded(
            fallback_call, CircuitBreaker.from_settings(settings, "fallback"), settings.fallback_timeout_ms / 1000.0
        )
    deadline_s = settings.deadline_ms / 1000.0
    return Gateway(provider, model, Fallback(art.segments, remote_fallback), art.tag, deadline_s, arms, new_id)


async def warm_pool(pool: ModelPool, width: int, deadline_s: float, round_s: float = 180.0) -> None:
    """Warm every replica of the pool at once, in rounds of `round_s`, until at least one
    answered in time (`warm_model` logs why each failed round did not): /readyz waits for
    this, and a replica that never answers does not keep the gateway from serving."""
    while True:
        if not pool.members:  # nothing discovered yet
            await asyncio.sleep(1.0)
            continue
        done = await asyncio.gather(*(warm_model(m.replica.infer, width, deadline_s, round_s) for m in pool.members))
        if any(done):
            return


def admission(settings: Settings, gw: Gateway) -> Admission:
    """The edge of /predict: the adaptive concurrency limit (CTR_LIMIT) and what a shed request gets."""
    limiter = AimdLimit.from_settings(settings) if settings.limit == "aimd" else None
    return Admission(gw, limiter, settings.overload)


def observability(settings: Settings) -> None:
    """Logs in CTR_LOG_FORMAT at CTR_LOG_LEVEL; the process's SLO objectives and fallback bursts."""
    obslog.configure(settings.log_format, settings.log_level)
    sli.RECORDER.configure(
        sli.Objectives(
            settings.slo_availability, settings.slo_model_scored, settings.slo_p99_ms, settings.slo_burn_page
        )
    )
    sli.RECORDER.enabled = settings.sli
    obslog.BURSTS.gap_s = settings.fallback_burst_gap_s


def status_board(gw: Gateway, stack: FeatureStack | None, workers: int = 1) -> StatusBoard:
    """The status page's panels over this process's gateway, feature store and write-behind stream."""
    store = None if stack is None else stack.store
    stream = None if stack is None else stack.writer.redis
    return StatusBoard(Sources(gw.sli, gw, store, stream, workers, fleet_dir=fleet.directory()))


def start_ticker(board: StatusBoard) -> asyncio.Task[None]:
    """Once a second: the SLI gauges, the cache-rate samples, the end of fallback bursts; and
    the event loop's lag, twenty times a second (ctr.observe.pauses)."""
    gw = board.sources.gateway
    bursts = getattr(gw, "bursts", obslog.BURSTS)
    pauses.watch_gc()  # the gateway's own collections (the other services' would blur them)

    async def run() -> None:
        await asyncio.gather(sli.run_ticker(board.sources.recorder, board.tick, bursts.tick), pauses.watch_loop())

    return asyncio.create_task(run())


def canary_arms(
    settings: Settings, stable: ModelPool, stable_version: str, width: int = 16, headers: dict[str, str] | None = None
) -> Arms | None:
    """The canary's two arms over `stable` and a pool per rollout, with the rollout state in
    Redis (CTR_CANARY_REDIS_URL, else a plain CTR_REDIS_URL), the served answers' records for
    /feedback in the same Redis, and ended rollouts remembered in CTR_DATA_DIR; None without a Redis."""
    url = settings.canary_redis_url or (settings.redis_url if settings.redis_url.startswith("redis://") else "")
    if not url:
        return None
    client = canary_redis(url)
    store = RedisStore(client)
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
        return model_pool(settings, width=width, name="canary", urls=",".join(urls), headers=headers)

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


async def warm_model(
    call: ModelCall,
    width: int,
    deadline_s: float,
    timeout_s: float = 180.0,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> bool:
    """Call the model until it answers 20 bursts in a row within the deadline: True; False
    (and a log line saying why) when `timeout_s` passes first.

    Right after start-up CTRModel is slow (torch's first passes, BentoML's batcher training
    its latency model on the first requests): measured, without this the first seconds of
    traffic timed out, opened the model breaker and were answered by the fallback.
    The gateway's /readyz stays 503 until this returned True for a replica (see `warm_pool`).
    """
    x = np.zeros((100, width), dtype=np.int64)
    start = clock()
    end, streak, calls, why = start + timeout_s, 0, 0, "no answer yet"
    while streak < 20 and clock() < end:
        t0 = clock()
        try:
            async with asyncio.timeout(2.0):
                answers = await asyncio.gather(*(call(x) for _ in range(4)))
            took = clock() - t0
            if any(len(y) != len(x) or not np.isfinite(y).all() for y in answers):
                streak, why = 0, "the model answered without one finite score per row"
            elif took < deadline_s:
                streak += 1
            else:
                streak, why = 0, f"a burst took {took * 1000:.1f} ms, over the {deadline_s * 1000:.1f} ms deadline"
        # AttributeError: BentoML's client not set up yet; ValueError: a malformed answer body
        except (*REMOTE_ERRORS, AttributeError, ValueError) as exc:
            streak, why = 0, f"the model call failed: {type(exc).__name__}: {exc}"
            await sleep(0.2)
        calls += 4
    if streak >= 20:
        log.info("model warm after %d calls in %.1f s", calls, clock() - start)
        return True
    log.warning("model not ready after %.0f s and %d calls (stays not ready): %s", timeout_s, calls, why)
    return False


def model_info(art: ModelArtifacts) -> dict[str, Any]:
    """What /model_info answers: the served model's tag, test metrics, feature versions and
    data fingerprint."""
    md = art.metadata
    keys = ("metrics", "feature_versions", "data_fingerprint", "data_config")
    return {"model_version": art.tag, **{k: md.get(k) for k in keys}}


def settle_gc() -> None:
    """Move start-up objects out of the collector's sight; collect young objects often and the
    old generation rarely.

    The L1 cache and the model hold ~10^5 long-lived objects; full collections over them
    stalled requests for tens of ms (measured: p99 at 16 concurrent requests 230 ms before
    the freeze, 53 ms after). The young generation is left at Python's 700: a threshold of
    50,000 made each young collection scan tens of thousands of objects, 22-33 ms once or
    twice a 40 s run at half load (ctr_gc_pause_seconds, `ctr bench steady`), enough to push
    requests past the 50 ms deadline; at 700 they took 0.7 ms (the middle generation 2.1 ms).
    The young and middle generations are also bounded by size each loop tick
    (ctr.observe.pauses.bound_young): cache turnover can fill them with no collection
    starting. The forced middle collections count towards a full one too (about 15 a minute
    per process at half load against 5 without), so a full collection comes after 3,000
    middle ones rather than CPython's 1,000: about every 3 hours under that load, as before.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(700, 10, 3000)
