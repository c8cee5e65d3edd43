"""`ctr bench`, `ctr loadtest`, `ctr capacity`: benchmarks that print figures, and planning."""

from __future__ import annotations

from pathlib import Path

import click

from ctr.settings import Settings


def _settings() -> Settings:
    return Settings()


@click.group()
def bench() -> None:
    """Benchmarks that print figures (loopback only, bounded in time)."""


@bench.command("e2e")
@click.option("--url", default="http://127.0.0.1:3000", show_default=True, help="Started here when not answering.")
@click.option("--concurrency", default="1,4,8,16,32", show_default=True, help="Comma-separated levels.")
@click.option("--duration", type=float, default=10.0, show_default=True, help="Seconds per level.")
@click.option("--ads", "n_ads", type=int, default=100, show_default=True)
@click.option(
    "--peers/--no-peers",
    default=True,
    show_default=True,
    help="Also measure the monolith peers, the in-process limit and the HTTP floor.",
)
@click.option(
    "--rates",
    default="auto",
    show_default=True,
    help="Open-loop arrival rates (requests/s, comma-separated); auto: 50/70/90/110 % of the closed loop's "
    "best model-scored rps; none: closed loop only.",
)
@click.option("--passes", type=int, default=2, help="Alternated passes: service, peers; peers, service.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/bench_e2e.json"), show_default=True)
def bench_e2e(
    url: str, concurrency: str, duration: float, n_ads: int, peers: bool, rates: str, passes: int, out: Path
) -> None:
    """Drive POST /predict with 1 user x N ads (Zipf users and ads) at several concurrency levels
    (closed loop), then at fixed arrival rates (open loop); print model-scored and fallback
    rps apart, p50/p99/p99.9/max and the stage breakdown, beside a monolith peer and the
    in-process limit per core. Each peer runs as many uvicorn workers as the gateway has processes."""
    from ctr.bench import e2e

    levels = [int(c) for c in concurrency.split(",")]
    open_rates = None if rates == "auto" else [] if rates == "none" else [float(r) for r in rates.split(",")]
    click.echo(e2e.run(_settings(), url, levels, duration, n_ads, peers, out, open_rates, passes))


@bench.command("api")
@click.option("--url", default="http://127.0.0.1:3000", show_default=True, help="Started here when not answering.")
@click.option("--concurrency", default="1,8", show_default=True, help="Comma-separated levels.")
@click.option("--duration", type=float, default=10.0, show_default=True, help="Seconds per level and route.")
@click.option("--ads", "n_ads", type=int, default=100, show_default=True)
@click.option("--passes", type=int, default=2, help="Alternating passes over both routes.")
def bench_api(url: str, concurrency: str, duration: float, n_ads: int, passes: int) -> None:
    """POST /predict (the lean mount) beside POST /bentoml/predict (the BentoML API its clients
    call), same requests, same gateway: model-scored rps and p50/p99 of each."""
    from ctr.bench import api

    levels = [int(c) for c in concurrency.split(",")]
    click.echo(api.run(_settings(), url, levels, duration, n_ads, passes))


@bench.command("stages")
@click.option("--requests", "n", type=int, default=3000, show_default=True, help="Calls per stage.")
@click.option("--batch", type=int, default=1, show_default=True, help="Requests per forward pass (the coalescer's).")
def bench_stages(n: int, batch: int) -> None:
    """The gateway's own CPU per request of 1 user x 100 ads, stage by stage, in this process
    (every feature in L1, no HTTP): parse, lookup, transform, bookkeeping, response."""
    from ctr.bench import stages

    click.echo(stages.run(_settings(), n, batch))


@bench.command("http")
@click.option("--requests", "n", type=int, default=2000, show_default=True, help="Calls per variant and round.")
@click.option("--rounds", type=int, default=5, show_default=True, help="Alternated rounds.")
def bench_http(n: int, rounds: int) -> None:
    """What BentoML's ASGI stack adds to a POST /predict, layer by layer, in this process (no HTTP):
    its whole stack, each middleware left out in turn, its router alone, and the fast path."""
    from ctr.bench import http_layers

    click.echo(http_layers.run(n, rounds))


