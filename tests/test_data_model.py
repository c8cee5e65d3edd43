"""The synthetic log, training, and the model store round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ctr.features.load import _ad_rows, _user_rows
from ctr.features.transform import Transformer
from ctr.model import store as modelstore
from models import data
from models.train import TrainConfig, expected_calibration_error, feature_matrix, predict, train

SMALL = data.DataConfig(n_users=2000, n_ads=300, n_impressions=60_000, seed=3)
CTX_NAMES = ("hour", "device", "site", "banner", "conn")


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("log")
    data.write(d, SMALL)
    return d


@pytest.fixture(scope="module")
def trained(log_dir: Path):  # type: ignore[no-untyped-def]
    return train(log_dir, TrainConfig(max_epochs=3))


@pytest.fixture(scope="module")
def saved(trained):  # type: ignore[no-untyped-def]
    """The trained model saved once (with its ONNX export) for the tests that only read it."""
    return modelstore.artifacts(modelstore.save(trained))


def test_generation_is_deterministic_by_seed() -> None:
    """Same seed, same log; another seed, another log."""
    cfg = data.DataConfig(n_users=100, n_ads=20, n_impressions=2000)
    assert data.fingerprint(data.generate(cfg)) == data.fingerprint(data.generate(cfg))
    other = data.DataConfig(n_users=100, n_ads=20, n_impressions=2000, seed=8)
    assert data.fingerprint(data.generate(cfg)) != data.fingerprint(data.generate(other))


def test_log_is_realistic(log_dir: Path) -> None:
    """Zipf popularity, labels drawn from the stored true probability, time-ordered splits."""
    a, cfg, _ = data.load(log_dir)
    counts = np.sort(np.bincount(a["imp_user"], minlength=SMALL.n_users))[::-1]
    assert counts[0] > 20 * np.median(counts)  # a heavy head
    p, y = a["imp_p"], a["imp_label"]
    assert ((p > 0) & (p < 1)).all()
    assert abs(y.mean() - p.mean()) < 0.005  # labels are Bernoulli(p)
    assert 0.01 < y.mean() < 0.1
    sp = data.split_indices(len(y), cfg)
    assert a["imp_t"][sp["train"]].max() <= a["imp_t"][sp["valid"]].min()
    assert a["imp_t"][sp["valid"]].max() <= a["imp_t"][sp["test"]].min()


def test_training_and_serving_build_identical_rows(log_dir: Path, trained) -> None:  # type: ignore[no-untyped-def]
    """The serving transform over the feature-store rows reproduces the training matrix."""
    a, _, _ = data.load(log_dir)
    x = feature_matrix(a, trained.spec)
    users, ads = list(_user_rows(a)), list(_ad_rows(a))
    t = Transformer(trained.spec)
    for i in range(0, 60_000, 6007):
        u, ad = users[a["imp_user"][i]], ads[a["imp_ad"][i]]
        ctx = {"hour": int(a["imp_hour"][i]), "device_type": ["mobile", "desktop", "tablet"][a["imp_device"][i]],
               "site_category": data.schema.SITE_CATEGORIES[a["imp_site"][i]], "banner_pos": int(a["imp_banner"][i]),
               "conn_type": data.schema.CONN_TYPES[a["imp_conn"][i]]}  # fmt: skip
        row = t.matrix(u[1], u[2], [ad[1]], [ad[2]], ctx)[0]
        assert list(row) == list(x[i]), i


def test_model_learns_and_is_calibrated(trained) -> None:  # type: ignore[no-untyped-def]
    """Clearly better than chance, not better than the Bayes-optimal AUC, calibrated."""
    m = trained.metrics
    assert 0.6 < m["test_auc"] <= m["bayes_auc"] + 0.01
    assert m["test_ece"] < 0.02
    assert m["test_logloss"] < 0.3


def test_ece_of_perfect_and_biased_predictions() -> None:
    """ECE is ~0 for the true probabilities and grows with a constant bias."""
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.2, 200_000)
    y = (rng.random(len(p)) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.003
    assert expected_calibration_error(y, p + 0.05) == pytest.approx(0.05, abs=0.005)


def test_store_round_trip(trained, log_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """Saved to the BentoML store with its metadata; reloaded weights predict the same."""
    tag = modelstore.save(trained)
    art = modelstore.artifacts(tag)
    md = art.metadata
    assert md["data_fingerprint"] == trained.fingerprint
    assert md["metrics"]["bayes_auc"] == pytest.approx(trained.metrics["bayes_auc"])
    assert md["feature_versions"] == {"user_static": 1, "user_behavioral": 1, "ad_meta": 1, "ad_stats": 1}
    assert md["segments"]["global_impressions"] > 0
    a, _, _ = data.load(log_dir)
    x = feature_matrix(a, art.spec)[:500]
    assert np.allclose(predict(modelstore.load_module(art), x), predict(trained.model, x), atol=1e-6)


def test_weights_are_loaded_without_unpickling_objects(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A weights file holding an arbitrary object is refused, not executed."""
    import dataclasses
    import shutil

    art = modelstore.artifacts(modelstore.save(trained))
    art = dataclasses.replace(art, path=Path(shutil.copytree(art.path, tmp_path / "copy")))

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("pwned",))

    torch.save({"x": Evil()}, art.path / modelstore.WEIGHTS)
    with pytest.raises(Exception, match=r"[Ww]eights only"):
        modelstore.load_module(art)


