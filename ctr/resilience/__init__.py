"""Resilience: the circuit breaker, retries with a retry budget, and deadline-bounded calls.

Owns: `CircuitBreaker` (error-rate window, injected clock), `Retrier` and `RetryBudget`
(tenacity), `guarded` and `retried` (breaker + timeout, retry within a deadline).
May import: `ctr.metrics`, `ctr.settings` and `ctr.observe` (the breaker logs its
transitions) only; everything else imports this.
"""

from ctr.resilience.breaker import BreakerOpen, CircuitBreaker, State
from ctr.resilience.deadline import REMOTE_ERRORS, guarded, retried
from ctr.resilience.retry import Retrier, RetryBudget

__all__ = ["REMOTE_ERRORS", "BreakerOpen", "CircuitBreaker", "Retrier", "RetryBudget", "State", "guarded", "retried"]
