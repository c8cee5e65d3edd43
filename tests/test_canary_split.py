"""The sticky split: a pure, stable bucket in [0, 1) and canary ranges that only grow."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctr.serving.canary.split import arm_of, bucket, bucket_ranges, in_canary

users = st.text(min_size=0, max_size=40)
salts = st.text(alphabet="0123456789abcdef", min_size=1, max_size=32)
shares = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@given(users, salts)
def test_bucket_is_deterministic_and_in_unit_interval(user: str, salt: str) -> None:
    """The same (user, salt) always lands in the same bucket, inside [0, 1)."""
    b = bucket(user, salt)
    assert b == bucket(user, salt)
    assert 0.0 <= b < 1.0


def test_bucket_is_the_same_in_another_process() -> None:
    """Not Python's salted hash: a fresh interpreter computes the same bucket."""
    code = "from ctr.serving.canary.split import bucket; print(repr(bucket('u42', 'abc')))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    ).stdout
    assert float(out) == bucket("u42", "abc")


@given(users, salts, shares, shares)
def test_no_user_leaves_the_canary_while_it_grows(user: str, salt: str, a: float, b: float) -> None:
    """Monotone: in the canary at a smaller share implies in it at every larger share."""
    lo, hi = sorted((a, b))
    if in_canary(user, salt, lo):
        assert in_canary(user, salt, hi)


@settings(max_examples=25, deadline=None)
@given(salts, st.sampled_from([0.01, 0.05, 0.2, 0.5]))
def test_share_of_users_is_close_to_the_target(salt: str, share: float) -> None:
    """Over 20,000 users the canary's share is within 5 standard errors of the target."""
    n = 20_000
    got = sum(in_canary(f"u{i}", salt, share) for i in range(n)) / n
    assert abs(got - share) <= 5 * (share * (1 - share) / n) ** 0.5


def test_salts_draw_independent_canaries() -> None:
    """A new rollout's salt picks a different set of users (overlap ~ share^2, not share)."""
    a = {i for i in range(20_000) if in_canary(f"u{i}", "salt-a", 0.1)}
    b = {i for i in range(20_000) if in_canary(f"u{i}", "salt-b", 0.1)}
    assert len(a & b) < 0.2 * len(a)


def test_ranges_and_arms_at_the_ends() -> None:
    """0 % has no range and no canary user; 100 % puts everyone in the canary."""
    assert bucket_ranges(0.0) == [] and bucket_ranges(0.3) == [(0.0, 0.3)]
    assert arm_of("u1", "s", 0.0) == "stable" and arm_of("u1", "s", 1.0) == "canary"
    with pytest.raises(ValueError, match="share must be in"):
        bucket_ranges(1.5)