def test_degradation_table_orders_the_substitutes(saved, log_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """The full model beats every default-feature variant, the segment blend and the global CTR."""
    from models import degradation

    rows = {name: auc for name, auc, _ in degradation.table(log_dir, saved)}
    full = rows["full model"]
    assert rows["fallback: global CTR only"] == pytest.approx(0.5)
    assert full > rows["features: all stored features default"] > 0.5
    assert full > rows["fallback: segment blend (model:*)"] > 0.5
    assert "Reference design" in degradation.format_table(list(degradation.table(log_dir, modelstore.artifacts())))


def test_infer_refuses_out_of_range_feature_indices(saved) -> None:  # type: ignore[no-untyped-def]
    """CTRModel's /infer answers 400 for an index outside its column's vocabulary (on a GPU
    it would be a device assert that kills the process; the old route passed it on)."""
    from starlette.testclient import TestClient

    from ctr.model.app import SHAPE, make_model_app
    from ctr.model.runner import ModelRunner

    runner = ModelRunner(saved, "cpu")
    app = make_model_app(runner)
    client = TestClient(app)
    x = np.zeros((3, runner.n_fields), dtype="<i8")
    shape = {SHAPE: f"3,{runner.n_fields}"}
    assert client.post("/infer", content=x.tobytes(), headers=shape).status_code == 200
    for col, value in ((0, int(runner.cardinalities[0])), (5, -1), (runner.n_fields - 1, 2**40)):
        bad = x.copy()
        bad[1, col] = value
        r = client.post("/infer", content=bad.tobytes(), headers=shape)
        assert r.status_code == 400 and f"column(s) [{col}]" in r.text, r.text


def test_a_local_replica_scores_like_the_runner_and_coalesces(saved) -> None:  # type: ignore[no-untyped-def]
    """CTR_MODEL_REPLICA=local: the pool's one replica is the model in this process; concurrent
    requests share a forward pass and get the runner's own scores; a matrix the runner refuses
    is an invalid answer of that replica, not an exception out of the gateway."""
    import asyncio

    from ctr.model.runner import ModelRunner
    from ctr.serving import root
    from ctr.serving.model_client import InvalidAnswer
    from ctr.settings import Settings

    runner = ModelRunner(saved, "cpu")
    calls: list[int] = []

    def counted(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return runner(x)

    settings = Settings(model_replica="local", model_urls="", retry_attempts=1)
    pool = root.model_pool(settings, width=runner.n_fields, local=counted)
    rng = np.random.default_rng(0)
    xs = [rng.integers(0, runner.cardinalities, size=(n, runner.n_fields)) for n in (3, 5, 7, 11)]
    bad = xs[0].copy()
    bad[0, 0] = int(runner.cardinalities[0])

    async def go() -> list[np.ndarray]:
        await pool.start(background=False)  # no probes: every pass counted is a request's
        try:
            assert [m.replica.name for m in pool.members] == ["local"]
            ys = await asyncio.gather(*(pool.submit(x) for x in xs))
            with pytest.raises(InvalidAnswer):
                await pool.submit(bad)
            return ys
        finally:
            await pool.close()

    for x, y in zip(xs, asyncio.run(go()), strict=True):
        np.testing.assert_allclose(y, runner(x), rtol=1e-5)
    assert len(calls) < len(xs)  # concurrent requests coalesced into fewer passes


def test_each_training_epoch_is_logged_once(log_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Without a terminal (make setup's log) each epoch is one line, with its AUC (it was two)."""
    import logging

    caplog.set_level(logging.INFO)
    train(log_dir, TrainConfig(max_epochs=2))
    lines = [r.getMessage() for r in caplog.records if "epoch 0:" in r.getMessage()]
    assert len(lines) == 1 and "auc" in lines[0], lines


def test_a_saved_model_runs_on_onnx_runtime_with_pytorchs_numbers(saved) -> None:  # type: ignore[no-untyped-def]
    """`save` exports the network for ONNX Runtime; `auto` runs it on the CPU and answers as
    PyTorch does (within the export's tolerance), out-of-range indices refused before either
    engine sees them, no rows answered; `torch` keeps PyTorch; `onnxruntime` refuses what it
    cannot run. The file names no path of this machine."""
    from ctr.model import engine
    from ctr.model.runner import ModelRunner

    assert (saved.path / engine.ONNX).is_file()
    assert str(Path(__file__).resolve().parents[1]).encode() not in (saved.path / engine.ONNX).read_bytes()
    ort, pt = ModelRunner(saved, "cpu"), ModelRunner(saved, "cpu", engine="torch")
    assert (ort.engine, pt.engine) == ("onnxruntime", "torch")
    rng = np.random.default_rng(3)
    for n in (1, 100, 700):
        x = rng.integers(0, ort.cardinalities, size=(n, ort.n_fields))
        got, want = ort(x), pt(x)
        assert got.dtype == np.float32 and got.shape == (n,) and np.abs(got - want).max() <= engine.TOLERANCE
    bad = np.zeros((2, ort.n_fields), dtype=np.int64)
    bad[1, 3] = int(ort.cardinalities[3])
    with pytest.raises(ValueError, match=r"column\(s\) \[3\]"):
        ort(bad)
    assert ort(np.zeros((0, ort.n_fields), dtype=np.int64)).shape == (0,)
    assert ModelRunner(saved, "cpu", precision="int8").engine == "torch"  # quantized: PyTorch's
    with pytest.raises(ValueError, match="float32 on the CPU only"):
        ModelRunner(saved, "cpu", precision="int8", engine="onnxruntime")
    assert engine.resolve("auto", "cuda", "float32", True) == "torch"
    assert engine.resolve("auto", "cpu", "float32", False) == "torch"
    with pytest.raises(ValueError, match=r"no model\.onnx; `ctr train --force`"):
        engine.resolve("onnxruntime", "cpu", "float32", False)
    with pytest.raises(ValueError, match="unknown engine"):
        engine.resolve("tensorrt", "cpu", "float32", True)


def test_an_export_that_is_not_this_models_leaves_pytorch_serving(saved, trained, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A model.onnx that does not load (truncated on disk), or loads but is another network's
    (weights retrained beside an old export): `auto` warns and serves on PyTorch, with
    PyTorch's scores; `onnxruntime`, asked for, refuses to start. (The old runner served the
    other network's scores without a word.)"""
    import copy
    import dataclasses
    import logging
    import shutil

    from ctr.model import engine
    from ctr.model.runner import ModelRunner

    other = copy.deepcopy(trained.model)
    with torch.no_grad():
        other.bias += 1.0
    dirs = {}
    for case in ("truncated", "other weights"):
        dirs[case] = tmp_path / case.replace(" ", "_")
        shutil.copytree(saved.path, dirs[case])
    onnx = dirs["truncated"] / engine.ONNX
    onnx.write_bytes(onnx.read_bytes()[:1000])
    assert engine.export(other, list(ModelRunner(saved, "cpu").cardinalities), dirs["other weights"] / engine.ONNX)
    x = np.random.default_rng(5).integers(0, 3, size=(50, len(trained.model.offsets)))
    want = ModelRunner(saved, "cpu", engine="torch")(x)
    for case, path in dirs.items():
        art = dataclasses.replace(saved, path=path)
        caplog.clear()
        with caplog.at_level(logging.WARNING, "ctr.model.runner"):
            runner = ModelRunner(art, "cpu")
        assert runner.engine == "torch" and "model.onnx is not usable" in caplog.text, case
        assert np.abs(runner(x) - want).max() == 0.0, case
        with pytest.raises(ValueError, match="is not this model's"):
            ModelRunner(art, "cpu", engine="onnxruntime")


def test_a_large_call_on_onnx_runtime_answers_as_pytorch(saved) -> None:  # type: ignore[no-untyped-def]
    """Past LARGE_ROWS a call gives its arena memory back (without it, a 200,000-row call kept
    ~460 MB for the process's life); the answers are the same."""
    import psutil

    from ctr.model import engine
    from ctr.model.runner import ModelRunner

    ort, pt = ModelRunner(saved, "cpu"), ModelRunner(saved, "cpu", engine="torch")
    rng = np.random.default_rng(4)
    x = rng.integers(0, ort.cardinalities, size=(engine.Session.LARGE_ROWS + 1, ort.n_fields))
    assert np.abs(ort(x) - pt(x)).max() <= engine.TOLERANCE
    big = rng.integers(0, ort.cardinalities, size=(200_000, ort.n_fields))
    rss = psutil.Process().memory_info().rss
    assert len(ort(big)) == len(big)
    assert psutil.Process().memory_info().rss - rss < 150 * 2**20


def test_an_export_that_fails_or_disagrees_is_not_kept(trained, tmp_path: Path, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """An export that raises, or whose answers differ from PyTorch's, leaves no model.onnx (the
    model then runs on PyTorch), says so, and is no error."""
    import logging

    from ctr.features import schema
    from ctr.model import engine

    card = list(schema.CARDINALITIES)
    path = tmp_path / engine.ONNX
    monkeypatch.setattr(engine, "TOLERANCE", -1.0)  # every answer "disagrees"
    with caplog.at_level(logging.WARNING, "ctr.model.engine"):
        assert engine.export(trained.model, card, path) is False and not path.exists()
    assert "differ from PyTorch's" in caplog.text
    monkeypatch.setattr(engine, "TOLERANCE", 1e-5)

    def broken(*a: object, **k: object) -> None:
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with caplog.at_level(logging.WARNING, "ctr.model.engine"):
        assert engine.export(trained.model, card, path) is False and not path.exists()
    assert "exporter failed" in caplog.text
