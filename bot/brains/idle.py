"""`idle_stop: auto`: how long a woken backend stays up idle before it is stopped.

A stop followed by a restart is billed: the stop itself, the boot and the model load, or the
provider's billing minimum if that is more. That is the restart cost `R`. Staying up through an
idle gap of `g` seconds costs `g`. Knowing the next gap, the cheapest choice is min(g, R); not
knowing it, we learn from the gaps seen so far.

    no history yet     the ski-rental rule: stay up idle for R, then stop (at most about twice
                       the cheapest choice whatever the gaps are)
    with history       the idle time T that minimises, over the last gaps seen, cost plus
                       latency (`best_idle`):
                           g                       if g <= T   (stayed up)
                           T + R + WAIT_WEIGHT*R   otherwise   (stopped, restarted, maybe waited)

The gaps are kept per context: how busy the last two minutes were (how many messages and typing
starts, in buckets), so a lone question can stop sooner than a lively channel's pause. A context
with fewer than MIN_HISTORY gaps uses the idle time learned over all contexts, which is the best
fixed timeout on the history seen (the same cost), so learning never starts from a guess once
there is any history. A gap runs from the end of the last use (a reply, a pre-wake, a finished
wake) to the next demand (a message, or someone typing).

Someone typing is a message on its way: after a typing start the machine stays up until the
message comes, for at most the hold `H` after the last typing event, learned the same way from
how long typing took to become a message before (typing that never did counts as a gap with no
end). A message ends all the typing seen before it: Discord repeats its typing event every few
seconds while someone types. A fixed timeout cannot do
this: it stops a machine while a slow typist is still typing, and the message then waits for a
whole cold start.

R is measured by the pool: the wake from the start request to the model answering, less the
last polling sleep (the machine may have been ready through it), plus how long the last stop
took. The pool (bot/brains/pool.py) and the cost simulator (simulate.py on the real pool,
simfast.py's quick replay) run this same class.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import deque
from dataclasses import dataclass, field
from itertools import accumulate

AUTO_IDLE_MAX = 900.0  # never stay up idle longer than this
WAIT_WEIGHT = 0.45  # a restart (a cold start someone may wait for) counts as 1.45 of them
WINDOW = 120.0  # seconds of recent demand that set the context
BUCKETS = (1, 2, 3, 5, 8, 13, 21)  # demands in the window: bucket edges
HISTORY = 2000  # gaps kept per context
MIN_HISTORY = 30  # fewer in a context: the idle time learned over all contexts
MIN_GLOBAL = 10  # fewer gaps at all: the ski-rental rule
TYPING_WINDOW = 60.0  # typing with no message this long after it never becomes one
_REFRESH = 20  # recompute an idle time after this many new gaps (or 5% of them)


def best_idle(gaps: list[float], restart: float, penalty: float) -> float:
    """The idle time T in [0, AUTO_IDLE_MAX] minimising the summed cost over sorted `gaps`.

    Between two gap lengths the cost only grows with T, so the minimum is at 0 or at a gap.
    """
    n, stop = len(gaps), restart + penalty
    capped = gaps[: bisect_right(gaps, AUTO_IDLE_MAX)]
    # T = gaps[k-1]: the first k gaps are stayed through, the other n - k cost T + R + penalty
    costs = [
        below + (n - k) * (g + stop)
        for k, (g, below) in enumerate(zip(capped, accumulate(capped), strict=True), 1)
    ]
    best_t, best_cost = 0.0, n * stop
    if costs:
        k = min(range(len(costs)), key=costs.__getitem__)
        if costs[k] < best_cost:
            best_t = capped[k]
    return best_t


@dataclass
class _Book:
    """The last gaps seen in one context, and the idle time they call for (cached)."""

    gaps: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    _best: float | None = None
    _fresh: int = 0

    def add(self, gap: float) -> None:
        self.gaps.append(gap)
        self._fresh += 1
        if self._fresh >= max(_REFRESH, len(self.gaps) // 20):
            self._best = None

    def best(self, restart: float, enough: int) -> float | None:
        """The learned idle time, or None with fewer than `enough` gaps."""
        if len(self.gaps) < enough:
            return None
        if self._best is None:
            self._best = best_idle(sorted(self.gaps), restart, WAIT_WEIGHT * restart)
            self._fresh = 0
        return self._best


@dataclass
class AutoIdle:
    """The learned idle time of one backend; times are the pool's clock, in seconds."""

    billing_minimum: float = 0.0  # the provider bills a session at least this long
    wake: float | None = None  # seconds billed to boot and load, last measured
    stop: float = 0.0  # seconds the last stop took (billed)
    _recent: list[float] = field(default_factory=list)  # demand times, in order
    _books: list[_Book] = field(default_factory=lambda: [_Book() for _ in range(len(BUCKETS) + 1)])
    _all: _Book = field(default_factory=_Book)  # every context's gaps
    _typing: deque[float] = field(default_factory=deque)  # typing starts awaiting a message
    _typed: _Book = field(default_factory=_Book)  # typing start to its message

    @property
    def restart(self) -> float | None:
        """Billed seconds a stop and restart cost; None before the first wake."""
        if self.wake is None:
            return None
        return max(self.billing_minimum, self.wake + self.stop)

    def _context(self, at: float) -> int:
        count = bisect_right(self._recent, at) - bisect_left(self._recent, at - WINDOW)
        return sum(1 for edge in BUCKETS if count >= edge)

    def demand(self, now: float, idle_since: float | None, typing: bool = False) -> None:
        """A message (or, `typing`, someone typing) at `now`; `idle_since`: when the idle gap it
        ends began (None if the backend was busy or waking, so no gap ended)."""
        self._match(now, typing)
        if idle_since is not None:
            gap = max(0.0, now - idle_since)
            self._books[self._context(idle_since)].add(gap)
            self._all.add(gap)
        self._recent.append(now)
        if len(self._recent) > 4 * HISTORY:  # keep what the window can still see
            cut = bisect_left(self._recent, now - 2 * WINDOW - AUTO_IDLE_MAX)
            del self._recent[:cut]

    def _match(self, now: float, typing: bool) -> None:
        """Typing starts waiting for a message; a message ends them all and teaches the hold
        how long it took from the first. Typing a minute old with no message gave up."""
        while self._typing and self._typing[0] < now - TYPING_WINDOW:
            self._typing.popleft()
            self._typed.add(math.inf)  # it never became a message
        if typing:
            self._typing.append(now)
        elif self._typing:  # a message ends every typing seen (Discord repeats its typing event)
            self._typed.add(now - self._typing[0])
            self._typing.clear()

    def limit(self, since: float) -> float:
        """Seconds to stay up idle after a use that ended at `since`."""
        restart = self.restart
        if restart is None:
            return AUTO_IDLE_MAX
        learned = self._books[self._context(since)].best(restart, MIN_HISTORY)
        if learned is None:
            learned = self._all.best(restart, MIN_GLOBAL)
        value = min(AUTO_IDLE_MAX, restart) if learned is None else learned
        if self._typing:  # a message is on its way: hold until it comes, for at most H
            hold = self._typed.best(restart, MIN_GLOBAL)
            hold = min(TYPING_WINDOW, restart if hold is None else hold)
            value = max(value, self._typing[-1] + hold - since)
        return value
