"""`ctr canary status|start|pause|resume|promote|rollback`: the gateway's admin API over HTTP."""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

_url = click.option("--url", default="http://127.0.0.1:3000", show_default=True, help="The gateway.")
_token = click.option(
    "--token", default=lambda: os.environ.get("CTR_ADMIN_TOKEN", ""), help="Bearer token [default: $CTR_ADMIN_TOKEN]."
)


def call(url: str, token: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One admin call; a non-2xx answer becomes a ClickException with the server's message."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url.rstrip("/") + path,
        data=data,
        method="GET" if body is None else "POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise click.ClickException(f"{exc.code}: {exc.read().decode(errors='replace')}") from None
    except OSError as exc:
        raise click.ClickException(f"cannot reach {url}: {exc}") from None


def when(epoch_s: float) -> str:
    """A wall-clock time a person reads: `2026-12-03 07:40:12 UTC`."""
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# How each gate's estimate reads (ctr/serving/canary/stats.py): its unit, and the range a
# difference of shares can take (its confidence interval is clipped to it).
_MS, _DIFF, _LOG_RATIO = "ms", "difference", "log ratio"
_KINDS = {"latency": _MS, "errors": _DIFF, "ctr": _LOG_RATIO, "calibration": _LOG_RATIO}


def gate_figures(g: dict[str, Any]) -> str:
    """`estimate [lo, hi]` in the gate's own terms: the canary's p99 minus the reference's in ms,
    the error-rate difference in percentage points within [-100, 100], the CTR and calibration
    log ratios as ratios; `–` where there is no estimate yet."""
    est, (lo, hi) = g.get("estimate"), g.get("interval") or (None, None)
    kind = _KINDS.get(g["gate"])
    if est is None:
        return "estimate – (not enough data yet)"
    if kind == _LOG_RATIO:
        ratio = [None if x is None else math.exp(x) for x in (est, lo, hi)]
        return "ratio " + _bracket(*ratio, lambda x: f"{x:.3f}")
    if kind == _MS:
        return "p99 difference " + _bracket(est, lo, hi, lambda x: f"{x:+.1f} ms")
    clip = [None if x is None else min(max(x, -1.0), 1.0) for x in (est, lo, hi)]
    return "error rate difference " + _bracket(*clip, lambda x: f"{100 * x:+.2f} pp")


def _bracket(est: float | None, lo: float | None, hi: float | None, f: Callable[[float], str]) -> str:
    show = lambda x: "–" if x is None else f(x)  # noqa: E731
    return f"{show(est)} [{show(lo)}, {show(hi)}]"


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f} ms"


def _summary(s: dict[str, Any]) -> str:
    if s.get("status") == "none":
        return "no rollout" + ("" if s.get("store") == "ok" else f" (store {s.get('store')})")
    lines = [
        f"rollout {s['id']}: {s['status']}, phase {s['phase']}, canary share {s['share']:.1%}",
        f"  stable {s['stable']['tag']}  canary {s['canary']['tag']} {' '.join(s['canary']['urls'])}",
    ]
    if s.get("decided") == "here":
        lines.append(f"  {s['note']}")
    elif s.get("store") == "unavailable":
        doing = "every user on stable" if s.get("everyone_stable") else "serving the last known split"
        lines.append(f"  store unavailable ({s.get('store_error')}): {doing}")
    if s.get("stable_from"):
        lines.append(f"  stable is the canary promoted by rollout {s['stable_from']}")
    for arm, a in s.get("arms", {}).items():
        lines.append(
            f"  {arm:6s} requests {a['requests']:,} errors {a['errors']:,} impressions {a['impressions']:,} "
            f"clicks {a['clicks']:,} p99 {_ms(a['p99_ms'])}"
        )
    for g in s.get("gates", {}).values():
        lines.append(f"  gate {g['gate']:11s} {g['verdict']:12s} {gate_figures(g)}")
    if sh := s.get("shadow"):
        lo, hi = sh.get("logloss_diff_interval") or (None, None)
        figures = _bracket(sh.get("logloss_diff_rel"), lo, hi, lambda x: f"{100 * x:+.2f} %")
        lines.append(f"  shadow {sh.get('pairs_joined', 0):,} pairs joined, {sh.get('verdict')}: log loss {figures}")
    if s.get("reason"):
        lines.append(f"  reason: {s['reason']}")
    for h in s.get("history", [])[-5:]:
        lines.append(
            f"  {when(h['at'])} {h['action']} (phase {h['phase']}, {h['share']:.1%}) by {h['by']}: {h['reason']}"
        )
    return "\n".join(lines)


