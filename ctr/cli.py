"""The `ctr` command."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import click

from ctr.settings import PROJECT_ROOT, Settings
from models.data import DataConfig


def _settings() -> Settings:
    return Settings()


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log progress.")
def main(verbose: bool) -> None:
    """ctr-serve: CTR prediction service tools."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    os.environ.setdefault("BENTOML_HOME", str(PROJECT_ROOT / "bentoml_home"))


def _data_options(f):  # type: ignore[no-untyped-def]
    """The click log's size options, shared by `setup` and `data generate`."""
    defaults = DataConfig()
    for flag, name in reversed(_DATA_FLAGS):
        f = click.option(flag, name, type=type(getattr(defaults, name)), default=getattr(defaults, name),
                         show_default=True)(f)  # fmt: skip
    return f


_DATA_FLAGS = (
    ("--users", "n_users"),
    ("--ads", "n_ads"),
    ("--impressions", "n_impressions"),
    ("--zipf", "zipf_exponent"),
    ("--seed", "seed"),
)


@main.command()
@_data_options
@click.option("--max-epochs", type=int, default=None, help="Default: the training config's (10).")
@click.option("--force", is_flag=True, help="Regenerate, retrain and reload even when up to date.")
def setup(force: bool, max_epochs: int | None, **data_cfg: Any) -> None:
    """Everything `make serve` needs: click log, trained model, loaded feature database."""
    from ctr import setup as steps

    s = _settings()
    steps.ensure_data(s.data_dir, force=force, **data_cfg)
    tag = steps.ensure_model(s.data_dir, s.model_tag, force=force, **_epochs(max_epochs))
    steps.ensure_features(s, force=force)
    click.echo(f"ready: model {tag}, data {s.data_dir}, features {s.resolved_database_url}")


def _epochs(max_epochs: int | None) -> dict[str, int]:
    return {} if max_epochs is None else {"max_epochs": max_epochs}


@main.group()
def data() -> None:
    """The click log."""


@data.command("generate")
@_data_options
@click.option("--force", is_flag=True)
def data_generate(force: bool, **cfg: Any) -> None:
    """Generate the synthetic click log into CTR_DATA_DIR."""
    from ctr import setup as steps

    meta = steps.ensure_data(_settings().data_dir, force=force, **cfg)
    click.echo(json.dumps(meta, indent=2))


@main.command()
@click.option("--max-epochs", type=int, default=None, help="Default: the training config's (10).")
@click.option("--force", is_flag=True, help="Train even if a model of this data is stored.")
def train(max_epochs: int | None, force: bool) -> None:
    """Train DeepFM on the click log and save it to the BentoML model store."""
    from ctr import modelstore
    from ctr import setup as steps

    s = _settings()
    tag = steps.ensure_model(s.data_dir, s.model_tag, force=force, **_epochs(max_epochs))
    click.echo(json.dumps({"tag": tag, **modelstore.artifacts(tag).metadata["metrics"]}, indent=2))


@main.group()
def features() -> None:
    """The feature store."""


@features.command("load")
@click.option("--force", is_flag=True)
def features_load(force: bool) -> None:
    """Load user and ad features from the click log into the L3 database."""
    from ctr import setup as steps

    n = steps.ensure_features(_settings(), force=force)
    click.echo(f"{n} rows written")


@features.command("put")
@click.argument("group")
@click.argument("entity_id")
@click.argument("values")
def features_put(group: str, entity_id: str, values: str) -> None:
    """Write one entity's GROUP features, VALUES as a JSON list, in the group's write mode.

    Example: ctr features put ad_stats a7 '[5200, 210]'
    """
    import asyncio

    from ctr import wiring
    from ctr.features.writes import validate_rows

    try:
        g, rows = validate_rows(group, [{"id": entity_id, "values": json.loads(values)}])
    except (ValueError, json.JSONDecodeError) as exc:
        raise click.BadParameter(str(exc)) from None

    async def go() -> str:
        async with wiring.opened(_settings()) as stack:
            return await stack.writer.put(g, rows)

    click.echo(f"{g.name} {entity_id}: written ({asyncio.run(go())})")


@features.command("warm")
@click.option("--top-users", type=int, default=None, help="K (default CTR_WARM_TOP_USERS).")
def features_warm(top_users: int | None) -> None:
    """Warm L2 (Redis) with the warm set: top-K users, active ads (each process warms its own L1)."""
    import asyncio

    from ctr import wiring
    from ctr.features.warm import warm

    s = _settings()

    async def go() -> dict[str, object]:
        async with wiring.opened(s) as stack:
            return await warm(stack.store, s.warm_top_users if top_users is None else top_users)

    click.echo(json.dumps(asyncio.run(go())))


