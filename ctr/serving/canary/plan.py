"""Rollout plans as data: phases (share, minimum duration, gates that must show
non-inferiority before the phase may advance) or a linear ramp min(100 %, p0 + r t).

Default: the reference design's 1 % for 1 h, 5 % for 2 h, 20 % for 4 h, 50 % for 8 h,
then 100 % (promotion). A phase advances once its duration has passed AND the required
gates show the canary is not worse than each threshold; past `max_phase_factor` x its
duration without that evidence, `on_timeout` decides: hold for a person (the default, as
Argo Rollouts pauses on an inconclusive analysis; the harm tests keep running while held),
or roll back (lack of evidence is then treated as failure: at low traffic that rolls back
good canaries, see README "Canary releases").
A plan may begin with a **shadow** phase (share 0: no user sees the canary): the canary
scores a sample of stable's requests off the response path and the paired gate
(`paired.py`) on the joined feedback decides, as the split's gates decide a split phase.
At 1 % the CTR gate cannot prove non-inferiority within a 1 % margin in an hour at any
realistic traffic (notes/canary-statistics.md: ~1.5 M canary impressions), so the first
phase requires only the cheap gates; every later phase, and so promotion, requires all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

GATES = ("errors", "latency", "ctr", "calibration")
CHEAP_GATES = ("errors", "latency", "calibration")
SHADOW_GATES = ("paired",)  # the shadow phase's gate (ctr/serving/canary/paired.py)


@dataclass(frozen=True, slots=True)
class Phase:
    share: float  # of users, 0..1
    duration_s: float  # minimum time in the phase
    require: tuple[str, ...] = GATES  # gates that must pass non-inferiority to advance
    shadow: bool = False  # share 0: the canary only scores a sample of stable's requests (paired gate)

    def __post_init__(self) -> None:
        if self.shadow:
            if self.share != 0:
                raise ValueError(f"a shadow phase's share is 0 (no user sees the canary), got {self.share}")
            if self.require == GATES:
                object.__setattr__(self, "require", SHADOW_GATES)
        elif not 0 < self.share < 1:
            raise ValueError(f"a phase's share must be in (0, 1) (1 is promotion), got {self.share}")
        if self.duration_s < 0:
            raise ValueError(f"duration_s must be >= 0, got {self.duration_s}")
        known = SHADOW_GATES if self.shadow else GATES
        unknown = set(self.require) - set(known)
        if unknown:
            raise ValueError(f"unknown gates {sorted(unknown)} for this phase; known: {list(known)}")


@dataclass(frozen=True, slots=True)
class Plan:
    """Phases in order (shares rising); promotion follows the last one."""

    phases: tuple[Phase, ...]
    kind: Literal["phases", "ramp"] = "phases"
    # ramp: share(t) = min(1, p0 + rate_per_s * t); promotion once it reaches 1 and all gates pass
    p0: float = 0.0
    rate_per_s: float = 0.0
    max_phase_factor: float = 2.0
    on_timeout: Literal["rollback", "hold"] = "hold"
    interval_s: float = 60.0  # how often the controller evaluates the gates
    ramp_hold_share: float = 0.5  # a ramp waits here until every gate proves non-inferiority

    def __post_init__(self) -> None:
        if self.kind == "phases":
            if not self.phases:
                raise ValueError("a phased plan needs at least one phase")
            shares = [p.share for p in self.phases]
            if shares != sorted(shares) or len(set(shares)) != len(shares):
                raise ValueError(f"phase shares must rise strictly, got {shares}")
            if any(p.shadow for p in self.phases[1:]) or (self.phases[0].shadow and len(self.phases) < 2):
                raise ValueError("a shadow phase may only come first, and split phases must follow it")
        elif not (0 <= self.p0 < 1 and self.rate_per_s > 0):
            raise ValueError("a ramp needs 0 <= p0 < 1 and rate_per_s > 0")
        if self.max_phase_factor < 1:
            raise ValueError(f"max_phase_factor must be >= 1, got {self.max_phase_factor}")
        if self.interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s}")

    def share(self, phase: int, phase_elapsed_s: float, total_elapsed_s: float) -> float:
        """The canary's share of users in `phase` (an index; len(phases) is promotion)."""
        if self.kind == "ramp":
            if phase >= 1:
                return 1.0
            return min(self.ramp_hold_share, self.p0 + self.rate_per_s * total_elapsed_s)
        return 1.0 if phase >= len(self.phases) else self.phases[phase].share

    def n_phases(self) -> int:
        """Phases before promotion (a ramp is one)."""
        return 1 if self.kind == "ramp" else len(self.phases)

    def min_duration_s(self, phase: int) -> float:
        """How long `phase` lasts at least (a ramp: until it reaches its hold share)."""
        if self.kind == "ramp":
            return max(0.0, (self.ramp_hold_share - self.p0) / self.rate_per_s)
        return self.phases[phase].duration_s

    def is_shadow(self, phase: int) -> bool:
        """Whether `phase` is a shadow phase (share 0, judged by the paired gate)."""
        return self.kind == "phases" and 0 <= phase < len(self.phases) and self.phases[phase].shadow

    def required(self, phase: int) -> tuple[str, ...]:
        return GATES if self.kind == "ramp" else self.phases[phase].require

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["phases"] = [{**asdict(p), "require": list(p.require)} for p in self.phases]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        phases = tuple(
            Phase(
                float(p["share"]), float(p["duration_s"]), tuple(p.get("require", GATES)), bool(p.get("shadow", False))
            )
            for p in d.get("phases", [])
        )
        keys = ("kind", "p0", "rate_per_s", "max_phase_factor", "on_timeout", "interval_s", "ramp_hold_share")
        return cls(phases, **{k: d[k] for k in keys if k in d})


def default_plan(scale: float = 1.0, shadow_s: float = 0.0, **kw: Any) -> Plan:
    """1 % 1 h, 5 % 2 h, 20 % 4 h, 50 % 8 h; `scale` multiplies every duration (minutes for a demo);
    `shadow_s` > 0 puts a shadow phase of that long (times `scale`) before them."""
    h = 3600.0 * scale
    shadow = (Phase(0.0, shadow_s * scale, SHADOW_GATES, shadow=True),) if shadow_s > 0 else ()
    return Plan(
        (*shadow, Phase(0.01, 1 * h, CHEAP_GATES), Phase(0.05, 2 * h), Phase(0.20, 4 * h), Phase(0.50, 8 * h)),
        interval_s=max(1.0, 60.0 * scale),
        **kw,
    )


def ramp_plan(p0: float, rate_per_h: float, **kw: Any) -> Plan:
    """Traffic(t) = min(100 %, p0 + r t), held at `ramp_hold_share` until every gate shows non-inferiority."""
    return Plan((), kind="ramp", p0=p0, rate_per_s=rate_per_h / 3600.0, **kw)
