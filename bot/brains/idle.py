"""`idle_stop: auto`: how long a woken backend stays up idle before it is stopped.

A stop followed by a restart is billed: the stop itself, the boot and the model load, or the
provider's billing minimum if that is more. That is the restart cost `R`. Staying up through an
idle gap of `g` seconds costs `g`. Knowing the next gap, the cheapest choice is min(g, R); not
knowing it, we learn from the gaps seen so far.

    no history yet     the ski-rental rule: stay up idle for R, then stop (at most about twice
                       the cheapest choice whatever the gaps are)
    with history       the idle time T that minimises, over the last gaps seen in the same
                       context, cost plus latency:
                           g                       if g <= T   (stayed up)
                           T + R + WAIT_WEIGHT*R   otherwise   (stopped, restarted, maybe waited)

The context is how busy the last two minutes were (how many messages and typing starts, in
buckets), so a lone question stops soon after its answer and a lively channel stays up through
its pauses. A gap runs from the end of the last use (a reply, a pre-wake, a finished wake) to the
next demand (a message, or someone typing). R is measured by the pool: the wake from the start
request to the model answering, less the last polling sleep (the machine may have been ready
through it), plus how long the last stop took.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

AUTO_IDLE_MAX = 900.0  # never stay up idle longer than this
WAIT_WEIGHT = 0.45  # a restart (a cold start someone may wait for) counts as 1.45 of them
WINDOW = 120.0  # seconds of recent demand that set the context
BUCKETS = (1, 2, 3, 5, 8, 13, 21)  # demands in the window: bucket edges
HISTORY = 2000  # gaps kept per context
MIN_HISTORY = 30  # fewer in a context: the ski-rental rule
_REFRESH = 20  # recompute a context's idle time after this many new gaps


def best_idle(gaps: list[float], restart: float, penalty: float) -> float:
    """The idle time T in [0, AUTO_IDLE_MAX] minimising the summed cost over sorted `gaps`.

    Between two gap lengths the cost only grows with T, so the minimum is at 0 or at a gap.
    """
    n = len(gaps)
    best_t, best_cost, below = 0.0, n * (restart + penalty), 0.0
    for k, g in enumerate(gaps, 1):  # T = g: the first k gaps are stayed through
        if g > AUTO_IDLE_MAX:
            break
        below += g
        cost = below + (n - k) * (g + restart + penalty)
        if cost < best_cost:
            best_t, best_cost = g, cost
    return best_t


@dataclass
class AutoIdle:
    """The learned idle time of one backend; times are the pool's clock, in seconds."""

    billing_minimum: float = 0.0  # the provider bills a session at least this long
    wake: float | None = None  # seconds billed to boot and load, last measured
    stop: float = 0.0  # seconds the last stop took (billed)
    _recent: deque[float] = field(default_factory=deque)  # demand times
    _gaps: list[deque[float]] = field(
        default_factory=lambda: [deque(maxlen=HISTORY) for _ in range(len(BUCKETS) + 1)]
    )
    _limits: list[float | None] = field(default_factory=lambda: [None] * (len(BUCKETS) + 1))
    _fresh: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))

    @property
    def restart(self) -> float | None:
        """Billed seconds a stop and restart cost; None before the first wake."""
        if self.wake is None:
            return None
        return max(self.billing_minimum, self.wake + self.stop)

    def _context(self, at: float) -> int:
        count = sum(1 for t in self._recent if at - WINDOW <= t <= at)
        return sum(1 for edge in BUCKETS if count >= edge)

    def demand(self, now: float, idle_since: float | None) -> None:
        """A message or typing at `now`; `idle_since`: when the idle gap it ends began
        (None if the backend was busy or waking, so no gap ended)."""
        if idle_since is not None:
            context = self._context(idle_since)
            self._gaps[context].append(max(0.0, now - idle_since))
            self._fresh[context] += 1
            if self._fresh[context] >= _REFRESH:
                self._limits[context] = None
        self._recent.append(now)
        while self._recent and self._recent[0] < now - 2 * WINDOW - AUTO_IDLE_MAX:
            self._recent.popleft()

    def limit(self, since: float) -> float:
        """Seconds to stay up idle after a use that ended at `since`."""
        restart = self.restart
        if restart is None:
            return AUTO_IDLE_MAX
        context = self._context(since)
        if len(self._gaps[context]) < MIN_HISTORY:
            return min(AUTO_IDLE_MAX, restart)
        value = self._limits[context]
        if value is None:
            value = best_idle(sorted(self._gaps[context]), restart, WAIT_WEIGHT * restart)
            self._limits[context], self._fresh[context] = value, 0
        return value
