"""A gateway process's telemetry, made once by the composition root (ctr.serving.root) and
handed to what records into it: the SLI recorder (the status page's figures), the
fallback-burst log, and the stage timers over both the recorder and Prometheus.

Prometheus' metrics (ctr.metrics) stay module-level: the client library keeps one registry
per process by design and `/metrics` scrapes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ctr.observe.log import FallbackBursts
from ctr.observe.sli import Objectives, SliRecorder, StageTimer
from ctr.settings import Settings


@dataclass(frozen=True, slots=True)
class Telemetry:
    sli: SliRecorder = field(default_factory=SliRecorder)
    bursts: FallbackBursts = field(default_factory=FallbackBursts)

    @classmethod
    def from_settings(cls, settings: Settings) -> Telemetry:
        """The SLO objectives (CTR_SLO_*), whether SLIs are recorded (CTR_SLI) and the
        fallback-burst gap (CTR_FALLBACK_BURST_GAP_S)."""
        objectives = Objectives(
            settings.slo_availability, settings.slo_model_scored, settings.slo_p99_ms, settings.slo_burn_page
        )
        recorder = SliRecorder(objectives)
        recorder.enabled = settings.sli
        return cls(recorder, FallbackBursts(settings.fallback_burst_gap_s))

    def stage(self, name: str) -> StageTimer:
        """A stage's timer: `ctr_stage_latency_seconds{stage=name}` and this recorder."""
        return StageTimer(name, self.sli)
