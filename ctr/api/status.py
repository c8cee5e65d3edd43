"""`GET /status` (a page for people) and `GET /status.json` (the same document for machines).

The page is rendered on the server from the document of `ctr.serving.status`: plain HTML
with inline CSS and inline SVG charts, no script and no external asset, so it works offline
and in any browser; it reloads itself every `REFRESH_S` seconds (a meta refresh). Every
figure is a `<span class="fig" data-field="panel.key" data-value="raw">shown</span>`, so a
test (or a scraper) can read each one back and compare it with the JSON; the document the
page was made from is embedded as `<script type="application/json" id="status-data">`.
"""

from __future__ import annotations

import html
import json
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ctr.api.edge import Edge, bind

REFRESH_S = 5
PERCENT_KEYS = ("availability", "model_scored", "share", "hit_rate")
W, H = 360, 96  # chart size (px)


def _percent(key: str) -> bool:
    return any(k in key for k in PERCENT_KEYS)


def fmt(key: str, value: Any) -> str:
    """How the page shows a figure: shares as per cent, times with their unit."""
    if value is None:
        return "–"
    if key == "pid":  # an id, not a quantity: no thousands separator
        return str(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float) and _percent(key):
        return f"{100 * value:.2f} %"
    if isinstance(value, float):
        text = f"{value:.4g}" if abs(value) < 10_000 else f"{value:,.0f}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        return str(value)
    for suffix, unit in (("_ms", " ms"), ("_s", " s"), ("qps", " /s")):
        if key.endswith(suffix):
            return text + unit
    return text


def _fig(path: str, key: str, value: Any) -> str:
    raw = "" if value is None else (json.dumps(value) if not isinstance(value, str) else value)
    cls = "fig"
    if key in ("state",) and isinstance(value, str):
        cls += f" st-{html.escape(value)}"
    if key in ("page", "over_budget", "paging") and value is True:
        cls += " bad"
    return (f'<span class="{cls}" data-field="{html.escape(path)}" data-value="{html.escape(raw)}">'
            f"{html.escape(fmt(key, value))}</span>")  # fmt: skip


def _table(path: str, rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and not isinstance(r[k], list | dict)]
    head = "".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fig(f'{path}.{i}.{c}', c, r.get(c))}</td>" for c in cols) + "</tr>"
        for i, r in enumerate(rows)
    )
    return f'<table data-table="{html.escape(path)}"><tr>{head}</tr>{body}</table>'


def _generic(path: str, data: dict[str, Any]) -> str:
    """Scalars as labelled figures, lists of dicts as tables, dicts recursively; `series` is for charts."""
    figs, parts = [], []
    for k, v in data.items():
        if k == "series":
            continue
        p = f"{path}.{k}"
        if isinstance(v, list) and all(isinstance(x, dict) for x in v):
            parts.append(_table(p, v) if v else f'<p class="muted" data-table="{html.escape(p)}">none</p>')
        elif isinstance(v, dict):
            parts.append(f"<h3>{html.escape(k.replace('_', ' '))}</h3>" + _generic(p, v))
        elif k == "note":
            parts.insert(0, f'<p class="muted">{html.escape(str(v))}</p>')
        elif isinstance(v, list):
            figs.append(f"<div><label>{html.escape(k)}</label>{_fig(p, k, ', '.join(map(str, v)))}</div>")
        else:
            figs.append(f"<div><label>{html.escape(k.replace('_', ' '))}</label>{_fig(p, k, v)}</div>")
    return (f'<div class="figs">{"".join(figs)}</div>' if figs else "") + "".join(parts)


