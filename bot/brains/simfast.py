"""The cost simulator's quick arithmetic: a sweep of fixed idle timeouts, and the optimum.

`replay()` follows one backend through a trace by events instead of a clock: the same rules as
the pool (pool.py) on the virtual loop, written out so a few hundred timeouts can be swept in
seconds (`sweep()`: the events sorted once and the rules inlined for a fixed timeout). Tests
replay the same traces through the pool, `replay` and `sweep` and compare them, so they cannot
drift. The rule is the pool's own (idle.AutoIdle for `auto`), told of each demand and whether it
is someone typing.

    typing        pre-wake: a sleeping machine is started; an up one counts as used now
    message       wakes a sleeping machine and waits for it; answered in `service` seconds
    idle check    every `check` seconds (on the clock's grid): an up machine with nothing in
                  flight, idle for its limit, is stopped; the stop takes `stop` seconds
    billing       each start-to-stop session, at least `billing_minimum` seconds

`optimum()` is the cheapest schedule that adds no wait, knowing the whole trace: each run of
messages is served by one session that starts exactly a cold start before its first message and
stops after its last reply; where to cut the runs is found exactly (dynamic programming, linear
time because a session's cost is max(minimum, length) and both sides are monotone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from bot.brains.simtrace import Machine, Message


class IdleRule(Protocol):
    wake: float | None  # measured by the pool: seconds to boot and load
    stop: float  # and to stop

    def limit(self, since: float) -> float: ...

    def demand(self, now: float, idle_since: float | None, typing: bool = False) -> None: ...


@dataclass
class Fixed:
    """A fixed idle timeout."""

    seconds: float
    wake: float | None = None
    stop: float = 0.0

    def limit(self, since: float) -> float:
        return self.seconds

    def demand(self, now: float, idle_since: float | None, typing: bool = False) -> None:
        return None


@dataclass
class Outcome:
    billed: float = 0.0  # seconds, over the whole trace
    busy: float = 0.0
    starts: int = 0
    waits: list[float] = field(default_factory=list)  # per message sent: added wait, seconds

    @property
    def cold_hits(self) -> int:
        return sum(1 for w in self.waits if w > 1e-9)


@dataclass
class _Box:
    """One machine's state between events."""

    machine: Machine
    rule: IdleRule
    check: float
    billing_minimum: float
    state: str = "asleep"  # asleep | waking | up
    woken_at: float = 0.0
    ready_at: float = 0.0
    last_used: float = 0.0
    used_once: bool = False
    free_at: float = 0.0  # the end of the last stop
    busy_until: float = 0.0
    out: Outcome = field(default_factory=Outcome)

    def advance(self, now: float) -> None:
        """Bring the machine to `now`: a wake that finished, a stop that happened."""
        if self.state == "waking" and self.ready_at <= now:
            self.state, self.last_used = "up", max(self.last_used, self.ready_at)
            self.rule.wake = self.machine.boot + self.machine.load
        if self.state != "up":
            return
        due = max(self.last_used + self.rule.limit(self.last_used), self.busy_until)
        tick = math.ceil(due / self.check - 1e-9) * self.check
        if tick < now:
            self._stop(tick)

    def _stop(self, at: float) -> None:
        self.free_at = at + self.machine.stop
        self.out.billed += max(self.billing_minimum, self.free_at - self.woken_at)
        self.rule.stop = self.machine.stop
        self.state = "asleep"

    def demand(self, now: float, typing: bool = True) -> None:
        """Someone is typing or has sent a message: wake, or count as used."""
        idle = self.state != "waking" and self.busy_until <= now and self.used_once
        self.rule.demand(now, self.last_used if idle else None, typing)
        if self.state == "asleep":
            self.state, self.woken_at = "waking", max(now, self.free_at)
            self.ready_at = self.woken_at + self.machine.boot + self.machine.load
            self.out.starts += 1
        elif self.state == "up":
            self.last_used = max(self.last_used, now)
        self.used_once = True

    def message(self, now: float) -> None:
        self.demand(now, typing=False)
        start = now if self.state == "up" else self.ready_at
        self.out.waits.append(start - now)
        end = start + self.machine.service
        self.out.busy += end - max(start, self.busy_until)
        self.busy_until = max(self.busy_until, end)
        self.last_used = max(self.last_used, end)


