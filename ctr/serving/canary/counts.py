"""What the gates count: per arm, per time stratum, per user unit.

Why this shape. An always-valid interval assumes exchangeable observations and independent
units; real traffic breaks both (notes/canary-statistics.md):
- the canary's share climbs while the day goes by, so totals since the start compare the
  canary's late hours with stable's whole day. Counters are kept per **stratum**, the
  plan's phase and the hour of the clock (`stratum_key`): within a stratum both arms see
  the same share and the same time, and the gates compare arms stratum by stratum;
- a sticky split assigns users, and a heavy user's impressions are correlated. Counters are
  kept per **unit**, one of `N_UNITS` hash sub-buckets of users (`split.unit_of`), so the
  gates can read the variance between units (the bucket method), which includes whatever
  correlation there is within a user.

`Counts` is both a process's buffered increments and the store's totals (they add).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

FIELDS = ("requests", "errors", "impressions", "clicks", "scored", "scored_clicks", "pred_sum")
FIELD = {name: i for i, name in enumerate(FIELDS)}
N_UNITS = 64

# Latency histogram upper edges (ms): 0.1 ms steps to 20 ms, then 1 % steps to 60 s; then an
# explicit overflow bucket (its upper edge is +inf, its lower edge 60 s: a gate reads it as
# "at least 60 s", never as an infinite threshold).
LATENCY_EDGES_MS: tuple[float, ...] = (
    *(round(0.1 * i, 1) for i in range(1, 201)),
    *(20.0 * 1.01**i for i in range(1, 1 + math.ceil(math.log(3000) / math.log(1.01)))),
)
N_LATENCY_BUCKETS = len(LATENCY_EDGES_MS) + 1
LOWER_EDGES_MS = np.array((0.0, *LATENCY_EDGES_MS))
UPPER_EDGES_MS = np.array((*LATENCY_EDGES_MS, math.inf))


def latency_bucket(latency_ms: float) -> int:
    """Index of the histogram bucket holding `latency_ms` (the last is overflow)."""
    return bisect.bisect_left(LATENCY_EDGES_MS, latency_ms)


def stratum_key(phase: int, now: float, stratum_s: float) -> str:
    """`<phase>:<slot>`: one phase's share during one clock slot of `stratum_s`."""
    return f"{phase}:{int(now // stratum_s)}"


def stratum_phase(key: str) -> int:
    return int(key.split(":", 1)[0])


@dataclass(slots=True)
class Cell:
    """One arm in one stratum: every field per unit, and a latency histogram."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros((len(FIELDS), N_UNITS)))
    latency: np.ndarray = field(default_factory=lambda: np.zeros(N_LATENCY_BUCKETS, np.int64))

    def add(self, other: Cell) -> None:
        self.counts += other.counts
        self.latency += other.latency


@dataclass(slots=True)
class ArmStats:
    """One arm's totals (what the status page and `ctr canary status` show)."""

    requests: int = 0
    errors: int = 0
    impressions: int = 0
    clicks: int = 0
    scored: int = 0
    scored_clicks: int = 0
    pred_sum: float = 0.0
    latency: np.ndarray = field(default_factory=lambda: np.zeros(N_LATENCY_BUCKETS, np.int64))

    def quantile_ms(self, q: float) -> float:
        """The upper edge of the bucket holding quantile q (inf in the overflow bucket)."""
        total = int(self.latency.sum())
        if total == 0:
            return math.nan
        i = int(np.searchsorted(np.cumsum(self.latency), q * total, side="left"))
        return float(UPPER_EDGES_MS[min(i, N_LATENCY_BUCKETS - 1)])

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {f: getattr(self, f) for f in FIELDS}
        p50, p99 = self.quantile_ms(0.5), self.quantile_ms(0.99)
        out["p50_ms"] = p50 if math.isfinite(p50) else None
        out["p99_ms"] = p99 if math.isfinite(p99) else None
        return out


_ZERO = np.zeros((len(FIELDS), N_UNITS))


class Counts:
    """Cells keyed by (arm, stratum)."""

    __slots__ = ("_cache", "cells")

    def __init__(self, cells: dict[tuple[str, str], Cell] | None = None) -> None:
        self.cells: dict[tuple[str, str], Cell] = cells if cells is not None else {}
        self._cache: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}  # (arm, strata) -> tensor; reset on writes

    def cell(self, arm: str, stratum: str) -> Cell:
        self._cache.clear()
        c = self.cells.get((arm, stratum))
        if c is None:
            c = self.cells[(arm, stratum)] = Cell()
        return c

    def record_request(self, arm: str, stratum: str, unit: int, latency_ms: float, error: bool) -> None:
        c = self.cell(arm, stratum)
        c.counts[FIELD["requests"], unit] += 1
        if error:
            c.counts[FIELD["errors"], unit] += 1
        c.latency[latency_bucket(latency_ms)] += 1

    def record_feedback(self, arm: str, stratum: str, unit: int, clicked: bool, score: float | None) -> None:
        c = self.cell(arm, stratum)
        c.counts[FIELD["impressions"], unit] += 1
        c.counts[FIELD["clicks"], unit] += int(clicked)
        if score is not None:
            c.counts[FIELD["scored"], unit] += 1
            c.counts[FIELD["scored_clicks"], unit] += int(clicked)
            c.counts[FIELD["pred_sum"], unit] += score

    def put(self, arm: str, stratum: str, latency_ms: float | None = None, **totals: float) -> Counts:
        """Add totals spread evenly over the units (fixtures, tests), requests at `latency_ms`."""
        c = self.cell(arm, stratum)
        for name, v in totals.items():
            c.counts[FIELD[name]] += v / N_UNITS
        if latency_ms is not None:
            c.latency[latency_bucket(latency_ms)] += round(totals.get("requests", 0))
        return self

    def __getitem__(self, arm: str) -> ArmStats:
        """`counts["canary"]`: one arm's totals."""
        return self.total(arm)

    def add(self, other: Counts) -> None:
        self._cache.clear()
        for (arm, stratum), c in other.cells.items():
            self.cell(arm, stratum).add(c)

    def empty(self) -> bool:
        return all(not c.counts.any() and not c.latency.any() for c in self.cells.values())

    def strata(self, phase: int | None = None) -> list[str]:
        keys = sorted({s for _, s in self.cells})
        return keys if phase is None else [k for k in keys if stratum_phase(k) == phase]

    def matrix(self, arm: str, name: str, strata: Iterable[str]) -> np.ndarray:
        """(strata, units) of one field; zeros where the arm has no cell."""
        key = (arm, tuple(strata))
        t = self._cache.get(key)
        if t is None:
            cells = self.cells
            rows = [cells[(arm, s)].counts if (arm, s) in cells else _ZERO for s in key[1]]
            t = self._cache[key] = np.stack(rows) if rows else np.zeros((0, len(FIELDS), N_UNITS))
        return t[:, FIELD[name], :]

    def latency(self, arm: str, strata: Iterable[str]) -> np.ndarray:
        out = np.zeros(N_LATENCY_BUCKETS, np.int64)
        for s in strata:
            if (arm, s) in self.cells:
                out += self.cells[(arm, s)].latency
        return out

    def total(self, arm: str) -> ArmStats:
        strata = self.strata()
        sums = {f: float(self.matrix(arm, f, strata).sum()) for f in FIELDS}
        ints = {f: round(v) for f, v in sums.items() if f != "pred_sum"}
        return ArmStats(**ints, pred_sum=sums["pred_sum"], latency=self.latency(arm, strata))  # type: ignore[arg-type]