def line_chart(
    title: str, series: list[dict[str, Any]], keys: list[str], percent: bool = False, share: bool = False
) -> str:
    """A small SVG chart of `keys` over the points of `series` (oldest first; None is a gap)."""
    vals = [p[k] for p in series for k in keys if p.get(k) is not None]
    top = max(vals, default=0.0)
    low = 0.0
    if percent:
        low = min(min(vals, default=1.0), 0.99)
        top = 1.0
    if share:  # a share from 0
        top = max(top, 0.01)
    top = top if top > low else low + 1.0
    n = max(1, len(series) - 1)
    colors = ("#2563eb", "#dc2626", "#16a34a", "#9333ea")
    lines = []
    for key, color in zip(keys, colors, strict=False):
        segs, cur = [], []
        for i, p in enumerate(series):
            v = p.get(key)
            if v is None:
                if cur:
                    segs.append(cur)
                cur = []
                continue
            x = 4 + (W - 8) * i / n
            y = H - 14 - (H - 28) * (v - low) / (top - low)
            cur.append(f"{x:.1f},{y:.1f}")
        if cur:
            segs.append(cur)
        for s in segs:
            pts = " ".join(s) if len(s) > 1 else f"{s[0]} {float(s[0].split(',')[0]) + 1:.1f},{s[0].split(',')[1]}"
            lines.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{pts}"/>')
    span_min = (len(series) * (series[1]["t"] - series[0]["t"]) / 60) if len(series) > 1 else 0
    legend = " ".join(f'<tspan fill="{c}">■ {html.escape(k)}</tspan>' for k, c in zip(keys, colors, strict=False))
    top_label = f"{100 * top:.1f} %" if percent or share else f"{top:,.3g}"
    low_label = f"{100 * low:.1f} %" if percent else "0"
    return (
        f'<figure class="chart" data-chart="{html.escape(title)}"><figcaption>{html.escape(title)}</figcaption>'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img">'
        f'<rect x="0" y="0" width="{W}" height="{H}" fill="#f8fafc" stroke="#e2e8f0"/>'
        f'<text x="4" y="11" font-size="10" fill="#64748b">{top_label}</text>'
        f'<text x="4" y="{H - 3}" font-size="10" fill="#64748b">{low_label} · −{span_min:.0f} min</text>'
        f'<text x="{W - 4}" y="{H - 3}" font-size="10" fill="#64748b" text-anchor="end">now</text>'
        f'<text x="{W - 4}" y="11" font-size="10" text-anchor="end">{legend}</text>'
        + "".join(lines)
        + "</svg></figure>"
    )


def stage_chart(rows: list[dict[str, Any]]) -> str:
    """Horizontal bars: each stage's mean against its budget (the tick)."""
    scale = max([r["budget_ms"] for r in rows] + [r["mean_ms"] or 0 for r in rows]) or 1.0
    bar_h, label_w = 16, 80
    out = []
    for i, r in enumerate(rows):
        y = 4 + i * (bar_h + 4)
        width = (W - label_w - 8) * (r["mean_ms"] or 0) / scale
        bx = label_w + (W - label_w - 8) * r["budget_ms"] / scale
        color = "#dc2626" if r.get("over_budget") else "#2563eb"
        out.append(
            f'<text x="0" y="{y + 12}" font-size="11">{html.escape(r["stage"])}</text>'
            f'<rect x="{label_w}" y="{y}" width="{width:.1f}" height="{bar_h}" fill="{color}"/>'
            f'<line x1="{bx:.1f}" x2="{bx:.1f}" y1="{y - 2}" y2="{y + bar_h + 2}" stroke="#0f172a" stroke-width="2"/>'
        )
    h = 8 + len(rows) * (bar_h + 4)
    return (f'<figure class="chart" data-chart="stages"><figcaption>mean ms (bar) against the budget (tick)'
            f'</figcaption><svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" role="img">'
            + "".join(out) + "</svg></figure>")  # fmt: skip


