"""`ctr serve --service NAME --port P` (one service alone, as a Kubernetes Deployment runs it)
and `ctr cluster` (every service a process of its own on loopback; `make cluster`)."""

from __future__ import annotations

import os
import signal
import time

import click


@click.command()
@click.option("--service", "name", required=True,
              help="CTRGateway, FeatureService, FallbackService or CTRModel (or ctr_gateway, ...).")  # fmt: skip
@click.option("--port", type=int, default=3000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
def serve(name: str, port: int, host: str) -> None:
    """Serve one service alone; a gateway takes its replicas from CTR_MODEL_URLS and FeatureService
    and FallbackService from CTR_FEATURES_URL and CTR_FALLBACK_URL."""
    from ctr.cli.launch import serve_command

    try:
        cmd, env = serve_command(name, host, port, os.environ)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    os.execve(cmd[0], cmd, env)


@click.group(invoke_without_command=True)
@click.option("--replicas", type=int, default=3, show_default=True, help="CTRModel replicas.")
@click.option("--port", type=int, default=3000, show_default=True, help="The gateway's port (others follow).")
@click.pass_context
def cluster(ctx: click.Context, replicas: int, port: int) -> None:
    """Gateway, FeatureService, FallbackService and N CTRModel replicas, each a process on loopback;
    prints their URLs and runs until Ctrl-C (or `ctr cluster stop` / `make cluster-stop`)."""
    if ctx.invoked_subcommand is not None:
        return
    from ctr.bench import cluster as lc

    if replicas < 1:
        raise click.UsageError("--replicas must be >= 1")
    lc.stop_saved()  # a previous run's leftovers
    stop = {"now": False}

    def on_term(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_term)
    with lc.running(replicas, port) as c:
        c.save()
        for p in c.procs:
            click.echo(f"{p.name:<22} {p.url}   (log {p.log})")
        click.echo(f"gateway: {c.procs[-1].url}/predict; Ctrl-C or `make cluster-stop` stops all")
        try:
            while not stop["now"] and all(p.popen.poll() is None for p in c.procs):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        click.echo("stopping ...")
    lc.STATE.unlink(missing_ok=True)


@cluster.command("stop")
def cluster_stop() -> None:
    """Stop a running `ctr cluster` (its recorded processes)."""
    from ctr.bench import cluster as lc

    stopped = lc.stop_saved()
    click.echo("\n".join(f"stopped {s}" for s in stopped) or "no cluster running")