@bench.command("l1")
@click.option("--against", default=None, help="A git ref whose L1 lookup runs alternated with this tree's.")
@click.option("--rounds", type=int, default=5, show_default=True, help="Alternated runs of each tree.")
@click.option("--requests", "n", type=int, default=5000, show_default=True, help="Lookups per run.")
def bench_l1(against: str | None, rounds: int, n: int) -> None:
    """The L1 lookup of 1 user x 100 ads (all hits), in child processes, alternated with --against's."""
    from ctr.bench import l1

    click.echo(l1.run(against, rounds, n))


@bench.command("steady")
@click.option("--url", default="http://127.0.0.1:3000", show_default=True, help="Started here when not answering.")
@click.option("--share", type=float, default=0.5, show_default=True, help="Offered rate, as a share of saturation.")
@click.option("--duration", type=float, default=60.0, show_default=True, help="Seconds per run.")
@click.option("--runs", type=int, default=3, show_default=True)
@click.option("--saturation", type=float, default=None, help="Model-scored rps at saturation (default: measure it).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/bench_steady.md"), show_default=True)
def bench_steady(url: str, share: float, duration: float, runs: int, saturation: float | None, out: Path) -> None:
    """Open-loop runs at a share of saturation: deadline fallbacks, sheds, the client's tail and
    lateness, the gateway's own p99.9, event-loop lag, run-queue wait and GC pauses, and the
    machine's busy and steal shares over each run."""
    from ctr.bench import steady

    click.echo(steady.main(url, share, duration, runs, saturation, out))


@bench.command("overload")
@click.option("--port", type=int, default=0, help="Where to start each service (default: a free port).")
@click.option("--duration", type=float, default=8.0, show_default=True, help="Seconds per level.")
@click.option("--ads", "n_ads", type=int, default=100, show_default=True)
@click.option("--factors", default="2,4", show_default=True, help="Multiples of the measured saturation rate.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/bench_overload.json"), show_default=True)
def bench_overload(port: int, duration: float, n_ads: int, factors: str, out: Path) -> None:
    """Past saturation, before and after the concurrency limit: the service started with
    CTR_LIMIT=off, then with the default limit (and CTR_OVERLOAD=reject); open loop at each
    multiple of the saturation rate (measured first); p99, model-scored rps, fallback share."""
    from ctr.bench import overload

    click.echo(overload.run(_settings(), port, duration, n_ads, [float(f) for f in factors.split(",")], out))


@bench.command("profile")
@click.option("--url", default="http://127.0.0.1:3000", show_default=True, help="Where to start the service.")
@click.option("--concurrency", type=int, default=8, show_default=True)
@click.option("--duration", type=float, default=10.0, show_default=True, help="Seconds of sampling.")
@click.option("--ads", "n_ads", type=int, default=100, show_default=True)
@click.option("--rate", type=int, default=200, show_default=True, help="py-spy samples per second.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/profile"), show_default=True)
def bench_profile(url: str, concurrency: int, duration: float, n_ads: int, rate: int, out: Path) -> None:
    """Start the service, load it, and print where each service process spends its CPU (py-spy),
    by package; the raw stacks are kept for flame graphs."""
    from ctr.bench import profile

    click.echo(profile.run(_settings(), url, concurrency, duration, n_ads, rate, out))


@click.command()
@click.option("--url", default="http://127.0.0.1:3000", show_default=True, help="Started here when not answering.")
@click.option("--users", type=int, default=16, show_default=True, help="Concurrent Locust users.")
@click.option("--duration", default="30s", show_default=True, help="Locust run time, e.g. 30s, 2m.")
@click.option("--out", default="reports/loadtest", show_default=True, help="Prefix of the CSV and HTML reports.")
def loadtest(url: str, users: int, duration: str, out: str) -> None:
    """A bounded headless Locust run (loadtest/locustfile.py) with CSV and HTML reports."""
    import subprocess
    import sys

    from ctr.bench.local_server import serving
    from ctr.settings import PROJECT_ROOT

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    locust = Path(sys.executable).parent / "locust"
    cmd = [str(locust), "-f", str(PROJECT_ROOT / "loadtest" / "locustfile.py"), "--headless", "-u", str(users),
           "-r", str(users), "-t", duration, "--host", url, "--csv", out, "--html", f"{out}.html",
           "--only-summary"]  # fmt: skip
    with serving(url):
        rc = subprocess.run(cmd, check=False).returncode
    click.echo(f"reports: {out}_stats.csv, {out}.html")
    raise SystemExit(rc)


