"""CTRModel's raw-bytes /infer route."""

from __future__ import annotations

import numpy as np
from starlette.testclient import TestClient

from ctr.model.app import SHAPE, make_model_app


class Runner:
    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x.sum(axis=1) / 100.0).astype(np.float32)


def test_infer_round_trips_the_matrix() -> None:
    """int64 rows in, one float32 score per row out, in order."""
    app = make_model_app(Runner())
    x = np.arange(12, dtype="<i8").reshape(3, 4)
    r = TestClient(app).post("/infer", content=x.tobytes(), headers={SHAPE: "3,4"})
    assert r.status_code == 200
    assert np.allclose(np.frombuffer(r.content, dtype="<f4"), [0.06, 0.22, 0.38])


def test_infer_refuses_a_body_that_does_not_match_its_shape() -> None:
    """A wrong or missing shape is a 400, not a 500."""
    app = make_model_app(Runner())
    client = TestClient(app)
    assert client.post("/infer", content=b"\x00" * 24, headers={SHAPE: "2,4"}).status_code == 400
    assert client.post("/infer", content=b"\x00" * 8).status_code == 400


def test_infer_is_unavailable_until_the_model_is_loaded() -> None:
    """The mount BentoML serves (a LateApp, as in service.py) has no /infer until the model's
    app is given to it, then serves it."""
    from ctr.api.edge import LateApp

    mount = LateApp()
    x = np.arange(4, dtype="<i8").reshape(1, 4)
    assert TestClient(mount).post("/infer", content=x.tobytes(), headers={SHAPE: "1,4"}).status_code == 404
    mount.serve(make_model_app(Runner()))
    assert TestClient(mount).post("/infer", content=x.tobytes(), headers={SHAPE: "1,4"}).status_code == 200
