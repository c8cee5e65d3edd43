"""A history checker for feature writes across gateway processes (in the spirit of Jepsen's
Elle, at this project's scale): drive writes and reads against a real `bentoml serve`,
record every operation with its times, then check the history.

Writes go through /admin/features, each to a random gateway process (a pool of keep-alive
connections that land on the processes as the kernel hands them out): an entity of each
write mode is written again and again with an increasing sequence number in its values
(`[seq, n]`), and each write also carries a row of a ledger entity used once. Reads go
through /admin/features/read, which answers with the pid of the process that served it.

Checked, with S the stated staleness bound of each write mode:
  (a) lost: an acknowledged write's ledger row is missing from L3 at the end;
  (b) reordered: an entity's row in L3 is older than its newest acknowledged write;
  (c) stale: a read started more than S after a write was acknowledged saw something
      older than that write (the read's staleness: how long it was after the first write
      it missed; reads answered with default features, a store being down, are counted
      apart);
  (d) a write of an entity never seen (unknown, cached as such) counts under (c) too: the
      first write of every entity is of one that was unknown.
Faults are injected by the caller (tests/test_consistency.py: Redis killed and restarted
from its append-only file, the write-behind writer SIGKILLed, PostgreSQL restarted, a
gateway process SIGKILLed).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

MODES = {"through": "ad_meta", "behind": "ad_stats"}  # the group written in each mode (default modes)


def values(mode: str, seq: int) -> list[Any]:
    return [seq, 1, "x"] if MODES[mode] == "ad_meta" else [seq, 1]


@dataclass(frozen=True, slots=True)
class Write:
    mode: str
    entity: str
    seq: int
    ledger: str
    t0: float
    t1: float
    acked: bool  # answered 200; else refused or unknown (not expected, not excluded)


@dataclass(frozen=True, slots=True)
class Read:
    mode: str
    entity: str
    pid: int
    t0: float
    t1: float
    seq: int  # -1: unknown entity
    degraded: bool  # default features (a store down): not a staleness sample


@dataclass
class History:
    writes: list[Write] = field(default_factory=list)
    reads: list[Read] = field(default_factory=list)
    faults: list[tuple[float, str]] = field(default_factory=list)
    start: float = field(default_factory=time.monotonic)

    def entities(self, mode: str) -> set[str]:
        return {w.entity for w in self.writes if w.mode == mode}


@dataclass(frozen=True, slots=True)
class Verdict:
    writes: int
    acked: int
    reads: int
    degraded_reads: int
    lost: list[str]
    reordered: list[str]
    staleness: dict[tuple[str, int], float]  # (mode, pid) -> max staleness (s)
    violations: dict[str, int]  # mode -> reads staler than the bound
    worst_at: dict[tuple[str, int], float]  # (mode, pid) -> when the stalest read started (s)

    @property
    def ok(self) -> bool:
        return not self.lost and not self.reordered and not any(self.violations.values())


def check(history: History, l3: dict[str, int], bounds_s: dict[str, float]) -> Verdict:
    """Check `history` against L3's final state (`l3`: entity or ledger id -> seq)."""
    acked = [w for w in history.writes if w.acked]
    lost = sorted(w.ledger for w in acked if l3.get(w.ledger) != w.seq)
    newest: dict[str, int] = {}
    by_entity: dict[str, list[Write]] = defaultdict(list)
    for w in acked:
        newest[w.entity] = max(newest.get(w.entity, -1), w.seq)
        by_entity[w.entity].append(w)
    reordered = sorted(e for e, s in newest.items() if l3.get(e, -1) < s)
    for ws in by_entity.values():
        ws.sort(key=lambda w: w.t1)
    staleness: dict[tuple[str, int], float] = defaultdict(float)
    worst_at: dict[tuple[str, int], float] = {}
    violations: dict[str, int] = defaultdict(int)
    degraded = 0
    for r in history.reads:
        if r.degraded:
            degraded += 1
            continue
        missed = [w for w in by_entity.get(r.entity, []) if w.t1 < r.t0 and w.seq > r.seq]
        if not missed:
            staleness[(r.mode, r.pid)] = max(staleness[(r.mode, r.pid)], 0.0)
            continue
        late = r.t0 - min(w.t1 for w in missed)
        if late > staleness[(r.mode, r.pid)]:
            staleness[(r.mode, r.pid)], worst_at[(r.mode, r.pid)] = late, r.t0
        if late > bounds_s[r.mode]:
            violations[r.mode] += 1
    return Verdict(len(history.writes), len(acked), len(history.reads), degraded, lost, reordered,
                   dict(staleness), {m: violations[m] for m in MODES}, worst_at)  # fmt: skip


