"""All settings, read from CTR_* environment variables (pydantic-settings), in sections.

docs/settings.md is generated from this module: `python -m ctr.settings --write` rewrites
it, and tests/test_settings_doc.py fails when it differs from what this code says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MIN_REQUEST_ID_KEY_BYTES = 32  # as long as HMAC-SHA256's output (RFC 2104: shorter keys weaken the tag)


def short_key_message(n_bytes: int) -> str:
    return (f"CTR_REQUEST_ID_KEY is {n_bytes} bytes; it must be at least {MIN_REQUEST_ID_KEY_BYTES} "
            "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)")  # fmt: skip


def redact_url(url: str) -> str:
    """`url` with its password replaced by *** (user, host, port, path kept): the only form a
    database or Redis URL may take in output or logs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # unparseable (e.g. a bad port): hide everything between scheme and host
        head, sep, tail = url.rpartition("@")
        return f"{head.split('://', 1)[0]}://***@{tail}" if sep else url
    if not password:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


# The sections of Settings, in the order the class declares its fields (a test keeps the two
# in step): the headings of docs/settings.md and the `# ---` comments in the class.
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ('The request and the edge', (
        'max_ads', 'deadline_ms', 'max_body_bytes', 'admin_token', 'request_id_key', 'internal_token',
        'predict_fast_path',
    )),
    ('The gateway: workers, batching, overload', (
        'gateway_workers', 'batch_window', 'batch_window_ms', 'batch_max_rows', 'batch_max_inflight', 'overload',
        'limit', 'limit_initial', 'limit_min', 'limit_max', 'limit_latency_ms',
    )),
    ('The model', (
        'model_tag', 'model_replica', 'local_forward', 'device', 'model_precision', 'model_engine', 'torch_threads',
        'model_workers', 'model_hop', 'model_max_batch_rows', 'model_max_latency_ms', 'warm_model_round_s',
        'model_delay_ms', 'model_score_scale',
    )),
    ('The model pool (ctr/serving/pool) and services run alone (ctr serve)', (
        'model_urls', 'lb_policy', 'model_weights', 'hash_load_factor', 'replica_p99_ms', 'replica_min_success',
        'outlier_factor', 'outlier_min_ms', 'health_window_s', 'health_min_calls', 'max_ejected_percent',
        'ejection_base_s', 'ejection_max_s', 'probe_interval_s', 'probe_timeout_ms', 'probe_passes',
        'probe_failures', 'hedge', 'dns_refresh_s', 'features_url', 'fallback_url',
    )),
    ('Breakers and retries', (
        'breaker_failure_ratio', 'breaker_window_s', 'breaker_min_calls', 'breaker_cooldown_s', 'retry_attempts',
        'retry_budget_ratio',
    )),
    ('Features: the tiered store (L1 in process, L2 Redis, L3 SQL)', (
        'data_dir', 'database_url', 'redis_url', 'stream_redis_url', 'l1_sync_ping_s', 'l1_sync_stale_s',
        'l2_probation_s', 'l1_unsynced_ttl_s', 'l2_timeout_ms', 'l3_timeout_ms', 'l1_max_entries',
        'l1_max_bytes', 'encoded_rows', 'negative_ttl_s', 'ttl_s', 'feature_versions', 'write_modes', 'warm',
        'warm_top_users', 'features_remote', 'features_workers',
    )),
    ('Fallback', (
        'fallback_remote', 'fallback_timeout_ms', 'fallback_workers', 'fallback_burst_gap_s',
    )),
    ('Canary releases (ctr/serving/canary)', (
        'canary_redis_url', 'canary_urls', 'canary_baseline_urls', 'canary_sync_s', 'canary_alpha',
        'canary_shadow_sample', 'canary_shadow_max_inflight', 'canary_shadow_ttl_s', 'canary_shadow_margin',
        'canary_shadow_min_pairs',
        'canary_stale_s', 'canary_allowed_hosts', 'feedback_max_age_s',
    )),
    ('Observability: logs, tracing, SLIs and objectives', (
        'log_format', 'log_level', 'tracing', 'sli', 'slo_availability', 'slo_model_scored', 'slo_p99_ms',
        'slo_burn_page',
    )),
)  # fmt: skip


