"""Seeing the service work: SLIs and SLO burn rates (`sli`), structured logs and the events
worth a line (`log`), progress of long steps (`progress`).

Owns: `sli` (per-second windows per arm and stage, objectives, burn rates, the gauges on
/metrics), `log` (structlog set-up, fallback bursts, breaker transitions, ejections, rollout
decisions), `progress` (a rich bar on a terminal, log lines otherwise).
May import: `ctr.metrics`, `ctr.settings`. Everything else may import it (the breaker logs
its transitions through it).
"""
