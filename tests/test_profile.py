"""The profile summary: py-spy's raw stacks summed by the package of the running frame."""

from ctr.bench.profile import format_summary, package_of, summarize

RAW = [
    "run (asyncio/runners.py:118);predict (ctr/http.py:40);matrix (ctr/transform.py:148) 30",
    "run (asyncio/runners.py:118);__call__ (opentelemetry/instrumentation/asgi/__init__.py:724) 12",
    "run (asyncio/runners.py:118);forward (models/deepfm.py:80);linear (torch/nn/modules/linear.py:125) 50",
    "run (asyncio/runners.py:118);_run_once (asyncio/base_events.py:1922) 8",
    "",
    "not a stack line",
]


def test_package_of_names_the_innermost_frame_s_package() -> None:
    assert package_of("matrix (ctr/transform.py:148)") == "ctr (ours)"
    assert package_of("forward (models/deepfm.py:80)") == "models (ours)"
    assert package_of("linear (torch/nn/modules/linear.py:125)") == "torch"
    assert package_of("x (site-packages/opentelemetry/trace/__init__.py:1200)") == "opentelemetry"
    assert package_of("uuid4 (uuid.py:724)") == "other"


def test_summarize_counts_samples_by_package_and_skips_junk() -> None:
    total, by = summarize(RAW)
    assert total == 100
    assert by == {"ctr (ours)": 30, "opentelemetry": 12, "torch": 50, "asyncio": 8}


def test_format_summary_gives_shares_and_busy_fraction() -> None:
    total, by = summarize(RAW)
    text = format_summary("ctr_gateway", total, by, rate=100, duration_s=2.0)
    assert "busy 50% of one core" in text
    assert "| torch | 50.0% |" in text
    assert text.index("torch") < text.index("ctr (ours)") < text.index("opentelemetry")
    assert format_summary("idle", 0, summarize([])[1], rate=100, duration_s=1.0).startswith("idle: 0 samples")