def replay(
    trace: list[Message],
    machine: Machine,
    rule: IdleRule,
    *,
    check: float = 1.0,
    billing_minimum: float = 0.0,
    prewake: bool = True,
) -> Outcome:
    """One backend through `trace` under `rule`; see the module's docstring."""
    events = _events(trace, prewake)
    box = _Box(machine, rule, check, billing_minimum)
    for at, kind in events:
        box.advance(at)
        if kind:
            box.message(at)
        else:
            box.demand(at)
    box.advance(math.inf)
    return box.out


def optimum(trace: list[Message], machine: Machine, billing_minimum: float = 0.0) -> Outcome:
    """The cheapest schedule that adds no wait (see the module's docstring)."""
    ats = sorted(m.at for m in trace if m.sent)
    n, s = len(ats), machine.service
    fixed = machine.boot + machine.load + machine.stop + s  # a session's length beyond its span
    f = [0.0] * (n + 1)  # f[j]: the cheapest cover of the first j messages
    parent = [0] * (n + 1)  # where the last session of f[j] begins
    best = [(math.inf, 0)] * (n + 1)  # best[k]: min over i < k of (f[i] - ats[i], i)
    k = 0
    for j in range(1, n + 1):
        best[j] = min(best[j - 1], (f[j - 1] - ats[j - 1], j - 1))
        edge = ats[j - 1] + fixed - billing_minimum  # sessions from ats[i] <= edge are long
        while k < j and ats[k] <= edge:
            k += 1
        long_run = best[k][0] + ats[j - 1] + fixed if k > 0 else math.inf
        short_run = f[k] + billing_minimum if k < j else math.inf
        f[j], parent[j] = (long_run, best[k][1]) if long_run <= short_run else (short_run, k)
    out = Outcome(billed=f[n], waits=[0.0] * n)
    j = n
    while j > 0:
        out.starts, j = out.starts + 1, parent[j]
    end = -math.inf
    for at in ats:
        out.busy += at + s - max(at, end)
        end = at + s
    return out


def _events(trace: list[Message], prewake: bool) -> list[tuple[float, int]]:
    events: list[tuple[float, int]] = []  # (time, 0 typing | 1 message)
    for m in trace:
        if prewake and m.typing > 0:
            events.append((m.at - m.typing, 0))
        if m.sent:
            events.append((m.at, 1))
    events.sort()
    return events


def sweep(
    trace: list[Message],
    machine: Machine,
    timeouts: tuple[float, ...],
    *,
    check: float = 1.0,
    billing_minimum: float = 0.0,
) -> list[Outcome]:
    """`replay` with each fixed timeout of `timeouts` (and pre-wake), the events sorted once and
    `_Box`'s rules inlined: the same outcomes (a test compares them), several times faster."""
    events = _events(trace, prewake=True)
    return [_fixed(events, machine, t, check, billing_minimum) for t in timeouts]


def _fixed(
    events: list[tuple[float, int]], machine: Machine, limit: float, check: float, minimum: float
) -> Outcome:
    wake, stop, service = machine.boot + machine.load, machine.stop, machine.service
    out = Outcome()
    waits = out.waits
    ceil = math.ceil
    state = 0  # 0 asleep, 1 waking, 2 up
    woken_at = ready_at = last_used = free_at = busy_until = 0.0
    billed = busy = 0.0
    starts = 0
    for now, kind in [*events, (math.inf, 2)]:
        if state == 1 and ready_at <= now:
            state, last_used = 2, max(last_used, ready_at)
        if state == 2:
            due = max(last_used + limit, busy_until)
            tick = ceil(due / check - 1e-9) * check
            if tick < now:
                free_at = tick + stop
                billed += max(minimum, free_at - woken_at)
                state = 0
        if kind == 2:
            break
        if state == 0:
            state, woken_at = 1, max(now, free_at)
            ready_at = woken_at + wake
            starts += 1
        elif state == 2:
            last_used = max(last_used, now)
        if kind:
            start = now if state == 2 else ready_at
            waits.append(start - now)
            end = start + service
            busy += end - max(start, busy_until)
            busy_until = max(busy_until, end)
            last_used = max(last_used, end)
    out.billed, out.busy, out.starts = billed, busy, starts
    return out
