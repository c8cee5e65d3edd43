"""Structured logs (structlog over the standard library's logging), and the events the
service reports: fallback bursts, breaker transitions, replica ejections, rollout decisions.

`CTR_LOG_FORMAT=json` writes one JSON object a line; `text` (the default) a readable
`key=value` line. Every event carries its fields as keys (request_id, arm, model_version,
reasons, ...). Nothing is logged per request at INFO: a request's line is DEBUG
(`CTR_LOG_LEVEL=DEBUG`), because a line per request costs throughput. What is logged at
INFO/WARNING is one line per event a person acts on:

- a fallback burst: one WARNING when fallbacks start after a quiet spell, one when they
  have stopped for `gap_s` (count, duration, reasons) - never a line per fallback;
- a breaker transition (WARNING to open, INFO to half-open or closed);
- a replica ejection or return (`ejection`, for the model pool);
- a rollout decision (`rollout_decision`, for the canary).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

import structlog

Clock = Callable[[], float]
LOGGER = "ctr"
_HANDLER_MARK = "_ctr_structlog"


class _Stderr:
    """Whatever sys.stderr is when a line is written (a test runner may swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(fmt: Literal["json", "text"] = "text", level: str = "INFO", stream: Any = None) -> None:
    """Route the `ctr` loggers (and structlog's) through one handler in `fmt`; idempotent."""
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be json or text, got {fmt!r}")
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    root = logging.getLogger(LOGGER)
    for h in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(h)
    handler = logging.StreamHandler(stream or _Stderr())
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False


def get(name: str = LOGGER) -> Any:
    """A structlog logger under `ctr` (`name` like ctr.serving.gateway)."""
    return structlog.get_logger(name)


_events = get("ctr.events")


def breaker_transition(name: str, source: str, target: str, calls: int, failures: int) -> None:
    """One line per breaker transition: WARNING when it opens, INFO otherwise."""
    level = logging.WARNING if target == "open" else logging.INFO
    _events.log(level, "breaker transition", breaker=name, source=source, to=target, calls=calls, failures=failures)


def ejection(replica: str, ejected: bool, reason: str = "", duration_s: float | None = None, **fields: Any) -> None:
    """The model pool's call when it ejects a replica (WARNING) or lets one back in (INFO)."""
    if ejected:
        _events.warning("replica ejected", replica=replica, reason=reason, duration_s=duration_s, **fields)
    else:
        _events.info("replica returned", replica=replica, **fields)


def rollout_decision(phase: str, share: float, decision: str, reason: str = "", **estimates: Any) -> None:
    """The canary's call for every rollout decision (advance, hold, roll back, promote):
    INFO, WARNING for a roll-back; `estimates` are the gates' figures."""
    level = logging.WARNING if decision in ("rollback", "roll_back", "abort") else logging.INFO
    _events.log(level, "rollout decision", phase=phase, share=share, decision=decision, reason=reason, **estimates)


_requests = get("ctr.requests")
_REQUESTS_STDLIB = logging.getLogger("ctr.requests")


def request(
    request_id: str, arm: str, model_version: str, degraded: list[str], latency_ms: float, client_id: str | None = None
) -> None:
    """A request's line: DEBUG only (callers check `request_logging()` first, it is the hot path);
    `client_request_id` is the caller's X-Request-ID, when it sent one."""
    _requests.debug(
        "predict", request_id=request_id, arm=arm, model_version=model_version, degraded=degraded,
        latency_ms=round(latency_ms, 3), **({"client_request_id": client_id} if client_id else {}),
    )  # fmt: skip


def request_logging() -> bool:
    """Whether per-request lines are on (the `ctr` logger at DEBUG)."""
    return _REQUESTS_STDLIB.isEnabledFor(logging.DEBUG)


class FallbackBursts:
    """One WARNING when fallbacks start after a quiet spell and one when they stop: a burst
    ends when no fallback came for `gap_s` (noticed on the next fallback or on `tick`)."""

    def __init__(self, gap_s: float = 10.0, clock: Clock = time.monotonic, logger: Any = None) -> None:
        if gap_s <= 0:
            raise ValueError(f"gap_s must be > 0, got {gap_s}")
        self.gap_s, self.clock = gap_s, clock
        self.log = logger or _events
        self._start: float | None = None
        self._last = 0.0
        self._count = 0
        self._reasons: dict[str, int] = {}
        self.bursts = 0

    @property
    def active(self) -> bool:
        return self._start is not None

    def record(self, reason: str, request_id: str, arm: str, model_version: str, degraded: list[str]) -> None:
        now = self.clock()
        self.tick(now)
        if self._start is None:
            self._start, self._count, self._reasons = now, 0, {}
            self.bursts += 1
            self.log.warning(
                "fallback burst started", reason=reason, request_id=request_id, arm=arm,
                model_version=model_version, degraded=degraded,
            )  # fmt: skip
        self._last = now
        self._count += 1
        reason = str(reason)  # a plain str key, whatever the caller passed (ctr.degraded.Reason)
        self._reasons[reason] = self._reasons.get(reason, 0) + 1

    def tick(self, now: float | None = None) -> None:
        """End the burst when it has been quiet for gap_s."""
        now = self.clock() if now is None else now
        if self._start is not None and now - self._last >= self.gap_s:
            self.log.warning(
                "fallback burst ended", fallbacks=self._count, duration_s=round(self._last - self._start, 3),
                reasons=dict(self._reasons),
            )  # fmt: skip
            self._start = None
