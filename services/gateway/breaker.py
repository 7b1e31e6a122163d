"""A circuit breaker per downstream: after ``failures`` consecutive failures the
downstream is skipped (callers degrade at once) for ``reset_seconds``, then one probe
call is let through; its success closes the breaker."""

from __future__ import annotations

import time

from prometheus_client import Gauge

BREAKER_OPEN = Gauge(
    "mercato_gateway_breaker_open", "1 while a downstream's circuit breaker is open.", ["target"]
)


class CircuitBreaker:
    """Consecutive-failure breaker with a half-open probe."""

    def __init__(self, name: str, failures: int = 5, reset_seconds: float = 2.0) -> None:
        self.name = name
        self.threshold = failures
        self.reset_seconds = reset_seconds
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        self._probing = False
        self._gauge = BREAKER_OPEN.labels(name)

    def allow(self) -> bool:
        """True when a call may go through now."""
        if self.opened_at is None:
            return True
        if time.monotonic() - self.opened_at >= self.reset_seconds and not self._probing:
            self._probing = True  # one probe at a time
            return True
        return False

    def abandon(self, was_probe: bool) -> None:
        """A call ended without an outcome (cancelled by its caller). When it was the probe,
        free the probe slot: otherwise the breaker would stay open for good."""
        if was_probe:
            self._probing = False

    def success(self) -> None:
        """Record a successful call (closes the breaker)."""
        self.consecutive_failures = 0
        self.opened_at = None
        self._probing = False
        self._gauge.set(0)

    def failure(self) -> None:
        """Record a failed call (may open the breaker)."""
        self.consecutive_failures += 1
        self._probing = False
        if self.consecutive_failures >= self.threshold:
            self.opened_at = time.monotonic()
            self._gauge.set(1)

    @property
    def is_open(self) -> bool:
        """True while calls are being skipped."""
        return self.opened_at is not None
