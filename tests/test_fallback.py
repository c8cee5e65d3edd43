"""The fallback blend of segment and global CTR."""

from __future__ import annotations

import numpy as np
import pytest

from ctr.model.segments import SegmentTable


def table(seg_clicks: float, seg_impr: float, prior: float = 1000.0) -> SegmentTable:
    return SegmentTable({"mobile|news": seg_clicks}, {"mobile|news": seg_impr}, 400.0, 10_000.0, prior)


def test_blend_formula() -> None:
    """y = lambda * segment + (1 - lambda) * global, lambda = n / (n + k)."""
    t = table(100, 1000)  # segment 0.1, global 0.04, lambda 0.5
    assert t.score("mobile", "news") == pytest.approx(0.5 * 0.1 + 0.5 * 0.04)


def test_lambda_grows_with_sample_size() -> None:
    """The more a segment was seen, the closer its score is to its own rate."""
    scores = [table(0.1 * n, n).score("mobile", "news") for n in (10, 1000, 100_000)]
    assert scores[0] < scores[1] < scores[2] < 0.1
    assert scores[0] == pytest.approx(0.04, abs=0.001)


def test_unseen_segment_gets_global_ctr() -> None:
    """A segment never seen falls back to the global rate."""
    assert table(1, 10).score("desktop", "travel") == pytest.approx(0.04)


def test_from_log_counts_segments_and_round_trips() -> None:
    """Counting from coded impressions, then saving and loading, keeps every number."""
    device = np.array([0, 0, 1, 1, 1])
    site = np.array([0, 0, 2, 2, 2])
    label = np.array([1, 0, 1, 1, 0])
    t = SegmentTable.from_log(device, site, label, prior_strength=0)
    assert t.score("mobile", "news") == pytest.approx(0.5)
    assert t.score("desktop", "entertainment") == pytest.approx(2 / 3)
    assert t.global_ctr == pytest.approx(0.6)
    assert SegmentTable.from_dict(t.to_dict()).score("desktop", "entertainment") == pytest.approx(2 / 3)


def test_rejects_bad_config() -> None:
    """A table without impressions is refused at construction."""
    with pytest.raises(ValueError, match="global_impressions"):
        SegmentTable({}, {}, 0.0, 0.0)
