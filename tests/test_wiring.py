"""The wiring hands every part to the gateway it builds (a merge once dropped the canary arms,
so every request went to stable and the gates never saw canary traffic)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

from ctr.features.transform import TransformSpec
from ctr.model.segments import SegmentTable
from ctr.serving import wiring
from ctr.settings import Settings

SPEC = TransformSpec(0.04, tuple(np.linspace(0.02, 0.06, 19)), tuple(np.linspace(0.02, 0.06, 19)))
TABLE = SegmentTable({"mobile|news": 30.0}, {"mobile|news": 1000.0}, 400.0, 10_000.0)


def test_the_gateway_gets_the_canary_arms() -> None:
    """wiring.gateway(..., arms) builds a Gateway whose arms are those arms."""
    art: Any = SimpleNamespace(spec=SPEC, segments=TABLE, tag="ctr_model:test")
    stack: Any = SimpleNamespace(lookup=object())
    arms: Any = SimpleNamespace(route=None, record=None)
    gw = wiring.gateway(Settings(), art, object(), stack, arms=arms)  # type: ignore[arg-type]
    assert gw.arms is arms
    assert wiring.gateway(Settings(), art, object(), stack).arms is None  # type: ignore[arg-type]
