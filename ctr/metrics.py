"""The project's Prometheus metrics (all named ctr_*).

Created through prometheus_client; under `bentoml serve` BentoML sets up multiprocess
collection before the service imports this module, so these appear on its /metrics; there
each process writes its updates to its file every 0.1 s (ctr/buffered_metrics.py).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from ctr import buffered_metrics

buffered_metrics.install()  # before any metric is made: under `bentoml serve`, updates reach the files in batches

# Sub-millisecond resolution: the request budget is ~7 ms and most stages take < 1 ms.
_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01,
    0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip

REQUESTS = Counter("ctr_requests", "Predict requests by outcome.", ["outcome"])
REQUEST_LATENCY = Histogram(
    "ctr_request_latency_seconds", "Predict latency by outcome, in the gateway.", ["outcome"], buckets=_BUCKETS_S
)
STAGE_LATENCY = Histogram(
    "ctr_stage_latency_seconds",
    "Latency of each stage of a predict request (features, transform, inference, request).",
    ["stage"],
    buckets=_BUCKETS_S,
)
CACHE_LOOKUPS = Counter("ctr_cache_lookups", "Feature cache lookups by tier and result.", ["tier", "result"])
DEGRADED = Counter("ctr_degraded", "Substitutions made to keep answering, by reason.", ["reason"])
FALLBACKS = Counter("ctr_fallbacks", "Requests answered by the fallback path, by reason.", ["reason"])
BATCH_ROWS = Histogram(
    "ctr_model_batch_rows",
    "Rows per coalesced call from the gateway to CTRModel.",
    buckets=(1, 10, 50, 100, 200, 500, 1000, 2000, 4000, 8000, 16000),
)
BATCH_REQUESTS = Histogram(
    "ctr_model_batch_requests",
    "Requests per coalesced call from the gateway to CTRModel.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
BREAKER_STATE = Gauge("ctr_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.", ["name"])
BREAKER_TRANSITIONS = Counter(
    "ctr_breaker_transitions", "Circuit breaker transitions, by target state.", ["name", "to"]
)
CACHE_ERRORS = Counter("ctr_cache_errors", "Feature tier errors (the tier was skipped), by tier.", ["tier"])
CACHE_LATENCY = Histogram(
    "ctr_cache_latency_seconds", "Latency of one batched read of a feature tier.", ["tier"], buckets=_BUCKETS_S
)
CACHE_HIT_RATE = Gauge(
    "ctr_cache_hit_rate", "Share of lookups answered by this tier or above, since start.", ["tier"],
    multiprocess_mode="livemax",
)  # fmt: skip
FEATURE_WRITES = Counter("ctr_feature_writes", "Feature rows written, by group and mode.", ["group", "mode"])
L1_SYNCED = Gauge(
    "ctr_l1_synced", "1 while this process hears every feature write (its L1 is coherent), else 0.",
    multiprocess_mode="livemin",
)  # fmt: skip
L1_FLUSHES = Counter("ctr_l1_flushes", "L1 flushes because feature writes elsewhere may have been missed.")
CACHE_REPAIRS = Counter(
    "ctr_cache_repairs",
    "Write announcements (L2 and every L1) that failed (queued) and were made later (done).",
    ["outcome"],
)
RETRIES = Counter("ctr_retries", "Retries of idempotent calls, by dependency.", ["dependency"])
RETRY_BUDGET_EXHAUSTED = Counter(
    "ctr_retry_budget_exhausted", "Retries refused because the retry budget was spent, by dependency.", ["dependency"]
)
FEEDBACK = Counter("ctr_feedback", "Feedback on shown ads (online CTR = click / impression), by arm.", ["arm", "event"])
FEEDBACK_REFUSED = Counter(
    "ctr_feedback_refused", "Feedback refused, by reason (forged, too_old, other_rollout, not_served, duplicate, ...).",
    ["reason"],
)  # fmt: skip
FEEDBACK_RECORDS_DROPPED = Counter(
    "ctr_feedback_records_dropped", "Served-answer records dropped unwritten (Redis down, buffer full).",
)  # fmt: skip
CONCURRENCY_LIMIT = Gauge(
    "ctr_concurrency_limit", "The gateway's adaptive concurrency limit (requests in flight before shedding).",
    multiprocess_mode="livemax",
)  # fmt: skip
WRITER_FAILURES = Counter(
    "ctr_writer_failures", "Write-behind writer failures (each followed by a restart), by kind.", ["kind"]
)
DEAD_LETTERS = Counter(
    "ctr_feature_writes_dead_lettered", "Write-behind stream entries that could not be committed, moved aside."
)

# The model pool (ctr/serving/pool). `replica` is the replica's slot in its pool (0..N-1, reused when
# a replica leaves), so the label set stays bounded however many pods come and go; the pool logs
# which address holds which slot.
REPLICA_REQUESTS = Counter("ctr_replica_requests", "Requests assigned to each model replica.", ["pool", "replica"])
REPLICA_CALLS = Counter(
    "ctr_replica_calls", "Coalesced calls to each model replica, by outcome (ok, error).",
    ["pool", "replica", "outcome"],
)  # fmt: skip
REPLICA_LATENCY = Histogram(
    "ctr_replica_latency_seconds", "Latency of one coalesced call to a model replica.", ["pool", "replica"],
    buckets=_BUCKETS_S,
)  # fmt: skip
REPLICA_HEALTH = Gauge(
    "ctr_replica_health", "Health of each model replica: 0 healthy, 1 ejected, 2 ejected and being probed back.",
    ["pool", "replica"], multiprocess_mode="livemax",
)  # fmt: skip
REPLICA_EJECTIONS = Counter(
    "ctr_replica_ejections",
    "Ejections of a model replica, by reason (errors, p99, outlier, probe).",
    ["pool", "replica", "reason"],
)
REPLICA_PROBE_FAILURES = Counter(
    "ctr_replica_probe_failures", "Active /readyz probes of a model replica that failed or timed out.",
    ["pool", "replica"],
)  # fmt: skip
HEDGES = Counter("ctr_pool_hedges", "Coalesced calls hedged to a second replica (CTR_HEDGE).", ["pool"])
POOL_SIZE = Gauge("ctr_pool_replicas", "Model replicas known to each pool.", ["pool"], multiprocess_mode="livemax")

# Service level indicators and objectives (ctr/observe/sli.py): per request, one counter and
# one histogram per arm; the windows and burn rates are gauges set once a second.
SLI_REQUESTS = Counter("ctr_sli_requests", "Predict requests by arm and result (model, fallback, error).",
                       ["arm", "result"])  # fmt: skip
SLI_LATENCY = Histogram("ctr_sli_latency_seconds", "Gateway latency of predict requests, by arm.", ["arm"],
                        buckets=_BUCKETS_S)  # fmt: skip
SLI_QPS = Gauge("ctr_sli_qps", "Requests per second over the window, by arm.", ["arm", "window"],
                multiprocess_mode="livesum")  # fmt: skip
SLI_AVAILABILITY = Gauge("ctr_sli_availability", "Successful answers / requests over the window, by arm.",
                         ["arm", "window"], multiprocess_mode="livemin")  # fmt: skip
SLI_MODEL_SCORED = Gauge("ctr_sli_model_scored_share", "Model-scored answers / requests over the window, by arm.",
                         ["arm", "window"], multiprocess_mode="livemin")  # fmt: skip
SLI_P99 = Gauge("ctr_sli_latency_p99_seconds", "p99 gateway latency over the window, by arm.", ["arm", "window"],
                multiprocess_mode="livemax")  # fmt: skip
SLO_TARGET = Gauge("ctr_slo_target", "The objective of each SLO.", ["slo"], multiprocess_mode="livemax")
SLO_BURN_RATE = Gauge("ctr_slo_burn_rate", "Error-budget burn rate by SLO, arm and window (5m, 1h).",
                      ["slo", "arm", "window"], multiprocess_mode="livemax")  # fmt: skip
SLO_PAGE = Gauge("ctr_slo_page", "1 when both the 5m and the 1h burn rate exceed CTR_SLO_BURN_PAGE.", ["slo", "arm"],
                 multiprocess_mode="livemax")  # fmt: skip
EVENT_LOOP_LAG = Histogram(
    "ctr_event_loop_lag_seconds",
    "How late a gateway process's event loop ran a timer (a blocked loop delays every queued request).",
    buckets=_BUCKETS_S,
)
EVENT_LOOP_CPU_WAIT = Histogram(
    "ctr_event_loop_cpu_wait_seconds",
    "Time a gateway process's event-loop thread was ready to run but waited for a CPU, per 50 ms "
    "tick (the kernel's run-queue wait: other processes on the same cores; Linux only).",
    buckets=_BUCKETS_S,
)
GC_PAUSE = Histogram(
    "ctr_gc_pause_seconds",
    "Duration of each garbage collection in a gateway process, by generation.",
    ["generation"],
    buckets=_BUCKETS_S,
)