@features.command("writer")
@click.option("--consumer", default=None, help="Consumer name in the stream's group (default: writer-<host>).")
def features_writer(consumer: str | None) -> None:
    """Run the write-behind writer: commit queued feature writes to L3 until stopped."""
    import asyncio
    import signal
    import socket

    from ctr import wiring
    from ctr.features.writes import run_writer

    async def go() -> int:
        async with wiring.opened(_settings()) as stack:
            if stack.writer.redis is None:
                raise click.UsageError("the writer needs CTR_REDIS_URL to name a plain Redis (redis://…)")
            stop = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                asyncio.get_running_loop().add_signal_handler(sig, stop.set)
            name = consumer or f"writer-{socket.gethostname()}"
            return await run_writer(stack.writer.redis, stack.store.origin, name, stop)

    click.echo(f"{asyncio.run(go())} rows committed")


@main.group()
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
    help="Also measure the monolith peer and the in-process limit.",
)
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/bench_e2e.json"), show_default=True)
def bench_e2e(url: str, concurrency: str, duration: float, n_ads: int, peers: bool, out: Path) -> None:
    """Drive POST /predict with 1 user x N ads (Zipf users and ads) at several concurrency levels;
    print p50/p99/rps and the stage breakdown, beside a monolith peer and the in-process limit."""
    from ctr import e2e

    click.echo(e2e.run(_settings(), url, [int(c) for c in concurrency.split(",")], duration, n_ads, peers, out))


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
    from ctr import profile

    click.echo(profile.run(_settings(), url, concurrency, duration, n_ads, rate, out))


@main.command()
@click.option("--url", default="http://127.0.0.1:3000", show_default=True, help="Started here when not answering.")
@click.option("--users", type=int, default=16, show_default=True, help="Concurrent Locust users.")
@click.option("--duration", default="30s", show_default=True, help="Locust run time, e.g. 30s, 2m.")
@click.option("--out", default="reports/loadtest", show_default=True, help="Prefix of the CSV and HTML reports.")
def loadtest(url: str, users: int, duration: str, out: str) -> None:
    """A bounded headless Locust run (loadtest/locustfile.py) with CSV and HTML reports."""
    import subprocess
    import sys

    from ctr.local_server import serving
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


@main.command()
@click.option("--peak-qps", type=float, required=True, help="Peak requests per second to serve.")
@click.option("--qps-per-server", type=float, default=None, help="Default: best rps at the p99 target in --bench.")
@click.option("--p99-ms", type=float, default=50.0, show_default=True, help="The p99 target.")
@click.option("--utilization", type=float, default=0.6, show_default=True, help="Target utilization of a server.")
@click.option("--bench", type=click.Path(path_type=Path), default=Path("reports/bench_e2e.json"), show_default=True)
def capacity(peak_qps: float, qps_per_server: float | None, p99_ms: float, utilization: float, bench: Path) -> None:
    """Servers needed = peak QPS / (QPS per server x utilization target)."""
    from ctr.capacity import plan

    click.echo(plan(peak_qps, qps_per_server, p99_ms, utilization, bench))


@bench.command("features")
@click.option("--requests", "n", type=int, default=2000, show_default=True)
@click.option("--cluster", "cluster_url", default=None, help="redis+cluster://host:port: also compare key layouts.")
def bench_features(n: int, cluster_url: str | None) -> None:
    """Feature tiers on 1 user + 100 ads: L1/L2/L3 latency, hit-rate table, warm hit rate, memory."""
    from ctr import bench_features as bf

    click.echo(bf.main(n=n, cluster_url=cluster_url))


@main.group("eval")
def eval_() -> None:
    """Offline evaluations of the served model."""


@eval_.command("degradation")
def eval_degradation() -> None:
    """AUC and logloss on the test split: full model, feature groups defaulted, fallbacks."""
    from ctr import modelstore
    from models import degradation

    s = _settings()
    click.echo(degradation.format_table(degradation.table(s.data_dir, modelstore.artifacts(s.model_tag))))


@bench.command("batching")
@click.option("--requests", "n", type=int, default=300, show_default=True, help="Calls per batch size.")
@click.option("--budget-ms", type=float, default=3.0, show_default=True, help="Inference budget for B*.")
def bench_batching(n: int, budget_ms: float) -> None:
    """CTRModel through its own server at batch 1/32/128/256: latency, throughput, T_setup, T_per, B*."""
    from ctr import bench_batching as bb

    click.echo(bb.run(n, budget_ms))


def _register_ship() -> None:
    from ctr.ship import cli as ship_cli

    main.add_command(ship_cli)


_register_ship()
