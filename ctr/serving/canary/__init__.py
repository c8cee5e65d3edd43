"""Canary releases: a sticky user split, rollout plans as data, sequential gates, shared
state in Redis, the controller that advances, promotes or rolls back, and one process's
live view of it (`runtime`).

May import: `ctr.serving` helpers below it, redis-py, orjson. Never `ctr.bench`/`ship`/`cli`.
"""

from ctr.serving.canary.controller import CanaryError, Controller, Decision, decide
from ctr.serving.canary.counts import ArmStats, Counts
from ctr.serving.canary.plan import GATES, Phase, Plan, default_plan, ramp_plan
from ctr.serving.canary.runtime import CanaryRuntime
from ctr.serving.canary.split import arm_of, bucket, bucket_ranges, in_canary
from ctr.serving.canary.state import Arm, MemoryStore, RedisStore, Rollout
from ctr.serving.canary.stats import GateConfig, GateResult, evaluate

__all__ = [
    "GATES",
    "Arm",
    "ArmStats",
    "CanaryError",
    "CanaryRuntime",
    "Controller",
    "Counts",
    "Decision",
    "GateConfig",
    "GateResult",
    "MemoryStore",
    "Phase",
    "Plan",
    "RedisStore",
    "Rollout",
    "arm_of",
    "bucket",
    "bucket_ranges",
    "decide",
    "default_plan",
    "evaluate",
    "in_canary",
    "ramp_plan",
]