def _panel(panel: dict[str, Any], series: list[dict[str, Any]]) -> str:
    pid, data = panel["id"], panel["data"]
    charts = ""
    if pid == "traffic" and data.get("series"):
        s = data["series"]
        charts = (
            line_chart("requests/s", s, ["qps"])
            + line_chart("latency ms", s, ["p50_ms", "p99_ms"])
            + line_chart("availability, model-scored", s, ["availability", "model_scored"], percent=True)
        )
    if pid == "fallbacks" and series:
        charts = line_chart("fallback share", series, ["fallback_share"], share=True)
    if pid == "stages" and data.get("rows"):
        charts = stage_chart(data["rows"])
    return (f'<section class="panel" data-panel="{html.escape(pid)}"><h2>{html.escape(panel["title"])}</h2>'
            f'{charts}{_generic(pid, data)}</section>')  # fmt: skip


CSS = """
body{font:14px system-ui,sans-serif;margin:16px;color:#0f172a;background:#fff}
header{display:flex;gap:16px;align-items:baseline;flex-wrap:wrap}h1{font-size:20px;margin:0}
.muted,header small{color:#64748b}main{display:grid;grid-template-columns:repeat(auto-fill,minmax(400px,1fr));gap:12px}
.panel{border:1px solid #e2e8f0;border-radius:6px;padding:8px 12px}h2{font-size:15px;margin:4px 0 8px}
h3{font-size:13px;margin:8px 0 4px;color:#475569}.figs{display:flex;flex-wrap:wrap;gap:6px 16px}
.figs div{display:flex;flex-direction:column}label{font-size:11px;color:#64748b}.figs .fig{font-size:16px}
table{border-collapse:collapse;margin:6px 0;font-size:12px}td,th{padding:2px 8px;border-bottom:1px solid #f1f5f9;
text-align:left}.st-open,.bad{color:#dc2626;font-weight:600}.st-half_open{color:#d97706}.st-closed,.st-ok{color:#16a34a}
figure{margin:4px 0}figcaption{font-size:11px;color:#64748b}
.panel[data-panel=processes]{grid-column:1/-1}
"""


def render(doc: dict[str, Any]) -> str:
    """The page for one status document."""
    panels = doc["panels"]
    traffic = next((p["data"] for p in panels if p["id"] == "traffic"), {})
    body = "".join(_panel(p, traffic.get("series", [])) for p in panels)  # fallbacks chart the traffic series
    embedded = orjson.dumps(doc).decode().replace("</", "<\\/")
    scope = doc["scope"]["text"]
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_S}"><meta name="viewport" content="width=device-width">
<title>ctr-serve status</title><style>{CSS}</style></head><body>
<header><h1>ctr-serve status</h1><span data-field="scope" data-value="{html.escape(scope)}">Figures of
{html.escape(scope)}.</span><small>model {_fig("model_version", "model_version", doc.get("model_version"))} ·
up {_fig("uptime_s", "uptime_s", doc["uptime_s"])} · generated {html.escape(doc["generated_at"])} · refreshes every
{REFRESH_S} s · <a href="status.json">status.json</a></small></header>
<main>{body}</main>
<script type="application/json" id="status-data">{embedded}</script>
</body></html>"""


async def status_json(edge: Edge, request: Request) -> Response:
    board = edge.status
    if board is None:
        return Response(orjson.dumps({"error": "the gateway is starting; retry shortly"}), 503,
                        media_type="application/json")  # fmt: skip
    return Response(orjson.dumps(await board.document()), media_type="application/json")


async def status_page(edge: Edge, request: Request) -> Response:
    board = edge.status
    if board is None:
        return Response("<!doctype html><title>starting</title><p>the gateway is starting; retry shortly</p>", 503,
                        media_type="text/html; charset=utf-8", headers={"refresh": "2"})  # fmt: skip
    return Response(render(await board.document()), media_type="text/html; charset=utf-8")


def routes(edge: Edge) -> list[Route]:
    return [Route("/status", bind(edge, status_page), methods=["GET"]),
            Route("/status.json", bind(edge, status_json), methods=["GET"])]  # fmt: skip


__all__ = ["REFRESH_S", "fmt", "render", "routes"]
