"""Fallback predictions: historical segment CTR blended with the global CTR.

    y = lambda * CTR_segment + (1 - lambda) * CTR_global,   lambda = n / (n + prior_strength)

so a segment with few impressions leans on the global rate and a well-measured one on
its own. Segments are (device_type, site_category); the table is computed from the
training split and saved with the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from ctr.features import schema


@dataclass(frozen=True, slots=True)
class SegmentTable:
    clicks: dict[str, float]
    impressions: dict[str, float]
    global_clicks: float
    global_impressions: float
    prior_strength: float = 1000.0
    _blended: dict[str, float] = field(init=False, default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.global_impressions <= 0:
            raise ValueError("global_impressions must be > 0")
        if self.prior_strength < 0:
            raise ValueError(f"prior_strength must be >= 0, got {self.prior_strength}")
        for key, n in self.impressions.items():
            lam = n / (n + self.prior_strength) if n > 0 else 0.0
            seg = self.clicks.get(key, 0.0) / n if n > 0 else 0.0
            self._blended[key] = lam * seg + (1 - lam) * self.global_ctr

    @staticmethod
    def key(device_type: str, site_category: str) -> str:
        return f"{device_type}|{site_category}"

    @property
    def global_ctr(self) -> float:
        return self.global_clicks / self.global_impressions

    def score(self, device_type: str, site_category: str) -> float:
        """The blended CTR of a segment; the global CTR for a segment never seen."""
        return self._blended.get(self.key(device_type, site_category), self.global_ctr)

    def scores(self, context: dict[str, Any], n: int) -> list[float]:
        """The fallback score for each of `n` candidate ads shown in `context`."""
        return [self.score(context["device_type"], context["site_category"])] * n

    @classmethod
    def from_log(
        cls, device: np.ndarray, site: np.ndarray, label: np.ndarray, prior_strength: float = 1000.0
    ) -> SegmentTable:
        """Count clicks and impressions per segment from coded impression columns."""
        n_site = len(schema.SITE_CATEGORIES)
        seg = device.astype(np.int64) * n_site + site
        size = len(schema.DEVICE_TYPES) * n_site
        impr = np.bincount(seg, minlength=size)
        clicks = np.bincount(seg, weights=label.astype(np.float64), minlength=size)
        keys = [cls.key(d, s) for d in schema.DEVICE_TYPES for s in schema.SITE_CATEGORIES]
        return cls(
            clicks={k: float(c) for k, c in zip(keys, clicks, strict=True)},
            impressions={k: float(i) for k, i in zip(keys, impr, strict=True)},
            global_clicks=float(label.sum()),
            global_impressions=float(len(label)),
            prior_strength=prior_strength,
        )

    def to_dict(self) -> dict[str, Any]:
        """The saved fields (plain YAML/JSON types), without the derived blend."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmentTable:
        return cls(
            clicks={k: float(v) for k, v in d["clicks"].items()},
            impressions={k: float(v) for k, v in d["impressions"].items()},
            global_clicks=float(d["global_clicks"]),
            global_impressions=float(d["global_impressions"]),
            prior_strength=float(d.get("prior_strength", 1000.0)),
        )
