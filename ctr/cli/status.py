"""`ctr status`: the status document of a running service (GET /status.json), as tables."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import click


def fetch(url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """The document at URL/status.json; a ConnectionError naming the URL when nothing answers."""
    target = url.rstrip("/") + "/status.json"
    try:
        with urllib.request.urlopen(target, timeout=timeout_s) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise ConnectionError(f"{target} answered {exc.code}: {exc.read()[:200].decode(errors='replace')}") from None
    except (urllib.error.URLError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(f"no service answers at {target} ({reason}); start one with `make serve`") from None


def _cell(key: str, value: Any) -> str:
    from ctr.api.status import fmt

    return fmt(key, value)


def tables(doc: dict[str, Any]) -> list[Any]:
    """One rich table per panel: its figures, then one table per list of rows."""
    from rich.table import Table

    out: list[Any] = []
    head = Table(title="ctr-serve status", show_header=False, title_justify="left")
    for k in ("scope", "model_version", "uptime_s", "generated_at"):
        v = doc.get(k)
        head.add_row(k.replace("_", " "), v["text"] if k == "scope" else _cell(k, v))
    out.append(head)
    for panel in doc["panels"]:
        figures = Table(title=panel["title"], show_header=False, title_justify="left")
        lists = []
        for k, v in panel["data"].items():
            if k == "series":
                continue
            if isinstance(v, list) and all(isinstance(x, dict) for x in v):
                lists.append((k, v))
            elif not isinstance(v, dict | list):
                figures.add_row(k.replace("_", " "), _cell(k, v))
        if figures.row_count:
            out.append(figures)
        for name, rows in lists:
            cols = list(dict.fromkeys(c for r in rows for c in r if not isinstance(r[c], list | dict)))
            t = Table(title=f"{panel['title']}: {name.replace('_', ' ')}", title_justify="left")
            for c in cols:
                t.add_column(c.replace("_", " "))
            for r in rows:
                t.add_row(*(_cell(c, r.get(c)) for c in cols))
            out.append(t)
    return out


@click.command()
@click.option("--url", default="http://127.0.0.1:3000", show_default=True, help="The gateway's address.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON document as it came.")
@click.option("--width", type=click.IntRange(40, 400), default=None, help="Table width (default: the terminal's).")
def status(url: str, as_json: bool, width: int | None) -> None:
    """Print the status of a running service (GET /status.json) as tables."""
    from rich.console import Console

    doc = fetch(url)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    console = Console(width=width, highlight=False)
    for t in tables(doc):
        console.print(t)
