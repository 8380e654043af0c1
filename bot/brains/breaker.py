"""A circuit breaker per backend: after a failure, rest for a while, longer each time.

    closed ──failure──▶ open (for base * factor^(n-1) seconds, at most `cap`)
      ▲                   │ the rest is over
      └──success── half-open: the next request tries it; a failure opens it again, for longer

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

    def allows(self) -> bool:
        """True unless the backend is resting after a failure."""
        return self._clock() >= self.open_until

    @property
    def state(self) -> str:
        if self.failures == 0:
            return "closed"
        return "half-open" if self.allows() else "open"

    def failure(self) -> float:
        """Record a failure; returns how many seconds the backend now rests."""
        self.failures += 1
        delay = min(self.cap, self.base * self.factor ** (self.failures - 1))
        self.open_until = self._clock() + delay
        return delay

    def rest(self, seconds: float) -> None:
        """Record a failure whose rest the backend named (e.g. Retry-After): exactly that long."""
        self.failures += 1
        self.open_until = self._clock() + max(0.0, seconds)

    def success(self) -> None:
        self.failures = 0
        self.open_until = 0.0

    def remaining(self) -> float:
        return max(0.0, self.open_until - self._clock())
