"""Raw features -> the model's int64 input matrix.

Training and serving call the same column functions, so the two cannot drift apart.
Column 0 of every field means "unknown"; an unknown entity or a missing feature group
gets zeros in its columns (the model is trained with such rows, so defaults are sane).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from lru import LRU

from ctr.features import schema

GENDER_CODE = {g: i + 1 for i, g in enumerate(schema.GENDERS)}
CREATIVE_CODE = {c: i + 1 for i, c in enumerate(schema.CREATIVES)}
DEVICE_CODE = {d: i for i, d in enumerate(schema.DEVICE_TYPES)}
SITE_CODE = {s: i for i, s in enumerate(schema.SITE_CATEGORIES)}
CONN_CODE = {c: i for i, c in enumerate(schema.CONN_TYPES)}


@dataclass(frozen=True, slots=True)
class TransformSpec:
    """What the transform learned from the training data (saved with the model)."""

    global_ctr: float
    user_ctr_edges: tuple[float, ...]
    ad_ctr_edges: tuple[float, ...]
    prior_strength: float = 20.0

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformSpec:
        return cls(
            global_ctr=float(d["global_ctr"]),
            user_ctr_edges=tuple(float(x) for x in d["user_ctr_edges"]),
            ad_ctr_edges=tuple(float(x) for x in d["ad_ctr_edges"]),
            prior_strength=float(d.get("prior_strength", 20.0)),
        )


def smoothed_ctr(impressions: np.ndarray, clicks: np.ndarray, prior: float, strength: float) -> np.ndarray:
    """Clicks over impressions, shrunk toward the prior by `strength` pseudo-impressions."""
    return (clicks + prior * strength) / (impressions + strength)


def fit_spec(
    user_impr: np.ndarray, user_clicks: np.ndarray, ad_impr: np.ndarray, ad_clicks: np.ndarray, global_ctr: float
) -> TransformSpec:
    """Quantile bucket edges of the smoothed user and ad CTRs."""
    q = np.linspace(0, 1, schema.CTR_BUCKETS + 1)[1:-1]
    strength = 20.0
    u = smoothed_ctr(user_impr, user_clicks, global_ctr, strength)
    a = smoothed_ctr(ad_impr, ad_clicks, global_ctr, strength)
    return TransformSpec(
        global_ctr=float(global_ctr),
        user_ctr_edges=tuple(float(x) for x in np.quantile(u, q)),
        ad_ctr_edges=tuple(float(x) for x in np.quantile(a, q)),
        prior_strength=strength,
    )


def _log_bucket(counts: np.ndarray, top: int) -> np.ndarray:
    return np.minimum(np.floor(np.log2(counts + 1.0)).astype(np.int64), top - 1) + 1


def _history(
    spec: TransformSpec, counts: np.ndarray, known: np.ndarray, ctr_edges: tuple[float, ...], top: int
) -> np.ndarray:
    """[n, 2] from (impressions, clicks) rows: the smoothed-CTR bucket and the log bucket of
    impressions; zeros (unknown) where `known` is false. Users and ads share this step."""
    c = counts.astype(np.float64)
    ctr = smoothed_ctr(c[:, 0], c[:, 1], spec.global_ctr, spec.prior_strength)
    out = np.stack([np.digitize(ctr, ctr_edges) + 1, _log_bucket(c[:, 0], top)], axis=1)
    out[~known] = 0
    return out


def user_columns(
    spec: TransformSpec,
    static: np.ndarray,
    static_known: np.ndarray,
    behavioral: np.ndarray,
    behavioral_known: np.ndarray,
) -> np.ndarray:
    """[n, 6]: age, gender, region, interest, ctr bucket, activity bucket.

    `static` is [n, 4] (age, gender code, region, interest); `behavioral` is [n, 2]
    (impressions_30d, clicks_30d); the masks say which rows hold real values.
    """
    out = np.zeros((len(static), 6), dtype=np.int64)
    s = static.astype(np.int64)
    out[:, 0] = np.digitize(s[:, 0], schema.AGE_EDGES) + 1
    out[:, 1] = np.clip(s[:, 1], 0, len(schema.GENDERS))
    out[:, 2] = np.clip(s[:, 2], 0, schema.N_REGIONS - 1) + 1
    out[:, 3] = np.clip(s[:, 3], 0, schema.N_TOPICS - 1) + 1
    out[~static_known, 0:4] = 0
    out[:, 4:6] = _history(spec, behavioral, behavioral_known, spec.user_ctr_edges, schema.ACTIVITY_BUCKETS)
    return out


def ad_columns(
    spec: TransformSpec,
    meta: np.ndarray,
    meta_known: np.ndarray,
    stats: np.ndarray,
    stats_known: np.ndarray,
) -> np.ndarray:
    """[n, 5]: advertiser, category, creative, ctr bucket, impressions bucket.

    `meta` is [n, 3] (advertiser, category, creative code); `stats` is [n, 2]
    (impressions, clicks).
    """
    out = np.zeros((len(meta), 5), dtype=np.int64)
    m = meta.astype(np.int64)
    out[:, 0] = np.clip(m[:, 0], 0, schema.N_ADVERTISERS - 1) + 1
    out[:, 1] = np.clip(m[:, 1], 0, schema.N_TOPICS - 1) + 1
    out[:, 2] = np.clip(m[:, 2], 0, len(schema.CREATIVES))
    out[~meta_known, 0:3] = 0
    out[:, 3:5] = _history(spec, stats, stats_known, spec.ad_ctr_edges, schema.AD_IMPRESSION_BUCKETS)
    return out


def context_codes(context: dict[str, Any]) -> tuple[int, ...]:
    """The 5 codes of a validated request context (memoized: contexts repeat a lot)."""
    return _context_codes(
        context["hour"], context["device_type"], context["site_category"], context["banner_pos"], context["conn_type"]
    )


@lru_cache(maxsize=8192)
def _context_codes(hour: int, device: str, site: str, banner: int, conn: str) -> tuple[int, ...]:
    return (hour, DEVICE_CODE[device], SITE_CODE[site], banner, CONN_CODE[conn])


def _rows(
    values: Sequence[Sequence[Any] | None], width: int, code: dict[str, int], col: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stack raw tuples into an int matrix, coding the string column `col`; None -> unknown."""
    known = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    arr = np.zeros((len(values), width), dtype=np.int64)
    for i, v in enumerate(values):
        if v is not None:
            row = list(v)
            row[col] = code.get(row[col], 0)
            arr[i] = row
    return arr, known


