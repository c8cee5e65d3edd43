"""Sticky user split: a pure hash bucket and canary membership from ranges that only grow.

Modelled on GrowthBook's `hash`/`getBucketRanges`/`chooseVariation`: a user's bucket is a
stable hash of (salt, user id) mapped to [0, 1); the canary owns the range [0, share).
Because the range only grows as the share rises (1 % -> 5 % -> ...), a user once in the
canary stays there until the rollout ends (rollback or promotion, after which a new
rollout draws a new salt, so the next canary gets a fresh, independent set of users).
blake2b is used, not Python's `hash` (salted per process) or CRC (poorly mixed).
"""

from __future__ import annotations

import hashlib

_SCALE = float(1 << 64)


def bucket(user_id: str, salt: str) -> float:
    """The user's position in [0, 1): the first 8 bytes of blake2b(salt, user id) over 2**64."""
    h = hashlib.blake2b(user_id.encode(), digest_size=8, key=salt.encode()[:64])
    return int.from_bytes(h.digest(), "big") / _SCALE


def bucket_ranges(share: float) -> list[tuple[float, float]]:
    """The canary's ranges of [0, 1) at `share` (0..1): one range, [0, share), that only grows."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    return [(0.0, share)] if share > 0 else []


def in_ranges(b: float, ranges: list[tuple[float, float]]) -> bool:
    """GrowthBook's chooseVariation for two arms: inside any range -> canary."""
    return any(lo <= b < hi for lo, hi in ranges)


def in_canary(user_id: str, salt: str, share: float) -> bool:
    """Whether `user_id` is served by the canary when it takes `share` of users."""
    return share >= 1.0 or in_ranges(bucket(user_id, salt), bucket_ranges(share))


def arm_of(user_id: str, salt: str, share: float) -> str:
    """`canary` or `stable` for this user at this share."""
    return "canary" if share > 0 and in_canary(user_id, salt, share) else "stable"


def in_baseline(user_id: str, salt: str, share: float) -> bool:
    """The baseline's users: the range [share, 2 share) next to the canary's, as many users as it
    has (stable users, served by stable's model on replicas of the canary's capacity)."""
    return 0 < share <= 0.5 and share <= bucket(user_id, salt) < 2 * share


def unit_of(user_id: str, salt: str, n_units: int) -> int:
    """The user's unit (hash sub-bucket) for the gates' variance: independent of the arm's bucket."""
    return min(n_units - 1, int(bucket(user_id, salt + ":unit") * n_units))