@click.command()
@click.option("--peak-qps", type=float, required=True, help="Peak requests per second to serve.")
@click.option("--qps-per-server", type=float, default=None, help="Default: best rps at the p99 target in --bench.")
@click.option("--p99-ms", type=float, default=50.0, show_default=True, help="The p99 target.")
@click.option("--utilization", type=float, default=0.6, show_default=True, help="Target utilization of a server.")
@click.option("--bench", type=click.Path(path_type=Path), default=Path("reports/bench_e2e.json"), show_default=True)
def capacity(peak_qps: float, qps_per_server: float | None, p99_ms: float, utilization: float, bench: Path) -> None:
    """Servers needed = peak QPS / (QPS per server x utilization target)."""
    from ctr.bench.capacity import plan

    click.echo(plan(peak_qps, qps_per_server, p99_ms, utilization, bench))


@bench.command("features")
@click.option("--requests", "n", type=int, default=2000, show_default=True)
@click.option("--cluster", "cluster_url", default=None, help="redis+cluster://host:port: also compare key layouts.")
def bench_features(n: int, cluster_url: str | None) -> None:
    """Feature tiers on 1 user + 100 ads: L1/L2/L3 latency, hit-rate table, warm hit rate, memory."""
    from ctr.bench import features as bf

    click.echo(bf.main(n=n, cluster_url=cluster_url))


@bench.command("pool")
@click.option("--policies", default=",".join(("round_robin", "least_conn", "weighted", "consistent_hash", "peak_ewma")),
              show_default=True, help="Comma-separated CTR_LB_POLICY values.")  # fmt: skip
@click.option("--concurrency", type=int, default=8, show_default=True)
@click.option("--duration", type=float, default=8.0, show_default=True, help="Seconds per policy.")
@click.option("--ads", "n_ads", type=int, default=100, show_default=True)
@click.option("--delay-ms", type=float, default=10.0, show_default=True, help="Added to every call of replica 2.")
@click.option("--weights", default="2,2,1", show_default=True, help="CTR_MODEL_WEIGHTS for the weighted policy.")
@click.option("--ejection", type=click.Choice(["on", "off", "both"]), default="both", show_default=True,
              help="Health ejection on (default settings), off (CTR_MAX_EJECTED_PERCENT=0), or both.")  # fmt: skip
def bench_pool(policies: str, concurrency: int, duration: float, n_ads: int, delay_ms: float, weights: str,
               ejection: str) -> None:  # fmt: skip
    """Per policy, three replicas (one slowed): client p50/p99, fallback share, each replica's share."""
    from ctr.bench import pool

    modes = {"on": [True], "off": [False], "both": [True, False]}[ejection]
    click.echo(pool.run(_settings(), policies.split(","), concurrency, duration, n_ads, delay_ms, weights, modes))


@bench.command("batching")
@click.option("--requests", "n", type=int, default=300, show_default=True, help="Calls per batch size.")
@click.option("--budget-ms", type=float, default=3.0, show_default=True, help="Inference budget for B*.")
def bench_batching(n: int, budget_ms: float) -> None:
    """CTRModel through its own server at batch 1/32/128/256: latency, throughput, T_setup, T_per, B*."""
    from ctr.bench import batching as bb

    click.echo(bb.run(n, budget_ms))


@bench.command("coalescing")
@click.option("--concurrency", default="1,8,32", show_default=True, help="Comma-separated closed-loop levels.")
@click.option("--duration", type=float, default=5.0, show_default=True, help="Seconds per run.")
@click.option("--passes", type=int, default=4, show_default=True, help="Alternated runs of each window per level.")
@click.option("--http/--in-process", default=False, show_default=True, help="Over HTTP: a server per window.")
def bench_coalescing(concurrency: str, duration: float, passes: int, http: bool) -> None:
    """The deadline-aware batching window beside the fixed one (CTR_BATCH_WINDOW), in process,
    closed loop: p50/p99, model-scored rps, fallbacks, rows per model call."""
    from ctr.bench import coalescing

    click.echo(coalescing.run(_settings(), [int(c) for c in concurrency.split(",")], duration, passes, http))


@bench.command("precision")
@click.option(
    "--calls", type=int, default=2000, show_default=True, help="Forward passes timed at batch 1 (a quarter at 256)."
)
def bench_precision(calls: int) -> None:
    """The network in each precision this device runs: forward at batch 1 and 256, test AUC, logloss, ECE."""
    from ctr.bench import precision

    click.echo(precision.run(_settings(), calls))
