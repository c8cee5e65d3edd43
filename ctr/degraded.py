"""Every reason an answer can name in `degraded`, in one place.

An answer's `degraded` list names each part that was substituted, starting with the part:
`model:` (the fallback answered), `features:` (default features stood in), `cache:` (a cache
tier was read around or not refreshed), `overload:` (shed at the edge). The values are the
strings clients see (docs/api.md) and the `reason` label of `ctr_degraded_total` and
`ctr_fallbacks_total`; `Reason` is a `StrEnum`, so a reason compares equal to its string.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # The model gave no scores: the fallback answered.
    MODEL_DEADLINE = "model:deadline"  # too little of the deadline left after features to try
    MODEL_TIMEOUT = "model:timeout"  # the model did not answer within the deadline
    MODEL_BREAKER_OPEN = "model:breaker_open"
    MODEL_UNAVAILABLE = "model:unavailable"  # connection refused or reset, 5xx
    MODEL_ERROR = "model:error"  # the forward pass raised
    MODEL_INVALID_ANSWER = "model:invalid_answer"  # not one finite score per row
    MODEL_CANCELLED = "model:cancelled"
    MODEL_BATCH_FAILED = "model:batch_failed"
    FALLBACK_GLOBAL = "model:fallback:global"  # even FallbackService failed: the global CTR
    # Features: defaults stood in.
    FEATURES_TIMEOUT = "features:timeout:default"
    FEATURES_REMOTE = "features:remote:default"
    FEATURES_USER = "features:user:default"  # an unknown user
    FEATURES_AD = "features:ad:default"  # an unknown ad
    # Caches.
    L2_BYPASSED = "cache:l2:bypassed"
    L2_DEFERRED = "cache:l2:deferred"  # a feature write committed; its announcement follows
    # The edge.
    SHED = "overload:shed"

    @property
    def is_model(self) -> bool:
        return self.value.startswith("model:")


def group_default(group: str) -> str:
    """A feature group that could not be read (L3 failed): `features:<group>:default`."""
    return f"features:{group}:default"


def is_features(reason: str) -> bool:
    return reason.startswith("features:")


# The model's answer came too late: the congestion signal of the adaptive limit.
PAST_DEADLINE = frozenset({Reason.MODEL_TIMEOUT, Reason.MODEL_DEADLINE})
LATE = PAST_DEADLINE | {Reason.FEATURES_TIMEOUT}
