"""`ctr bench pool`: the balancing policies side by side, over three CTRModel replicas of which
one is slowed by a fixed delay (CTR_MODEL_DELAY_MS). Per policy: client p50/p99, the fallback
share, and the share of requests each replica served (from the gateway's
ctr_replica_requests_total), with the pool's health checks on (the default) or with ejection
off (CTR_MAX_EJECTED_PERCENT=0), where only the policy keeps traffic off the slow replica."""

from __future__ import annotations

from dataclasses import dataclass

from ctr.bench import loadgen
from ctr.bench.cluster import Cluster
from ctr.bench.local_server import free_port
from ctr.bench.steady import scrape
from ctr.settings import Settings


@dataclass(frozen=True, slots=True)
class PolicyRow:
    policy: str
    ejection: bool
    result: loadgen.LevelResult
    shares: list[float]
    ejections: list[float]


def _per_replica(samples: dict[tuple[str, str], float], name: str, n: int) -> list[float]:
    """`name` summed per replica index of the model pool, from one scrape (steady.scrape)."""
    out = [0.0] * n
    for (metric, labels), value in samples.items():
        replica = loadgen.label(labels, "replica")
        if metric == name and loadgen.label(labels, "pool") == "model" and replica is not None and int(replica) < n:
            out[int(replica)] += value
    return out


def run(settings: Settings, policies: list[str], concurrency: int, duration_s: float, n_ads: int, delay_ms: float,
        weights: str, ejection_modes: list[bool]) -> str:  # fmt: skip
    c = Cluster()
    ports = [free_port() for _ in range(3)]
    rows: list[PolicyRow] = []
    try:
        for i, p in enumerate(ports):
            c.start("CTRModel", p, {"CTR_MODEL_DELAY_MS": str(delay_ms)} if i == 2 else {})
        c.wait()
        urls = ",".join(f"http://127.0.0.1:{p}" for p in ports)
        for ejection in ejection_modes:
            for policy in policies:
                env = {"CTR_MODEL_URLS": urls, "CTR_LB_POLICY": policy, "CTR_MODEL_WEIGHTS": f"[{weights}]"}
                if not ejection:
                    env["CTR_MAX_EJECTED_PERCENT"] = "0"
                gw = c.start("CTRGateway", free_port(), env)
                c.wait()
                m0 = scrape(gw.url)
                (res,) = loadgen.run_levels(gw.url, [concurrency], duration_s, n_ads, settings.data_dir)
                m1 = scrape(gw.url)
                ej = [b - a for a, b in zip(*(_per_replica(m, "ctr_replica_ejections_total", 3) for m in (m0, m1)),
                                            strict=True)]  # fmt: skip
                served = [b - a for a, b in zip(*(_per_replica(m, "ctr_replica_requests_total", 3) for m in (m0, m1)),
                                                strict=True)]  # fmt: skip
                total = sum(served) or 1.0
                rows.append(PolicyRow(policy, ejection, res, [s / total for s in served], ej))
                c.stop_one(gw)
    finally:
        c.stop()
    return format_rows(rows, concurrency, duration_s, n_ads, delay_ms, weights)


def format_rows(rows: list[PolicyRow], c: int, duration_s: float, n_ads: int, delay_ms: float, weights: str) -> str:
    lines = [f"3 CTRModel replicas, replica 2 slowed by {delay_ms:g} ms; closed loop c={c}, {duration_s:g} s a "
             f"policy, 1 user x {n_ads} ads (weighted: weights [{weights}])", "",
             "| policy | ejection | model-scored rps | p50 ms | p99 ms | p99.9 ms | max ms | fallback | replica 0 "
             "| replica 1 | replica 2 (slow) | ejections of 2 |", "|---" * 12 + "|"]  # fmt: skip
    for r in rows:
        res = r.result
        fb = res.fallback / res.requests if res.requests else float("nan")
        shares = " | ".join(f"{s:.1%}" for s in r.shares)
        lines.append(f"| {r.policy} | {'on' if r.ejection else 'off'} | {res.model_rps:.0f} | {res.p50_ms:.2f} | "
                     f"{res.p99_ms:.2f} | {res.p999_ms:.2f} | {res.max_ms:.2f} | {fb:.2%} | {shares} "
                     f"| {r.ejections[2]:.0f} |")  # fmt: skip
    return "\n".join(lines)