class Settings(BaseSettings):
    """Defaults run on one machine with nothing else installed."""

    model_config = SettingsConfigDict(env_prefix="CTR_", frozen=True)

    # --- The request and the edge
    max_ads: int = Field(1000, ge=1, description="Most candidate ads accepted in one /predict request.")
    deadline_ms: float = Field(50.0, gt=0, description="Budget of one /predict request; past it the fallback answers.")
    max_body_bytes: int = Field(
        1_048_576, ge=1, description="Largest request body of /predict, /feedback and /admin/*; larger is a 413."
    )
    admin_token: str = Field("", repr=False, description="Bearer token of the admin endpoints; empty disables them.")
    request_id_key: str = Field(
        "",
        repr=False,
        description="Key signing the request ids /feedback accepts, at least 32 bytes; default: derived from "
        "admin_token, else a random key kept in <data_dir>/request-id.key (shared by the processes of one machine).",
    )
    internal_token: str = Field(
        "",
        repr=False,
        description="Shared token internal services (CTRModel, FeatureService, FallbackService) require in "
        "X-CTR-Internal-Token; unset, `bentoml serve` draws a random one for its process tree.",
    )
    predict_fast_path: bool = Field(
        True,
        description="POST /predict goes from uvicorn straight to the gateway's route, past BentoML's per-request "
        "middlewares (traffic metrics, tracing, timeout, context; ctr/api/bentoml_compat.py); every other route "
        "keeps them. Off (or with CTR_TRACING on) /predict takes BentoML's whole stack.",
    )

    # --- The gateway: workers, batching, overload
    gateway_workers: int = Field(
        0,
        ge=0,
        description="CTRGateway processes (each with its own L1, coalescer, breakers and, when local, model); "
        "0 = one per core when the model runs in the gateway (CTR_MODEL_REPLICA=local), else half the cores.",
    )
    batch_window: Literal["fixed", "deadline"] = Field(
        "fixed",
        description="How a free model slot waits for company: fixed (CTR_BATCH_WINDOW_MS), or deadline (while "
        "requests are on their way, as long as the earliest waiting deadline minus the measured call cost allows, "
        "at most one call's cost; a lone request goes at once).",
    )
    batch_window_ms: float = Field(
        0.0,
        ge=0,
        description="With CTR_BATCH_WINDOW=fixed: how long the gateway waits for company before a model call.",
    )
    batch_max_rows: int = Field(8192, ge=1, description="Most rows in one coalesced call to CTRModel.")
    batch_max_inflight: int = Field(2, ge=1, description="Most concurrent model calls from one gateway process.")
    overload: Literal["fallback", "reject"] = Field(
        "fallback",
        description="A request above the concurrency limit: answered at once from the segment table (200, "
        "fallback, degraded overload:shed), or 503 with Retry-After (reject).",
    )
    limit: Literal["aimd", "off"] = Field(
        "aimd", description="The gateway's concurrency limit on /predict: adaptive (AIMD), or off (unbounded)."
    )
    limit_initial: int = Field(32, ge=1, description="The adaptive limit's start (requests in flight).")
    limit_min: int = Field(
        4,
        ge=1,
        description="The adaptive limit never falls below this, nor below what the gateway completes within "
        "the latency target at its measured rate (completions a second x the target).",
    )
    limit_max: int = Field(512, ge=1, description="The adaptive limit never rises above this.")
    limit_latency_ms: float = Field(
        25.0, gt=0, description="A request slower than this (or past its deadline) cuts the limit by 10 %."
    )

    # --- The model
    model_tag: str = Field("ctr_model:latest", description="BentoML model served by CTRModel and read by the gateway.")
    model_replica: Literal["auto", "local", "in-graph"] = Field(
        "auto",
        description="With CTR_MODEL_URLS empty, where the model runs: local = in each gateway process "
        "(CTR_LOCAL_FORWARD), in-graph = the CTRModel service over HTTP; auto = local on a CPU, in-graph with a GPU.",
    )
    local_forward: Literal["loop", "thread"] = Field(
        "loop",
        description="CTR_MODEL_REPLICA=local: run each forward pass on the event loop, or in a worker thread "
        "(measured slower here: the two threads contend for the GIL).",
    )
    device: str = Field(
        "auto", description="The model's torch device (CTRModel or local): auto (GPU when present), cpu, cuda, cuda:N."
    )
    model_precision: Literal["auto", "float32", "int8", "float16", "bfloat16"] = Field(
        "auto",
        description="The model's numeric precision: int8 = dynamic quantization (CPU), float16/bfloat16 for a GPU; "
        "auto = float32, the fastest measured here (`ctr bench precision`).",
    )
    model_engine: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto",
        description="What runs the forward pass: onnxruntime (the network exported when the model was saved) or "
        "torch; auto = onnxruntime on the CPU at float32 when the model has its export, torch otherwise "
        "(ctr/model/engine.py; `ctr bench stages` with each).",
    )
    torch_threads: int = Field(
        1,
        ge=1,
        description="Threads of a forward pass: torch's intra-op threads, or ONNX Runtime's (1 is fastest on 2 cores).",
    )
    model_workers: int = Field(1, ge=1, description="CTRModel processes (each loads the model; one per device).")
    model_hop: Literal["binary", "bentoml"] = Field(
        "binary", description="Gateway -> CTRModel: raw bytes on /infer (lean), or BentoML's client and batcher."
    )
    model_max_batch_rows: int = Field(
        65536, ge=1, description="CTRModel's max_batch_size (rows); keep above batch_max_rows so calls never split."
    )
    model_max_latency_ms: int = Field(
        60_000, ge=1, description="CTRModel's BentoML cut-off; far above the deadline so nothing is shed."
    )
    warm_model_round_s: float = Field(
        180.0, gt=0, description="/readyz waits for the model to answer in time; each round this long logs why not."
    )
    model_delay_ms: float = Field(
        0.0, ge=0, description="Fault injection: CTRModel's /infer waits this long before answering (tests, benches)."
    )
    model_score_scale: float = Field(
        1.0,
        gt=0,
        description="Fault injection: CTRModel's /infer multiplies its scores by this (a miscalibrated replica on "
        "purpose, for tests and demos of the canary's gates).",
    )

    # --- The model pool (ctr/serving/pool) and services run alone (ctr serve)
    model_urls: str = Field(
        "",
        description="CTRModel replicas, comma-separated http://host:port; a host name is re-resolved every "
        "CTR_DNS_REFRESH_S to all its addresses (a headless Service). Empty: see CTR_MODEL_REPLICA.",
    )
    lb_policy: Literal["round_robin", "least_conn", "weighted", "consistent_hash", "peak_ewma"] = Field(
        "peak_ewma", description="How the gateway picks a model replica for a request."
    )
    model_weights: list[float] = Field(
        default_factory=list,
        description="JSON list, one weight per CTR_MODEL_URLS entry (weighted policy; missing ones are 1).",
    )
    hash_load_factor: float = Field(
        1.25, gt=1, description="consistent_hash: no replica takes more than this times the mean outstanding load."
    )
    replica_p99_ms: float = Field(
        40.0, gt=0, description="A replica is healthy while the p99 of its calls over the health window is under this."
    )
    replica_min_success: float = Field(
        0.8, gt=0, lt=1, description="A replica is healthy while its success rate over the health window is above this."
    )
    outlier_factor: float = Field(
        3.0, gt=1, description="A replica whose p99 exceeds this times the median p99 of the others is ejected."
    )
    outlier_min_ms: float = Field(
        5.0, ge=0, description="...and exceeds that median by at least this much (sub-ms jitter is not an outlier)."
    )
    health_window_s: float = Field(5.0, gt=0, description="Sliding window of the passive health checks.")
    health_min_calls: int = Field(20, ge=1, description="Calls a replica needs in the window before it is judged.")
    max_ejected_percent: float = Field(
        50.0, ge=0, le=100, description="Most of the pool ejected at once (at least one; never the last healthy one)."
    )
    ejection_base_s: float = Field(5.0, gt=0, description="First ejection time; the n-th ejection lasts n times it.")
    ejection_max_s: float = Field(60.0, gt=0, description="Cap of the ejection time.")
    probe_interval_s: float = Field(1.0, gt=0, description="Interval of the active /readyz probes of each replica.")
    probe_timeout_ms: float = Field(500.0, gt=0, description="Budget of one /readyz probe.")
    probe_passes: int = Field(2, ge=1, description="Passing probes in a row an ejected replica needs to come back.")
    probe_failures: int = Field(3, ge=1, description="Failing probes in a row that eject a healthy replica.")
    hedge: bool = Field(
        False,
        description="Send a coalesced call to a second replica too when the first has not answered by its recent "
        "p95 (within the retry budget); the first answer wins.",
    )
    dns_refresh_s: float = Field(5.0, gt=0, description="How often host names in CTR_MODEL_URLS are re-resolved.")
    features_url: str = Field(
        "http://127.0.0.1:3001", description="FeatureService's URL for a gateway run alone (ctr serve)."
    )
    fallback_url: str = Field(
        "http://127.0.0.1:3002", description="FallbackService's URL for a gateway run alone (ctr serve)."
    )

    # --- Breakers and retries
    breaker_failure_ratio: float = Field(0.5, gt=0, lt=1, description="Breakers open above this failure share (ε).")
    breaker_window_s: float = Field(10.0, gt=0, description="Breakers count failures over this window (T).")
    breaker_min_calls: int = Field(10, ge=1, description="Calls a breaker needs in its window before it may open.")
    breaker_cooldown_s: float = Field(5.0, ge=0, description="How long a breaker stays open before a trial call.")
    retry_attempts: int = Field(3, ge=1, description="Tries of an idempotent model call (1 = no retries).")
    retry_budget_ratio: float = Field(0.1, ge=0, le=1, description="Retries allowed per call, on average.")

    # --- Features: the tiered store (L1 in process, L2 Redis, L3 SQL)
    data_dir: Path = Field(PROJECT_ROOT / "data", description="Generated click log and the SQLite feature database.")
    database_url: str = Field(
        "",
        repr=False,
        description="L3 feature database: sqlite:///path or postgresql://…; default sqlite:///<data_dir>/features.db.",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        repr=False,
        description="L2 cache: redis://… or redis+cluster://host:port (any node); empty disables L2.",
    )
    stream_redis_url: str = Field(
        "",
        repr=False,
        description="The write-behind stream's Redis (it must not evict keys); default: CTR_REDIS_URL when a plain "
        "redis://. Write-behind refuses a Redis whose maxmemory-policy is allkeys-* and writes through instead.",
    )
    l1_sync_ping_s: float = Field(
        0.5, gt=0, description="Each process pings Redis on the feature-write channel this often when it is quiet."
    )
    l1_sync_stale_s: float = Field(
        1.5, gt=0, description="A process that heard nothing on the feature-write channel this long flushes its L1."
    )
    l2_probation_s: float = Field(
        5.0,
        ge=0,
        description="After a process lost the feature-write channel it reads L3, not L2, this long (a Redis "
        "restarted from its AOF holds entries older than the writes made while it was down).",
    )
    l1_unsynced_ttl_s: float = Field(
        1.0, ge=0, description="L1 entries live at most this long while a process may miss other processes' writes."
    )
    l2_timeout_ms: float = Field(20.0, gt=0, description="Budget of one L2 read; past it L2 counts as failed.")
    l3_timeout_ms: float = Field(25.0, gt=0, description="Budget of one L3 read; past it the group gets defaults.")
    l1_max_entries: int = Field(500_000, ge=1, description="Bound of the in-process L1 feature cache (entries).")
    l1_max_bytes: int | None = Field(
        None, ge=1, description="Approximate memory bound of L1 (bytes, ~460 an entry); lowers l1_max_entries."
    )
    encoded_rows: int = Field(
        100_000,
        ge=0,
        description="Pre-encoded feature rows remembered per process, per kind (users, ads; ~250 B each); 0 = off.",
    )
    negative_ttl_s: float = Field(60.0, ge=0, description="How long an unknown user or ad is remembered as unknown.")
    ttl_s: dict[str, float] = Field(
        default_factory=dict, description='TTL overrides per feature group, JSON, e.g. {"ad_stats": 600}.'
    )
    feature_versions: dict[str, int] = Field(
        default_factory=dict, description="Version overrides per feature group, JSON; a bump invalidates its keys."
    )
    write_modes: dict[str, Literal["through", "behind"]] = Field(
        default_factory=lambda: {"user_static": "through", "ad_meta": "through",
                                 "user_behavioral": "behind", "ad_stats": "behind"},
        description="Write mode per feature group, JSON (behind needs L2 Redis; without it writes go through).",
    )  # fmt: skip
    warm: bool = Field(True, description="Warm the caches from the warm set before /readyz turns ready.")
    warm_top_users: int = Field(10_000, ge=0, description="K: how many of the most active users to warm.")
    features_remote: bool = Field(
        False, description="Gateway fetches features from FeatureService over HTTP instead of in-process."
    )
    features_workers: int = Field(1, ge=1, description="FeatureService processes.")

    # --- Fallback
    fallback_remote: bool = Field(
        False,
        description="Fallback scores from FallbackService over HTTP (global CTR if it fails) instead of in-process.",
    )
    fallback_timeout_ms: float = Field(10.0, gt=0, description="Budget of one call to FallbackService.")
    fallback_workers: int = Field(1, ge=1, description="FallbackService processes.")
    fallback_burst_gap_s: float = Field(
        10.0, gt=0, description="A fallback burst ends after this long without a fallback (one log line each end)."
    )

    # --- Canary releases (ctr/serving/canary)
    canary_redis_url: str = Field(
        "",
        description="Redis holding the canary's rollout state and counters (redis://…); empty: CTR_REDIS_URL "
        "when it is a plain redis:// URL. No Redis: no canary (every request is stable).",
    )
    canary_urls: str = Field(
        "",
        description="Canary CTRModel replicas used when a rollout is started with a model tag and no URLs "
        "(comma-separated, e.g. http://ctr-model-canary:3000).",
    )
    canary_baseline_urls: str = Field(
        "",
        description="Baseline CTRModel replicas (the stable model, as many as the canary's): during a rollout "
        "they serve an equal share of stable users, and the latency gate compares the canary with them.",
    )
    canary_sync_s: float = Field(
        1.0, gt=0, description="How often a gateway syncs the rollout and flushes its counters."
    )
    canary_alpha: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Canary false rollbacks over a whole rollout, all 4 gates (alpha/4 each); each gate's "
        "non-inferiority is read at alpha (intersection-union).",
    )
    canary_shadow_sample: float = Field(
        0.01,
        ge=0,
        le=1,
        description="In a rollout's shadow phase, the share of stable requests the canary also scores, off the "
        "response path (docs/canary.md, Shadow phase).",
    )
    canary_shadow_max_inflight: int = Field(
        8, ge=1, description="Most shadow calls running at once per gateway process; more are dropped (counted)."
    )
    canary_shadow_ttl_s: float = Field(
        3600.0, gt=0, description="How long a shadow pair waits in Redis for its request's feedback."
    )
    canary_shadow_margin: float = Field(
        0.01,
        gt=0,
        description="The shadow phase's paired gate: the relative log-loss increase the canary may have on the "
        "same impressions (0.01: 1 %); harm at alpha/4, non-inferiority at alpha.",
    )
    canary_shadow_min_pairs: int = Field(2000, ge=2, description="Joined shadow pairs before the paired gate reads.")
    canary_stale_s: float = Field(
        30.0,
        gt=0,
        description="A gateway process that has not reached the canary's store for this long sends every user "
        "to stable (until the store answers again).",
    )
    canary_allowed_hosts: str = Field(
        "",
        description="Hosts a rollout's replica URLs may name (comma-separated; `*.ns.svc.cluster.local` patterns "
        "allowed); the gateway sends its internal token to no other. Always allowed: loopback and the hosts of "
        "CTR_MODEL_URLS, CTR_CANARY_URLS and CTR_CANARY_BASELINE_URLS.",
    )
    feedback_max_age_s: float = Field(
        900.0,
        gt=0,
        description="/feedback refuses a request id older than this (410); also how long Redis keeps what each "
        "answer served (for the ad check and the served score) and which (id, ad) pairs were counted.",
    )

    # --- Observability: logs, tracing, SLIs and objectives
    log_format: Literal["json", "text"] = Field(
        "text", description="Log lines as JSON objects (json) or key=value text (text), with request id, arm, etc."
    )
    log_level: str = Field("INFO", description="Level of the ctr loggers; DEBUG adds one line per request.")
    tracing: bool = Field(
        False,
        description="Run BentoML's OpenTelemetry middleware on each request (give it an exporter in BentoML's "
        "config). Off, every URL is excluded from it: it cost 12 % of the gateway's CPU, 19 % of CTRModel's.",
    )
    sli: bool = Field(
        True, description="Per-request SLI bookkeeping (status page, ctr_sli_* metrics); off only to measure its cost."
    )
    slo_availability: float = Field(0.999, gt=0, lt=1, description="Availability objective: successful / requests.")
    slo_model_scored: float = Field(0.99, gt=0, lt=1, description="Objective of the model-scored share of requests.")
    slo_p99_ms: float = Field(50.0, gt=0, description="Latency objective: 99 % of requests within this (gateway).")
    slo_burn_page: float = Field(
        14.4, gt=0, description="Page when the burn rate over 1 h and over 5 min both exceed this (SRE workbook)."
    )

    @field_validator("request_id_key")
    @classmethod
    def _key_long_enough(cls, value: str) -> str:
        if value and len(value.encode()) < MIN_REQUEST_ID_KEY_BYTES:
            raise ValueError(short_key_message(len(value.encode())))
        return value

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'features.db'}"


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, Path):
        return f"`{value}`".replace(str(PROJECT_ROOT), "<checkout>")
    if value == "":
        return "empty"
    if value is None:
        return "unset"
    return f"`{value}`" if isinstance(value, str) else f"`{json.dumps(value)}`"


