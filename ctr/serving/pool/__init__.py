"""The model pool: many CTRModel replicas behind the gateway.

`pool` (ModelPool: assignment, per-replica coalescer, breaker and health, retries on another
replica), `balancer` (the policies: round_robin, least_conn, weighted, consistent_hash,
peak_ewma), `health` (passive windows, probes, ejection), `replica` (the Replica protocol
and its kinds), `discovery` (CTR_MODEL_URLS, DNS re-resolution).
"""

from ctr.serving.pool.balancer import POLICIES, Balancer, Lease, Slot
from ctr.serving.pool.discovery import FixedSource, UrlSource, parse_urls
from ctr.serving.pool.health import HealthConfig, ReplicaHealth, Status
from ctr.serving.pool.pool import ModelPool, NoReplica, PoolConfig
from ctr.serving.pool.replica import CallReplica, HttpReplica, LocalReplica, Replica

__all__ = [
    "POLICIES", "Balancer", "CallReplica", "FixedSource", "HealthConfig", "HttpReplica", "Lease", "LocalReplica",
    "ModelPool", "NoReplica", "PoolConfig", "Replica", "ReplicaHealth", "Slot", "Status", "UrlSource", "parse_urls",
]  # fmt: skip
