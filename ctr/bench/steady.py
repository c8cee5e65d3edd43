"""`ctr bench steady`: long open-loop runs below saturation, and where their tail comes from.

Saturation is the best model-scored rps at p99 <= 50 ms of a closed-loop sweep (or
`--saturation`); each run then offers a fixed share of it (default 50 %) for `--duration`
seconds. Per run: the answers by kind (model-scored, past the deadline, shed, other
fallbacks), the client's p99 / p99.9 / max and how far behind schedule the generator sent
(its own stalls arrive at the gateway as bursts); from the gateway's /metrics over the same
window its own p99.9 (ctr_request_latency_seconds), the event loop's lag
(ctr_event_loop_lag_seconds), how long its thread waited for a CPU (run-queue wait,
ctr_event_loop_cpu_wait_seconds) and the garbage collector's pauses (ctr_gc_pause_seconds);
the machine's busy share (everything that ran, generator included) and its steal time
(/proc/stat: CPU the hypervisor gave to other guests). Each names one suspect of a slow
request: the client, the gateway's own work, another process on its cores, the collector,
the host.
"""

from __future__ import annotations

import re
import urllib.request
from dataclasses import asdict
from pathlib import Path

from ctr.bench import loadgen
from ctr.bench.capacity import best_rps
from ctr.bench.local_server import serving
from ctr.degraded import PAST_DEADLINE, Reason
from ctr.settings import Settings


def scrape(url: str) -> dict[tuple[str, str], float]:
    """Every ctr_* sample of the gateway's /metrics, by (name, labels)."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        return loadgen.parse_metrics(r.read().decode())


def _delta(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float], name: str) -> dict[str, float]:
    return {labels: v - before.get((n, labels), 0.0) for (n, labels), v in after.items() if n == name}


def _bucket_quantile(buckets: dict[str, float], q: float) -> float:
    """The upper bound (ms) of the bucket holding quantile q, over every other label; 0 with no
    samples."""
    counts: dict[float, float] = {}
    for k, v in buckets.items():
        le = float(re.search(r'le="([^"]+)"', k).group(1).replace("+Inf", "inf"))  # type: ignore[union-attr]
        counts[le] = counts.get(le, 0.0) + v
    edges = sorted(counts.items())
    total = edges[-1][1] if edges else 0.0
    if total <= 0:
        return 0.0
    return next(le for le, count in edges if count >= q * total) * 1000


def window_stats(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> dict[str, object]:
    """The gateway's own account of a window: fallbacks by reason, loop lag, GC pauses."""
    lag = _delta(before, after, "ctr_event_loop_lag_seconds_bucket")
    gc_count = _delta(before, after, "ctr_gc_pause_seconds_count")
    gc_sum = _delta(before, after, "ctr_gc_pause_seconds_sum")
    fallbacks = _delta(before, after, "ctr_fallbacks_total")
    wait = _delta(before, after, "ctr_event_loop_cpu_wait_seconds_bucket")
    wait_sum = sum(_delta(before, after, "ctr_event_loop_cpu_wait_seconds_sum").values())
    waited = sum(_delta(before, after, "ctr_event_loop_cpu_wait_seconds_count").values()) > 0
    return {
        "fallbacks": {re.sub(r'reason="([^"]+)"', r"\1", k): int(v) for k, v in fallbacks.items() if v},
        "gateway_p999_ms": _bucket_quantile(_delta(before, after, "ctr_request_latency_seconds_bucket"), 0.999),
        "lag_p99_ms": _bucket_quantile(lag, 0.99),
        "lag_max_ms": _bucket_quantile(lag, 1.0),
        # summed over the gateway's processes; None where the kernel does not say (no schedstat)
        "cpu_wait_ms": wait_sum * 1000 if waited else None,
        "cpu_wait_max_ms": _bucket_quantile(wait, 1.0) if waited else None,
        "gc": {
            re.sub(r'generation="(\d)"', r"\1", k): (int(n), gc_sum.get(k, 0.0) / n * 1000 if n else 0.0)
            for k, n in gc_count.items()
            if n
        },
    }


