"""Load-balancing policies over a pool's replicas, behind one interface:
`acquire(candidates, key, rows) -> Lease`, then `lease.success(latency_s)` or `lease.failure()`
(as Netflix concurrency-limits does).

- `round_robin`: each available replica in turn (exact over any run of picks);
- `least_conn`: fewest outstanding ROWS, ties at random. Rows, not requests: a request
  carries 1 to 1,000 ads, and a replica's work (transfer, forward pass) grows with rows,
  so a request count would weigh a 1,000-ad request like a 1-ad one;
- `weighted`: P(replica i) = w_i / sum(w_j) over the available replicas;
- `consistent_hash`: on the user id, over uhashring's ring (160 virtual nodes a replica),
  with bounded loads (Mirrokni, Thorup and Zadimoghaddam): a replica takes a request only
  while its outstanding requests stay within ceil(c x (total + 1) / n); otherwise the walk
  goes on along the ring, so one hot user cannot overload a replica. Requests here (the
  paper's balls), not rows, so the bound means what the paper proves;
- `peak_ewma`: power of two choices on cost = peak-EWMA latency x (outstanding + 1), as
  Finagle's and Linkerd's balancers do: the EWMA jumps to any slower sample at once and
  decays towards faster ones with time constant `decay_s`.

A `Slot` is what the policies read of a replica; the pool decides which slots are
candidates (healthy, breaker not open). Time is injected (`clock`), randomness too (`rng`).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from uhashring import HashRing

Clock = Callable[[], float]
POLICIES = ("round_robin", "least_conn", "weighted", "consistent_hash", "peak_ewma")


@dataclass(eq=False, slots=True)
class Slot:
    """A replica as the balancer sees it."""

    name: str
    index: int = 0
    weight: float = 1.0
    outstanding_rows: int = 0
    outstanding: int = 0  # requests
    ewma_s: float = 0.0
    ewma_at: float = 0.0
    picks: int = 0


class Lease:
    """One request's hold on a slot; report its outcome exactly once."""

    __slots__ = ("_done", "balancer", "rows", "slot", "t0")

    def __init__(self, balancer: Balancer, slot: Slot, rows: int) -> None:
        self.balancer, self.slot, self.rows = balancer, slot, rows
        self.t0 = balancer.clock()
        self._done = False
        slot.outstanding += 1
        slot.outstanding_rows += rows
        slot.picks += 1

    def _release(self) -> bool:
        if self._done:
            return False
        self._done = True
        self.slot.outstanding -= 1
        self.slot.outstanding_rows -= self.rows
        return True

    def success(self, latency_s: float) -> None:
        if self._release():
            self.balancer.observe(self.slot, latency_s)

    def failure(self) -> None:
        """A failure counts as a sample of the time it took (a timeout is slow, not free)."""
        if self._release():
            self.balancer.observe(self.slot, self.balancer.clock() - self.t0)


class Policy:
    """Picks one of the candidates (a non-empty list) for a request."""

    def update(self, slots: Sequence[Slot]) -> None:
        """The pool's membership changed (all slots, available or not)."""

    def pick(self, candidates: Sequence[Slot], key: str | None, rows: int) -> Slot:
        raise NotImplementedError


class RoundRobin(Policy):
    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[Slot], key: str | None, rows: int) -> Slot:
        slot = candidates[self._next % len(candidates)]
        self._next += 1
        return slot


class LeastConn(Policy):
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, candidates: Sequence[Slot], key: str | None, rows: int) -> Slot:
        least = min(s.outstanding_rows for s in candidates)
        tied = [s for s in candidates if s.outstanding_rows == least]
        return tied[0] if len(tied) == 1 else self.rng.choice(tied)


class Weighted(Policy):
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, candidates: Sequence[Slot], key: str | None, rows: int) -> Slot:
        return self.rng.choices(candidates, weights=[s.weight for s in candidates])[0]