class Driver:
    """Writes and reads against `url` for `duration_s`, recording a History."""

    def __init__(self, url: str, token: str, *, entities: int = 10, connections: int = 8, seed: int = 1) -> None:
        self.url, self.auth = url, {"authorization": f"Bearer {token}"}
        self.entities, self.connections = entities, connections
        self.rng = random.Random(seed)
        self.history = History()
        self.prefix = f"cc{self.rng.randrange(16**6):06x}-"
        self._seq = 0
        self._clients: list[httpx.AsyncClient] = []

    def now(self) -> float:
        return time.monotonic() - self.history.start

    def entity(self, mode: str, i: int) -> str:
        return f"{self.prefix}{mode}-{i}"

    def _new_client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        return httpx.AsyncClient(base_url=self.url, headers=self.auth, timeout=2.0, limits=limits)

    async def _client(self) -> httpx.AsyncClient:
        """A pooled connection; one in 20 times a new one first (a keep-alive connection stays
        with the process that accepted it: new ones spread the operations over every process,
        the one restarted after a kill included)."""
        i = self.rng.randrange(len(self._clients))
        if self.rng.random() < 0.05:
            old, self._clients[i] = self._clients[i], self._new_client()
            await old.aclose()
        return self._clients[i]

    async def run(self, duration_s: float, write_every_s: float = 0.02, readers: int = 6) -> History:
        self._clients = [self._new_client() for _ in range(self.connections)]
        end = self.now() + duration_s
        try:
            await asyncio.gather(*(self._writer(m, end, write_every_s) for m in MODES),
                                 *(self._reader(end) for _ in range(readers)))  # fmt: skip
        finally:
            for c in self._clients:
                await c.aclose()
        return self.history

    async def _writer(self, mode: str, end: float, every_s: float) -> None:
        group = MODES[mode]
        while self.now() < end:
            self._seq += 1
            seq, entity = self._seq, self.entity(mode, self._seq % self.entities)
            ledger = f"{self.prefix}ledger-{seq}"
            rows = [{"id": entity, "values": values(mode, seq)}, {"id": ledger, "values": values(mode, seq)}]
            t0 = self.now()
            try:
                r = await (await self._client()).post("/admin/features", json={"group": group, "rows": rows})
                ok = r.status_code == 200 and r.json().get("mode") == mode
            except httpx.HTTPError:
                ok = False
            self.history.writes.append(Write(mode, entity, seq, ledger, t0, self.now(), ok))
            await asyncio.sleep(every_s)

    async def _reader(self, end: float) -> None:
        while self.now() < end:
            mode = self.rng.choice(list(MODES))
            entity = self.entity(mode, self.rng.randrange(self.entities))
            t0 = self.now()
            try:
                client = await self._client()
                r = await client.post("/admin/features/read", json={"group": MODES[mode], "ids": [entity]})
                body = r.json() if r.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                body = None
            if body is not None:
                row = body["rows"][0]["values"]
                seq = -1 if row is None else int(row[0])
                defaults = f"features:{MODES[mode]}:default" in body["degraded"]  # L3 down: not a staleness sample
                self.history.reads.append(Read(mode, entity, body["pid"], t0, self.now(), seq, defaults))
            await asyncio.sleep(0.005)


def report(v: Verdict, bounds_s: dict[str, float], history: History, duration_s: float) -> str:
    """The checker's table (markdown)."""
    faults = ", ".join(f"{name} at {t:.0f} s" for t, name in history.faults) or "none"
    lines = [
        f"Feature-write history: {duration_s:.0f} s, faults: {faults}.",
        "",
        "| writes | acknowledged | reads | reads with default features | lost | reordered |",
        "|---|---|---|---|---|---|",
        f"| {v.writes} | {v.acked} | {v.reads} | {v.degraded_reads} | {len(v.lost)} | {len(v.reordered)} |",
        "",
        "| mode | bound S | gateway process | reads | max staleness (at) | reads over S (mode, all processes) |",
        "|---|---|---|---|---|---|",
    ]
    reads = defaultdict(int)
    for r in history.reads:
        reads[(r.mode, r.pid)] += 1
    for (mode, pid), s in sorted(v.staleness.items()):
        at = f" (at {v.worst_at[(mode, pid)]:.1f} s)" if (mode, pid) in v.worst_at else ""
        lines.append(f"| {mode} | {bounds_s[mode]:.1f} s | pid {pid} | {reads[(mode, pid)]} | {s:.3f} s{at} | "
                     f"{v.violations.get(mode, 0)} |")  # fmt: skip
    return "\n".join(lines)


def pids(history: History) -> set[int]:
    return {r.pid for r in history.reads}


def l3_seqs(rows: Sequence[tuple[str, Any]]) -> dict[str, int]:
    """L3 rows (entity id, values as stored) -> entity id -> seq."""
    return {eid: int(v[0]) for eid, v in rows}