def _or_na(value: object, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def cpu_times(path: str = "/proc/stat") -> tuple[float, float, float]:
    """(all, steal, idle) jiffies of the machine so far (idle counts iowait); zeros where
    /proc/stat is not there."""
    try:
        with open(path) as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0, 0.0
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0.0, sum(fields[3:5])


def steal_share(before: tuple[float, ...], after: tuple[float, ...]) -> float | None:
    """The share of the machine's CPU time the hypervisor took between two cpu_times(); None
    when they say nothing (no /proc/stat)."""
    total = after[0] - before[0]
    return (after[1] - before[1]) / total if total > 0 else None


def busy_share(before: tuple[float, ...], after: tuple[float, ...]) -> float | None:
    """The share of the machine's CPU time spent running something (all processes: gateways,
    generator, Redis), neither idle nor stolen; None when /proc/stat says nothing. Open loop at
    half the closed-loop saturation is not half the machine: alone, requests share fewer model
    calls than at c=32."""
    total = after[0] - before[0]
    idle = (after[2] - before[2]) + (after[1] - before[1])
    return (total - idle) / total if total > 0 else None


def run(settings: Settings, url: str, share: float, duration: float, runs: int, saturation: float | None) -> str:
    lines = []
    with serving(url):
        if saturation is None:
            sweep = loadgen.run_levels(url, [1, 4, 8, 16, 32], 8.0, 100, settings.data_dir)
            saturation = best_rps([asdict(r) for r in sweep])
            lines += ["closed-loop sweep (for saturation):", loadgen.format_table(sweep, stages=False), ""]
        rate = round(saturation * share)
        lines.append(f"saturation {saturation:.0f} model-scored rps; {runs} open-loop run(s) of {duration:.0f} s "
                     f"at {share:.0%} = {rate}/s")  # fmt: skip
        head = ("| run | requests | model-scored | past deadline | shed | other fallbacks "
                "| client p99 / p99.9 / max ms | sent late, max ms | gateway p99.9 ms | loop lag p99 / max ms "
                "| loop waited for a CPU (all gateway processes), total / worst tick ms | machine busy | steal "
                "| GC collections (mean ms) by generation |")  # fmt: skip
        lines += [head, "|---" * 14 + "|"]
        for i in range(runs):
            before, cpu0 = scrape(url), cpu_times()
            r = loadgen.run_rates(url, [rate], duration, 100, settings.data_dir)[0]
            cpu1 = cpu_times()
            steal, busy = steal_share(cpu0, cpu1), busy_share(cpu0, cpu1)
            w = window_stats(before, scrape(url))
            fb: dict[str, int] = w["fallbacks"]  # type: ignore[assignment]
            other = sum(v for k, v in fb.items() if k not in PAST_DEADLINE and k != Reason.SHED)
            gc: dict[str, tuple[int, float]] = w["gc"]  # type: ignore[assignment]
            gcs = ", ".join(f"gen{g}: {n} ({ms:.1f})" for g, (n, ms) in sorted(gc.items())) or "none"
            lines.append(f"| {i + 1} | {r.requests} | {r.model_scored} | {r.deadline} | {r.shed} | {other} "
                         f"| {r.p99_ms:.1f} / {r.p999_ms:.1f} / {r.max_ms:.1f} | {r.late_ms:.1f} "
                         f"| {w['gateway_p999_ms']:.1f} | {w['lag_p99_ms']:.1f} / {w['lag_max_ms']:.1f} "
                         f"| {_or_na(w['cpu_wait_ms'], '.0f')} / {_or_na(w['cpu_wait_max_ms'], '.1f')} "
                         f"| {_or_na(busy, '.0%')} | {_or_na(steal, '.1%')} | {gcs} |")  # fmt: skip
    return "\n".join(lines)


def main(url: str, share: float, duration: float, runs: int, saturation: float | None, out: Path | None) -> str:
    text = run(Settings(), url, share, duration, runs, saturation)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return text