class ConsistentHash(Policy):
    def __init__(self, load_factor: float = 1.25, vnodes: int = 160) -> None:
        if load_factor <= 1:
            raise ValueError(f"load_factor must be > 1, got {load_factor}")
        self.load_factor = load_factor
        self.vnodes = vnodes
        self._ring = HashRing(nodes=[], vnodes=vnodes)
        self._by_name: dict[str, Slot] = {}
        self._fallback = RoundRobin()

    def update(self, slots: Sequence[Slot]) -> None:
        self._by_name = {s.name: s for s in slots}
        self._ring = HashRing(nodes=sorted(self._by_name), vnodes=self.vnodes)

    def bound(self, candidates: Sequence[Slot]) -> int:
        """The most outstanding requests a replica may hold after this pick."""
        total = sum(s.outstanding for s in candidates) + 1
        return math.ceil(self.load_factor * total / len(candidates))

    def pick(self, candidates: Sequence[Slot], key: str | None, rows: int) -> Slot:
        if key is None:
            return self._fallback.pick(candidates, key, rows)
        allowed = {id(s) for s in candidates}
        cap = self.bound(candidates)
        for node in self._ring.range(key):
            slot = self._by_name.get(node["nodename"])
            if slot is not None and id(slot) in allowed and slot.outstanding + 1 <= cap:
                return slot
        return min(candidates, key=lambda s: s.outstanding)  # a candidate not on the ring yet


class PeakEwma(Policy):
    def __init__(self, rng: random.Random, clock: Clock, decay_s: float = 2.0) -> None:
        if decay_s <= 0:
            raise ValueError(f"decay_s must be > 0, got {decay_s}")
        self.rng, self.clock, self.decay_s = rng, clock, decay_s

    def cost(self, slot: Slot) -> float:
        # the EWMA decays between samples too, so a replica that was slow once is tried again
        age = max(self.clock() - slot.ewma_at, 0.0)
        return slot.ewma_s * math.exp(-age / self.decay_s) * (slot.outstanding + 1)

    def pick(self, candidates: Sequence[Slot], key: str | None, rows: int) -> Slot:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rng.sample(list(candidates), 2)
        return a if self.cost(a) <= self.cost(b) else b


def make_policy(name: str, rng: random.Random, clock: Clock, load_factor: float = 1.25) -> Policy:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_conn":
        return LeastConn(rng)
    if name == "weighted":
        return Weighted(rng)
    if name == "consistent_hash":
        return ConsistentHash(load_factor)
    if name == "peak_ewma":
        return PeakEwma(rng, clock)
    raise ValueError(f"unknown load-balancing policy {name!r}; one of {', '.join(POLICIES)}")


class Balancer:
    """A policy plus the bookkeeping every policy shares (outstanding work, peak EWMA)."""

    def __init__(self, policy: Policy, clock: Clock = time.monotonic, decay_s: float = 2.0) -> None:
        self.policy, self.clock, self.decay_s = policy, clock, decay_s

    def update(self, slots: Sequence[Slot]) -> None:
        self.policy.update(slots)

    def acquire(self, candidates: Sequence[Slot], key: str | None = None, rows: int = 1) -> Lease:
        if not candidates:
            raise ValueError("no candidate replica")
        return Lease(self, self.policy.pick(candidates, key, rows), rows)

    def lease(self, slot: Slot, rows: int) -> Lease:
        """A lease on a given slot (a retry sent to another replica)."""
        return Lease(self, slot, rows)

    def observe(self, slot: Slot, latency_s: float) -> None:
        """Peak EWMA: a slower sample is taken at once, a faster one blended in by age."""
        now = self.clock()
        if latency_s >= slot.ewma_s:
            slot.ewma_s = latency_s
        else:
            w = math.exp(-max(now - slot.ewma_at, 0.0) / self.decay_s)
            slot.ewma_s = slot.ewma_s * w + latency_s * (1 - w)
        slot.ewma_at = now