def _kind(field: FieldInfo) -> str:
    """The type as a person reads it, with its bounds: `int >= 1`, `one of: aimd, off`."""
    ann, optional = field.annotation, False
    if type(None) in get_args(ann):  # `int | None`: unset means "no bound"
        ann, optional = next(a for a in get_args(ann) if a is not type(None)), True
    if get_origin(ann) is Literal:
        return "one of: " + ", ".join(str(a) for a in get_args(ann))
    name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
    if get_origin(ann) is dict or get_origin(ann) is list:
        name = f"JSON {str(ann).replace('typing.', '')}"
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    bounds = [f"{ops[k]} {getattr(m, k)}" for m in field.metadata for k in ops if hasattr(m, k)]
    return " ".join([name, *bounds]) + (", or unset" if optional else "")


def markdown() -> str:
    """docs/settings.md: every setting by section, with its type, bounds, default and meaning."""
    fields = Settings.model_fields
    out = ["# Settings", "",
           "Every setting is an environment variable `CTR_<NAME>`, read once per process by one",
           "pydantic-settings object (`ctr/settings.py`); the defaults run on one machine with nothing",
           "else installed. This page is generated: `python -m ctr.settings --write` rewrites it from",
           "the code, and `tests/test_settings_doc.py` fails when it is out of date.", ""]  # fmt: skip
    for title, names in SECTIONS:
        out += [f"## {title}", "", "| variable | type | default | meaning |", "|---|---|---|---|"]
        for name in names:
            f = fields[name]
            cells = [f"`CTR_{name.upper()}`", _kind(f), _default(f), f.description or ""]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return "\n".join(out)


DOC = PROJECT_ROOT / "docs" / "settings.md"

if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write"]:
        DOC.write_text(markdown())
        print(f"wrote {DOC}")
    else:
        sys.stdout.write(markdown())