@click.group()
def canary() -> None:
    """Canary releases: a second model pool takes a sticky share of users, gated on evidence."""


@canary.command("status")
@_url
@_token
@click.option("--json", "as_json", is_flag=True, help="The raw GET /admin/canary answer.")
def status(url: str, token: str, as_json: bool) -> None:
    """Phase, share, per-arm counts, gate estimates with intervals, decision history."""
    s = call(url, token, "/admin/canary")
    click.echo(json.dumps(s, indent=2) if as_json else _summary(s))


@canary.command("start")
@_url
@_token
@click.option("--model-tag", required=True, help="The canary's BentoML model tag (ctr_model:...).")
@click.option("--canary-url", "urls", multiple=True, help="A canary CTRModel replica URL (repeat).")
@click.option(
    "--plan-scale",
    type=float,
    default=1.0,
    show_default=True,
    help="Multiplies the default phase durations (1 h, 2 h, 4 h, 8 h); 0.0167 = minutes.",
)
@click.option(
    "--shadow-s",
    type=float,
    default=0.0,
    show_default=True,
    help="A shadow phase first (seconds, times --plan-scale): the canary scores a sample of stable's "
    "requests off the response path, judged on the same impressions (docs/canary.md).",
)
@click.option(
    "--plan-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A plan as JSON (phases or a ramp; see docs/canary.md).",
)
def start(
    url: str,
    token: str,
    model_tag: str,
    urls: tuple[str, ...],
    plan_scale: float,
    shadow_s: float,
    plan_file: Path | None,
) -> None:
    """Start a rollout of MODEL_TAG at the plan's first share."""
    body: dict[str, Any] = {"model_tag": model_tag, "urls": list(urls), "plan_scale": plan_scale}
    if shadow_s:
        body["shadow_s"] = shadow_s
    if plan_file is not None:
        body["plan"] = json.loads(plan_file.read_text())
    click.echo(_summary(call(url, token, "/admin/canary/start", body)))


def _action(name: str, doc: str) -> click.Command:
    @_url
    @_token
    @click.option("--reason", default=None, help="Recorded in the decision history.")
    def cmd(url: str, token: str, reason: str | None) -> None:
        body = {} if reason is None else {"reason": reason}
        click.echo(_summary(call(url, token, f"/admin/canary/{name}", body)))

    cmd.__doc__ = doc
    return click.command(name)(cmd)


for _name, _doc in (
    ("pause", "Freeze the split and the phase clock."),
    ("resume", "Continue a paused or held rollout."),
    ("promote", "Make the canary the new stable now."),
    ("rollback", "Send every user back to stable now."),
):
    canary.add_command(_action(_name, _doc))


