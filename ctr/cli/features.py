"""`ctr features`: load, write, warm, and run the write-behind writer."""

from __future__ import annotations

import json

import click

from ctr.settings import Settings


def _settings() -> Settings:
    return Settings()


@click.group()
def features() -> None:
    """The feature store."""


@features.command("load")
@click.option("--force", is_flag=True)
def features_load(force: bool) -> None:
    """Load user and ad features from the click log into the L3 database."""
    from ctr.cli import provision

    n = provision.ensure_features(_settings(), force=force)
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

    from ctr.features import schema
    from ctr.features.stack import opened
    from ctr.features.writes import validate_rows

    s = _settings()
    fs = schema.DEFAULT.configured(s.ttl_s, s.feature_versions)  # the group's key carries its version
    try:
        g, rows = validate_rows(group, [{"id": entity_id, "values": json.loads(values)}], fs)
    except (ValueError, json.JSONDecodeError) as exc:
        raise click.BadParameter(str(exc)) from None

    async def go() -> str:
        async with opened(s) as stack:
            done = await stack.writer.put(g, rows)
        return done.mode + (", caches not updated: Redis did not answer" if done.cache_deferred else "")

    click.echo(f"{g.name} {entity_id}: written ({asyncio.run(go())})")


@features.command("warm")
@click.option("--top-users", type=int, default=None, help="K (default CTR_WARM_TOP_USERS).")
def features_warm(top_users: int | None) -> None:
    """Warm L2 (Redis) with the warm set: top-K users, active ads (each process warms its own L1)."""
    import asyncio

    from ctr.features.stack import opened
    from ctr.features.warm import warm

    s = _settings()

    async def go() -> dict[str, object]:
        async with opened(s) as stack:
            return await warm(stack.store, s.warm_top_users if top_users is None else top_users, stack.schema)

    click.echo(json.dumps(asyncio.run(go())))


@features.command("writer")
@click.option("--consumer", default=None, help="Consumer name in the stream's group (default: unique per process).")
def features_writer(consumer: str | None) -> None:
    """Run the write-behind writer: commit queued feature writes to L3 until stopped."""
    import asyncio
    import signal

    from ctr.features.stack import opened
    from ctr.features.writes import consumer_name, run_writer

    async def go() -> int:
        async with opened(_settings()) as stack:
            if stack.writer.redis is None:
                raise click.UsageError("the writer needs CTR_REDIS_URL to name a plain Redis (redis://…)")
            stop = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                asyncio.get_running_loop().add_signal_handler(sig, stop.set)
            return await run_writer(stack.writer.redis, stack.store.origin, consumer or consumer_name(), stop,
                                    fs=stack.schema, on_commit=stack.writer.refresh)  # fmt: skip

    click.echo(f"{asyncio.run(go())} rows committed")