def _num_rows(values: Sequence[Sequence[Any] | None], width: int) -> tuple[np.ndarray, np.ndarray]:
    known = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    arr = np.array([v if v is not None else (0,) * width for v in values], dtype=np.float64).reshape(-1, width)
    return arr, known


class Transformer:
    """Serving-side transform of one request's raw feature tuples.

    Pre-computation: each entity's encoded columns are remembered (`memo` entries per kind,
    an LRU keyed by the raw values themselves, so a changed value is a new key and nothing is
    ever stale), and a request's transform is a gather of its rows plus the context columns;
    only rows never seen before are encoded, in one vectorized call. `memo=0`: encode every row.
    """

    def __init__(self, spec: TransformSpec, memo: int = 100_000) -> None:
        self.spec = spec
        self._users: LRU | None = LRU(memo) if memo > 0 else None
        self._ads: LRU | None = LRU(memo) if memo > 0 else None

    def user_row(self, static: Sequence[Any] | None, behavioral: Sequence[Any] | None) -> np.ndarray:
        s, s_known = _rows([static], 4, GENDER_CODE, 1)
        b, b_known = _num_rows([behavioral], 2)
        return user_columns(self.spec, s, s_known, b, b_known)[0]

    def ad_rows(self, meta: Sequence[Sequence[Any] | None], stats: Sequence[Sequence[Any] | None]) -> np.ndarray:
        m, m_known = _rows(meta, 3, CREATIVE_CODE, 2)
        s, s_known = _num_rows(stats, 2)
        return ad_columns(self.spec, m, m_known, s, s_known)

    def matrix(
        self,
        user_static: Sequence[Any] | None,
        user_behavioral: Sequence[Any] | None,
        ad_meta: Sequence[Sequence[Any] | None],
        ad_stats: Sequence[Sequence[Any] | None],
        context: dict[str, Any],
    ) -> np.ndarray:
        """[len(ad_meta), 16] int64: the user and context broadcast over the candidate ads."""
        n = len(ad_meta)
        out = np.empty((n, len(schema.INPUT_FIELDS)), dtype=np.int64)
        out[:, schema.USER_COLUMNS] = self._user(user_static, user_behavioral)
        out[:, schema.AD_COLUMNS] = self._ad_block(ad_meta, ad_stats)
        out[:, schema.CONTEXT_COLUMNS] = context_codes(context)
        return out

    def _user(self, static: Sequence[Any] | None, behavioral: Sequence[Any] | None) -> Any:
        memo = self._users
        if memo is None:
            return self.user_row(static, behavioral)
        try:
            row = memo.get((static, behavioral))
            if row is None:
                row = memo[(static, behavioral)] = tuple(self.user_row(static, behavioral).tolist())
        except TypeError:  # an unhashable value (a list): encoded, not remembered
            return self.user_row(static, behavioral)
        return row

    def _ad_block(self, meta: Sequence[Sequence[Any] | None], stats: Sequence[Sequence[Any] | None]) -> np.ndarray:
        memo = self._ads
        if memo is None:
            return self.ad_rows(meta, stats)
        try:
            rows = list(map(memo.get, zip(meta, stats, strict=True)))
            if None in rows:
                keys = list(zip(meta, stats, strict=True))
                miss = [i for i, r in enumerate(rows) if r is None]
                encoded = self.ad_rows([meta[i] for i in miss], [stats[i] for i in miss])
                for i, e in zip(miss, encoded, strict=True):
                    rows[i] = memo[keys[i]] = e.tobytes()
        except TypeError:  # an unhashable value (a list): encoded, not remembered
            return self.ad_rows(meta, stats)
        # each row is remembered as its 5 int64s' bytes: one join and one buffer make the block
        return np.frombuffer(b"".join(rows), dtype=np.int64).reshape(len(rows), 5)

    def defaults(self, n: int, context: dict[str, Any]) -> np.ndarray:
        """[n, 16] for n ads with every stored feature at its default (only the context known)."""
        return self.matrix(None, None, [None] * n, [None] * n, context)
