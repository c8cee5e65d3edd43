"""Whole rollouts through the real canary code with real trained models (bounded version;
`make canary-sim` runs the full one): each bad canary is rolled back by the right gate, a
good one is promoted through every phase, A/A canaries are rarely rolled back."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from ctr.bench import canary_sim as sim
from ctr.serving.canary.plan import default_plan

# The default plan's phases and durations, gates looked at every 10 simulated minutes.
PLAN = dataclasses.replace(default_plan(), interval_s=600.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> sim.World:
    return sim.build_world(sim.DEFAULT_WORLD, Path(tmp_path_factory.mktemp("canary-sim")))


def test_models_differ_as_intended(world: sim.World) -> None:
    """Shuffled labels and a tenth of the data really earn a lower CTR; x3 keeps the ranking."""
    arms = world.arms
    assert arms["shuffled"].p_true < 0.8 * arms["stable"].p_true
    assert arms["tenth"].p_true < 0.9 * arms["stable"].p_true
    assert arms["miscalibrated"].p_true == arms["stable"].p_true
    assert arms["miscalibrated"].pred_mean > 2.5 * arms["stable"].pred_mean
    assert arms["good"].p_true >= arms["stable"].p_true


@pytest.mark.parametrize("canary", sim.BAD)
def test_bad_canary_is_rolled_back_by_the_right_gate(world: sim.World, canary: str) -> None:
    o = asyncio.run(sim.rollout(world, canary, seed=3, plan=PLAN))
    assert (o.status, o.gate) == ("rolled_back", sim.EXPECTED_GATE[canary]), o.reason
    assert o.phase == 0 and o.peak_share < 0.02  # caught at 1 %, before it reached more users


def test_good_canary_is_promoted_through_every_phase(world: sim.World) -> None:
    o = asyncio.run(sim.rollout(world, "good", seed=5, plan=PLAN))
    assert o.status == "promoted" and o.phase == len(PLAN.phases), o.reason
    assert o.sim_time_s >= sum(p.duration_s for p in PLAN.phases)  # no phase cut short


def test_aa_canaries_are_rarely_rolled_back(world: sim.World) -> None:
    """20 A/A seeds here (make canary-sim runs 100+): at most one false rollback."""
    aa = sim.World(world.cfg, {**world.arms, "aa": world.arms["stable"]}, world.metrics)
    outs = [asyncio.run(sim.rollout(aa, "aa", seed=1000 + i, plan=PLAN)) for i in range(20)]
    assert sum(o.status == "rolled_back" for o in outs) <= 1
    assert sum(o.status == "promoted" for o in outs) >= 18
