"""A circuit breaker per backend: after a failure, rest for a while, longer each time.

    closed ──failure──▶ open (for base * factor^(n-1) seconds, at most `cap`)
      ▲                   │ the rest is over
      └──success── half-open: one request (the probe) tries it; a failure opens it again,
                   for longer. Others see it resting until the probe is decided.

Failures while it is already open (concurrent requests that failed together) count once.

The clock is injected so tests (and the cost simulator) can move time by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitBreaker:
    def __init__(
        self,
        *,
        base: float = 5.0,
        cap: float = 300.0,
        factor: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base = base
        self.cap = cap
        self.factor = factor
        self._clock = clock
        self.failures = 0
        self.open_until = 0.0
        self.probing = False

    def allows(self) -> bool:
        """True unless the backend is resting after a failure (or its probe is under way)."""
        return self._clock() >= self.open_until and not self.probing

    def begin(self) -> bool:
        """A request starts on the backend; True if it is the half-open probe."""
        if self.failures and self.allows():
            self.probing = True
            return True
        return False

    def abandon(self) -> None:
        """The probe ended without a verdict (cancelled, or the request's own fault)."""
        self.probing = False

    @property
    def state(self) -> str:
        if self.failures == 0:
            return "closed"
        return "half-open" if self._clock() >= self.open_until else "open"

    def failure(self) -> float:
        """Record a failure; returns how many seconds the backend now rests."""
        self.probing = False
        if self._clock() < self.open_until:  # it failed together with others: count once
            return self.remaining()
        self.failures += 1
        delay = min(self.cap, self.base * self.factor ** (self.failures - 1))
        self.open_until = self._clock() + delay
        return delay

    def rest(self, seconds: float) -> None:
        """Record a failure whose rest the backend named (e.g. Retry-After): exactly that long."""
        self.failures += 1
        self.open_until = self._clock() + max(0.0, seconds)

    def success(self) -> None:
        self.probing = False
        self.failures = 0
        self.open_until = 0.0

    def remaining(self) -> float:
        return max(0.0, self.open_until - self._clock())