@canary.command("attack")
@_url
@_token
@click.option("--users", type=int, default=400, show_default=True, help="Honest answers to collect first.")
@click.option("--replays", type=int, default=3000, show_default=True, help="Replays of one canary id.")
@click.option(
    "--sign",
    is_flag=True,
    help="Also make over-age and other-rollout ids with the key derived from the admin token (a gateway "
    "without CTR_REQUEST_ID_KEY); without it only what a client can do without the key is tried.",
)
def attack(url: str, token: str, users: int, replays: int, sign: bool) -> None:
    """Try to steer a running rollout through /feedback (replays, unserved ads, forged, over-age and
    other-rollout ids, lying scores) and show that no gate moved. Loopback only; run it on a
    gateway with no other traffic (other feedback would move the counters it compares)."""
    import asyncio

    from ctr.api.request_id import resolve_key
    from ctr.bench.canary_attack import attack as run

    key = resolve_key("", token, Path(".")) if sign and token else None  # derived: no file is read
    try:
        rep = asyncio.run(run(url, token, key, users=users, replays=replays))
    except (RuntimeError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    honest = ", ".join(f"{arm} {n}" for arm, n in rep.honest.items())
    click.echo(f"honest feedback counted: {honest}")
    for line in rep.lines():
        click.echo(line)
    if rep.moved():
        raise SystemExit(1)


@canary.command("simulate")
@click.option(
    "--aa-seeds", type=int, default=240, show_default=True, help="A/A rollouts per traffic and spread (24 start hours)."
)
@click.option("--margin-seeds", type=int, default=240, show_default=True, help="Rollouts per gate at its margin.")
@click.option(
    "--rps", type=float, multiple=True, default=(10_000.0, 1_000.0), show_default=True, help="Requests/s (repeat)."
)
@click.option("--interval-s", type=float, default=600.0, show_default=True, help="Looks of the A/A and margin grids.")
@click.option("--bad-interval-s", type=float, default=60.0, show_default=True, help="Looks of the bad canaries.")
@click.option("--workers", type=int, default=2, show_default=True, help="Processes for the grids.")
@click.option("--no-models", is_flag=True, help="Skip training: no bad/good canaries, only A/A and margins.")
@click.option("--impressions", type=int, default=60_000, show_default=True, help="Size of the generated training log.")
@click.option(
    "--on-timeout",
    type=click.Choice(["hold", "rollback"]),
    default="hold",
    show_default=True,
    help="What an inconclusive phase does past its maximum time.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the generated log here (reused when present).",
)
@click.option(
    "--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Every outcome as JSON."
)
@click.option(
    "--shadow-seeds",
    type=int,
    default=2,
    show_default=True,
    help="Shadow phase: good and at-margin canaries per start hour and spread (0: no shadow checks).",
)
@click.option("--shadow-only", is_flag=True, help="Only the bad canaries (split and shadow) and the shadow checks.")
def simulate(
    aa_seeds: int,
    margin_seeds: int,
    rps: tuple[float, ...],
    interval_s: float,
    bad_interval_s: float,
    workers: int,
    no_models: bool,
    impressions: int,
    on_timeout: str,
    workdir: Path | None,
    json_out: Path | None,
    shadow_seeds: int,
    shadow_only: bool,
) -> None:
    """Whole rollouts under a fake clock: bad canaries (real trained models), A/A canaries over every
    start hour and two user spreads, canaries exactly at each gate's margin (ctr/bench/canary_suite.py)."""
    import dataclasses

    from ctr.bench import canary_sim as sim
    from ctr.bench import canary_suite as suite
    from ctr.serving.canary.plan import default_plan

    plan = dataclasses.replace(default_plan(), on_timeout=on_timeout)
    world = None
    if not no_models:
        world_cfg = dataclasses.replace(sim.DEFAULT_WORLD, impressions=impressions)
        world = sim.build_world(world_cfg, workdir)
    cfg = suite.FullConfig(tuple(rps), aa_seeds, margin_seeds, interval_s, bad_interval_s, workers)
    if shadow_only:
        result: dict[str, Any] = {"lines": [], "outcomes": {}}
    else:
        result = suite.full(plan, sim.synthetic_arms(), world.arms if world else None, cfg)
    if world is not None and shadow_seeds > 0:
        from ctr.bench import canary_shadow

        split = {r: canary_shadow.split_bad(world.arms, r, bad_interval_s, workers) for r in rps}
        shadow_cfg = canary_shadow.ShadowConfig(tuple(rps), per_hour=shadow_seeds, interval_s=bad_interval_s)
        shadow = canary_shadow.full(world, split, shadow_cfg)
        result["lines"] += shadow["lines"]
        result["outcomes"].update(shadow["outcomes"])
    for line in result["lines"]:
        click.echo(line)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2))
