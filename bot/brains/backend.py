"""One backend of the pool as this process knows it: its brain, wake driver, prices, breaker,
state, leases and the learned idle time. The pool (pool.py) routes, wakes and stops them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol

from bot.brains.base import Brain
from bot.brains.breaker import CircuitBreaker
from bot.brains.idle import AutoIdle
from bot.brains.lease import Lease
from bot.brains.wake import WakeDriver


class PoolBrain(Brain, Protocol):
    async def ready(self, model: str) -> bool:
        """True once the backend answers with `model` loaded."""
        ...


def normalize_model(name: str) -> str:
    """Ollama's rule: a name without a tag means `name:latest`."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


@dataclass(eq=False)
class Backend:
    name: str
    brain: PoolBrain
    driver: WakeDriver
    models: frozenset[str] = frozenset()  # normalised; empty serves any model
    usd_per_second: Decimal = Decimal(0)
    usd_per_input_token: Decimal = Decimal(0)  # kind: openai, billed per token
    usd_per_output_token: Decimal = Decimal(0)
    max_context: int | None = None  # tokens; a request needing more skips this backend
    idle_stop: float | None = 300.0  # None: "auto", see idle_limit()
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    state: str = "asleep"  # asleep | waking | up | stopping (as this process knows it)
    last_used: float = 0.0
    woken_at: float | None = None
    cold_starts: int = 0
    wake_seconds: float | None = None  # how long the last cold start took
    leases: set[Lease] = field(default_factory=set)
    auto: AutoIdle = field(default_factory=AutoIdle)  # the learned idle time, for "auto"
    _used: bool = False  # a demand has been seen, so later ones end idle gaps
    _wake: asyncio.Task[None] | None = None
    _stop: asyncio.Event | None = None  # set when a stop under way has finished

    def __post_init__(self) -> None:
        self.models = frozenset(normalize_model(m) for m in self.models)
        if self.driver.always_on:
            self.state = "up"

    @property
    def in_flight(self) -> int:
        """Requests of this process on the backend."""
        return len(self.leases)

    def idle_limit(self) -> float:
        """Seconds idle before stopping: `idle_stop`, or for "auto" the learned time (idle.py)."""
        if self.idle_stop is not None:
            return self.idle_stop
        return self.auto.limit(self.last_used)

    def demand(self, now: float, typing: bool = False) -> None:
        """A message (or, `typing`, someone typing) is here: the idle gap it ends and the typing
        go into the auto idle book."""
        waking = self.state == "waking" or (self._wake is not None and not self._wake.done())
        idle = self._used and self.in_flight == 0 and not waking
        self.auto.demand(now, self.last_used if idle else None, typing)
        self._used = True

    def serves(self, model: str) -> bool:
        return not self.models or normalize_model(model) in self.models

    def fits(self, context_needed: int | None) -> bool:
        return (
            self.max_context is None
            or context_needed is None
            or (context_needed <= self.max_context)
        )

    @property
    def free(self) -> bool:
        """Costs nothing to use: neither GPU time nor tokens are billed (the degrade ladder)."""
        return not (self.usd_per_second or self.usd_per_input_token or self.usd_per_output_token)
