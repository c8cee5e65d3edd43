"""The transform: serving and training build the same rows; unknowns are zeros."""

from __future__ import annotations

import numpy as np
import pytest

from ctr.features import schema
from ctr.features.transform import Transformer, TransformSpec, context_codes, fit_spec

SPEC = TransformSpec(global_ctr=0.04, user_ctr_edges=tuple(np.linspace(0.02, 0.06, 19)),
                     ad_ctr_edges=tuple(np.linspace(0.02, 0.06, 19)))  # fmt: skip
CTX = {"hour": 3, "device_type": "tablet", "site_category": "games", "banner_pos": 2, "conn_type": "3g"}


def test_matrix_shape_and_broadcast() -> None:
    """One row per ad; user and context columns equal on every row."""
    x = Transformer(SPEC).matrix(
        (30, "f", 4, 7), (100, 5), [(1, 2, "video"), (3, 4, "text")], [(5000, 200), (10, 0)], CTX
    )
    assert x.shape == (2, len(schema.INPUT_FIELDS)) and x.dtype == np.int64
    assert (x[0, schema.USER_COLUMNS] == x[1, schema.USER_COLUMNS]).all()
    assert list(x[0, schema.CONTEXT_COLUMNS]) == [3, 2, 6, 2, 3]
    assert list(x[0, 0:4]) == [2, 2, 5, 8]  # age 30 -> bucket 2, "f" -> 2, region 4 -> 5, interest 7 -> 8
    assert (x >= 0).all() and (x < np.array(schema.CARDINALITIES)).all()


def test_unknown_entities_and_groups_are_zero() -> None:
    """A missing group zeroes exactly its columns; the rest is unaffected."""
    t = Transformer(SPEC)
    x = t.matrix(None, (100, 5), [None, (1, 2, "image")], [None, None], CTX)
    assert (x[:, 0:4] == 0).all() and (x[:, 4:6] > 0).all()
    assert (x[0, schema.AD_COLUMNS] == 0).all()
    assert (x[1, 6:9] > 0).all() and (x[1, 9:11] == 0).all()


def test_unknown_strings_map_to_zero() -> None:
    """An attribute value the schema doesn't know is treated as unknown, not an error."""
    x = Transformer(SPEC).matrix((30, "x", 4, 7), None, [(1, 2, "hologram")], [None], CTX)
    assert x[0, 1] == 0 and x[0, 8] == 0


@pytest.mark.parametrize("field", ["device_type", "site_category", "conn_type"])
def test_context_codes_follow_vocabulary_order(field: str) -> None:
    """Context strings are coded by their index in the schema's vocabulary."""
    vocab = {"device_type": schema.DEVICE_TYPES, "site_category": schema.SITE_CATEGORIES,
             "conn_type": schema.CONN_TYPES}[field]  # fmt: skip
    col = ["hour", "device_type", "site_category", "banner_pos", "conn_type"].index(field)
    for i, v in enumerate(vocab):
        assert context_codes({**CTX, field: v})[col] == i


def test_fit_spec_edges_are_sorted_quantiles() -> None:
    """Bucket edges are increasing and spread the training entities evenly."""
    rng = np.random.default_rng(0)
    impr = rng.integers(10, 1000, 5000)
    clicks = rng.binomial(impr, 0.04)
    spec = fit_spec(impr, clicks, impr, clicks, 0.04)
    assert len(spec.user_ctr_edges) == schema.CTR_BUCKETS - 1
    assert list(spec.user_ctr_edges) == sorted(spec.user_ctr_edges)
    assert TransformSpec.from_dict(spec.to_dict()) == spec


def test_remembered_rows_equal_encoded_rows() -> None:
    """Pre-encoded rows (the memo) give the matrix that encoding every row gives, for rows seen
    before, new ones, unknown ones and a value that changed; a tiny memo that evicts too."""
    rng = np.random.default_rng(4)

    def ad() -> tuple[object, ...] | None:
        return None if rng.random() < 0.1 else (int(rng.integers(0, 60)), int(rng.integers(0, 40)),
                                                str(rng.choice(schema.CREATIVES)))  # fmt: skip

    def stats() -> tuple[int, int] | None:
        impressions = int(rng.integers(0, 10_000))
        return None if rng.random() < 0.1 else (impressions, int(rng.integers(0, impressions + 1)))

    ads = [(ad(), stats()) for _ in range(40)]
    users = [((int(rng.integers(10, 80)), "m", 3, 5), stats()) for _ in range(5)] + [(None, None)]
    plain, remembered, tiny = Transformer(SPEC, memo=0), Transformer(SPEC), Transformer(SPEC, memo=3)
    for step in range(30):
        pick = rng.choice(len(ads), 12)
        meta, st = [ads[i][0] for i in pick], [ads[i][1] for i in pick]
        user = users[step % len(users)]
        want = plain.matrix(*user, meta, st, CTX)
        for t in (remembered, tiny):
            np.testing.assert_array_equal(t.matrix(*user, meta, st, CTX), want)
        ads[int(rng.integers(len(ads)))] = (ad(), stats())  # a value changes: a new key, never a stale row


def test_unhashable_rows_are_encoded_without_the_memo() -> None:
    """A row that arrives as a list (not a tuple) is encoded as usual, not an error."""
    t = Transformer(SPEC)
    x = t.matrix([30, "f", 4, 7], [100, 5], [[1, 2, "video"]], [[5000, 200]], CTX)
    np.testing.assert_array_equal(x, Transformer(SPEC, memo=0).matrix((30, "f", 4, 7), (100, 5), [(1, 2, "video")],
                                                                      [(5000, 200)], CTX))  # fmt: skip
