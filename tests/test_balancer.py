"""Load-balancing policies: the distribution of many picks per policy, against exact counts or
stated statistical tolerances; consistent hashing's key movement, stability and load bound."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from helpers import FakeClock

from ctr.serving.pool.balancer import Balancer, ConsistentHash, Lease, Slot, make_policy


def slots(n: int, weights: list[float] | None = None) -> list[Slot]:
    return [Slot(f"10.0.0.{i}:3000", i, (weights or [1.0] * n)[i]) for i in range(n)]


def balancer(policy: str, seed: int = 7, clock: FakeClock | None = None) -> tuple[Balancer, FakeClock]:
    clock = clock or FakeClock()
    return Balancer(make_policy(policy, random.Random(seed), clock), clock), clock


def test_round_robin_is_exact() -> None:
    """Over 3,000 picks of 3 replicas each gets exactly 1,000; with one unavailable, the other two alternate."""
    b, _ = balancer("round_robin")
    s = slots(3)
    for _ in range(3000):
        b.acquire(s).success(0.001)
    assert [x.picks for x in s] == [1000, 1000, 1000]
    picks = [b.acquire(s[:2]).slot.index for _ in range(10)]
    assert sorted(picks) == [0] * 5 + [1] * 5 and all(a != b for a, b in itertools.pairwise(picks))


def test_weighted_follows_the_weights_within_four_sigma() -> None:
    """P(i) = w_i / sum(w): over 20,000 picks each share is within 4 standard errors of it."""
    b, _ = balancer("weighted")
    w = [5.0, 3.0, 2.0]
    s, n = slots(3, w), 20_000
    for _ in range(n):
        b.acquire(s).success(0.001)
    for slot, wi in zip(s, w, strict=True):
        p = wi / sum(w)
        assert abs(slot.picks / n - p) < 4 * math.sqrt(p * (1 - p) / n), (slot.picks, p)


def test_least_conn_balances_rows_and_avoids_the_loaded_replica() -> None:
    """Requests of 1-1,000 rows completing at random: each replica gets 1/3 of the rows within 3 %
    (absolute); a replica holding outstanding rows is not picked while others hold none."""
    b, _ = balancer("least_conn")
    s, rng = slots(3), random.Random(3)
    open_: list[Lease] = []
    rows = [0, 0, 0]
    for _ in range(20_000):
        r = rng.randint(1, 1000)
        lease = b.acquire(s, rows=r)
        rows[lease.slot.index] += r
        open_.append(lease)
        if len(open_) > 12:
            open_.pop(rng.randrange(len(open_))).success(0.001)
    for x in rows:
        assert abs(x / sum(rows) - 1 / 3) < 0.03, rows
    fresh = slots(3)
    held = b.lease(fresh[0], 500)
    assert {b.acquire(fresh).slot.index for _ in range(50)} <= {1, 2}
    held.success(0.001)


def test_peak_ewma_steers_away_from_a_slow_replica() -> None:
    """With one replica 10x slower, power of two choices on peak EWMA sends it under 10 % of 5,000 requests."""
    b, clock = balancer("peak_ewma")
    s = slots(3)
    latency = {0: 0.002, 1: 0.002, 2: 0.020}
    for _ in range(5000):
        lease = b.acquire(s)
        clock.t += 0.001
        lease.success(latency[lease.slot.index])
    assert s[2].picks / 5000 < 0.10, [x.picks for x in s]
    assert min(s[0].picks, s[1].picks) > 0.4 * 5000


def test_peak_ewma_takes_a_slow_sample_at_once() -> None:
    """Peak: one slow answer raises the EWMA to it immediately; faster ones decay it with time."""
    b, clock = balancer("peak_ewma")
    s = slots(1)[0]
    b.observe(s, 0.002)
    b.observe(s, 0.050)
    assert s.ewma_s == 0.050
    clock.t += 10.0
    b.observe(s, 0.002)
    assert s.ewma_s < 0.003


def _owners(policy: ConsistentHash, s: list[Slot], keys: list[str]) -> dict[str, str]:
    policy.update(s)
    return {k: policy.pick(s, k, 1).name for k in keys}


KEYS = [f"u{i}" for i in range(10_000)]


@pytest.mark.parametrize("n", [3, 5, 8])
def test_consistent_hash_adding_a_replica_moves_about_one_in_n_keys(n: int) -> None:
    """Adding one replica to N-1 moves about 1/N of the keys (no more than 1/N + 0.05), all to it."""
    p = ConsistentHash()
    before = _owners(p, slots(n - 1), KEYS)
    grown = [*slots(n - 1), Slot("10.0.1.99:3000", n - 1)]
    after = _owners(p, grown, KEYS)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "10.0.1.99:3000" for k in moved)
    assert 1 / n - 0.05 < len(moved) / len(KEYS) < 1 / n + 0.05, len(moved) / len(KEYS)


@pytest.mark.parametrize("n", [3, 5, 8])
def test_consistent_hash_removing_a_replica_moves_only_its_keys(n: int) -> None:
    """Removing one of N moves about 1/N of the keys (no more than 1/N + 0.05): exactly the removed one's."""
    p = ConsistentHash()
    full = slots(n)
    before = _owners(p, full, KEYS)
    after = _owners(p, full[1:], KEYS)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(before[k] == full[0].name for k in moved) and len(moved) == sum(
        1 for k in KEYS if before[k] == full[0].name
    )
    assert len(moved) / len(KEYS) < 1 / n + 0.05


def test_consistent_hash_is_stable_while_the_pool_is_unchanged() -> None:
    """The same user maps to the same replica, pick after pick, and after rebuilding the ring."""
    p = ConsistentHash()
    s = slots(4)
    first = _owners(p, s, KEYS[:2000])
    assert _owners(p, list(reversed(s)), KEYS[:2000]) == first
    b = Balancer(p)
    for k in KEYS[:200]:
        lease = b.acquire(s, key=k)
        assert lease.slot.name == first[k]
        lease.success(0.001)


def test_consistent_hash_one_hot_user_never_pushes_a_replica_over_the_bound() -> None:
    """Half the requests from one user, leases held at random: after every pick no replica holds more
    than ceil(1.25 x outstanding / n) requests, and the hot user's overflow spreads over the others."""
    p = ConsistentHash(load_factor=1.25)
    s = slots(4)
    p.update(s)
    b, rng = Balancer(p), random.Random(5)
    held: list[Lease] = []
    hot_on: set[int] = set()
    for i in range(4000):
        key = "u-hot" if i % 2 == 0 else f"u{rng.randrange(10_000)}"
        lease = b.acquire(s, key=key)
        held.append(lease)
        if key == "u-hot":
            hot_on.add(lease.slot.index)
        total = sum(x.outstanding for x in s)
        assert max(x.outstanding for x in s) <= math.ceil(1.25 * total / len(s)), [x.outstanding for x in s]
        if len(held) > 40:
            held.pop(rng.randrange(len(held))).success(0.001)
    assert len(hot_on) > 1


def test_unknown_policy_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown load-balancing policy 'fastest'"):
        make_policy("fastest", random.Random(), FakeClock())
