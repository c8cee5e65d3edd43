"""How much each degradation costs: AUC and logloss on the test split of the click log
for the full model, the model with feature groups replaced by defaults, the fallback
segment blend, and the global CTR alone (`ctr eval degradation`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctr.features import schema
from ctr.model.store import ModelArtifacts, load_module
from models import data as clicklog
from models.train import evaluate, feature_matrix, predict

# Columns that each substitution zeroes (0 is every field's "unknown" value).
DEFAULTS: dict[str, tuple[int, int]] = {
    "features:user_static:default": (0, 4),
    "features:user_behavioral:default": (4, 6),
    "features:ad_meta:default": (6, 9),
    "features:ad_stats:default": (9, 11),
    "features:user:default (whole user)": (0, 6),
    "features:ad:default (whole ad)": (6, 11),
    "features: all stored features default": (0, 11),
}
REFERENCE = {"fallback": -5.0, "default features": -10.0}


def table(data_dir: Path, art: ModelArtifacts) -> list[tuple[str, float, float]]:
    """(name, AUC, logloss) rows on the test split."""
    arrays, cfg, _ = clicklog.load(data_dir)
    te = clicklog.split_indices(len(arrays["imp_label"]), cfg)["test"]
    x = feature_matrix(arrays, art.spec)[te]
    y = arrays["imp_label"][te]
    model = load_module(art)
    rows = []
    m = evaluate(y, predict(model, x))
    rows.append(("full model", m["auc"], m["logloss"]))
    for name, (lo, hi) in DEFAULTS.items():
        xd = x.copy()
        xd[:, lo:hi] = 0
        m = evaluate(y, predict(model, xd))
        rows.append((name, m["auc"], m["logloss"]))
    dev, site = arrays["imp_device"][te], arrays["imp_site"][te]
    blend = np.array(
        [art.segments.score(schema.DEVICE_TYPES[d], schema.SITE_CATEGORIES[s]) for d, s in zip(dev, site, strict=True)]
    )
    m = evaluate(y, blend)
    rows.append(("fallback: segment blend (model:*)", m["auc"], m["logloss"]))
    m = evaluate(y, np.full(len(y), art.segments.global_ctr))
    rows.append(("fallback: global CTR only", m["auc"], m["logloss"]))
    return rows


def format_table(rows: list[tuple[str, float, float]]) -> str:
    full_auc = rows[0][1]
    out = ["| prediction | AUC | Δ AUC vs full | logloss |", "|---|---|---|---|"]
    for name, auc, ll in rows:
        out.append(f"| {name} | {auc:.4f} | {100 * (auc - full_auc) / full_auc:+.1f} % | {ll:.4f} |")
    out.append("")
    out.append(f"Reference design's claims: fallback {REFERENCE['fallback']:+.0f} % AUC, "
               f"default features {REFERENCE['default features']:+.0f} % AUC.")  # fmt: skip
    return "\n".join(out)
