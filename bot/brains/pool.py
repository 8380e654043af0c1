"""The backend pool: an ordered list of Ollama backends, woken on demand, stopped when idle.

Routing (`route`): among the backends that serve the model and are not resting after a failure
(see breaker.py), those already up come first, in configured order, then the sleeping ones in
order; so an awake machine is used before another is woken.

Waking (`acquire`): a request for a sleeping backend starts one shared wake task (concurrent
requests wait on the same task), and is told once through its `notify` callback. The task asks
the wake driver to start the machine, then polls Ollama with an empty chat until it answers with
the model loaded. A wake that fails or times out rests the backend (breaker) and stops it again.

Sleeping (`idle_check`, run by the scheduler at least once a second): a woken backend with no
request in flight and nothing to do for `idle_stop` seconds (or, for `auto`, the learned idle
time of idle.py, from the gaps between uses and the billed cost of a restart) is stopped, and
the wake-to-stop interval is recorded as GPU seconds at its price (sessions.py). In-flight
requests are counted from `acquire` (before the wake) to `release` (after the last token), so a
machine is never stopped under a reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Protocol

from bot.brains.base import Brain
from bot.brains.breaker import CircuitBreaker
from bot.brains.idle import AutoIdle
from bot.brains.sessions import Session, SessionSink
from bot.brains.wake import WakeDriver, WakeFailed

log = logging.getLogger(__name__)

WAKING_NOTICE = "Waking up {name} (it was asleep to save money); the first reply takes a moment…"
_MS = Decimal("0.001")


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
    idle_stop: float | None = 300.0  # None: "auto", see idle_limit()
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    state: str = "asleep"  # asleep | waking | up | stopping
    in_flight: int = 0
    last_used: float = 0.0
    woken_at: float | None = None
    woken_wall: datetime | None = None
    cold_starts: int = 0
    wake_seconds: float | None = None  # how long the last cold start took
    auto: AutoIdle = field(default_factory=AutoIdle)  # the learned idle time, for "auto"
    _used: bool = False  # a demand has been seen, so later ones end idle gaps
    _wake: asyncio.Task[None] | None = None
    _stop: asyncio.Event | None = None  # set when a stop under way has finished

    def __post_init__(self) -> None:
        self.models = frozenset(normalize_model(m) for m in self.models)
        if self.driver.always_on:
            self.state = "up"

    def idle_limit(self) -> float:
        """Seconds idle before stopping: `idle_stop`, or for "auto" the learned time (idle.py)."""
        if self.idle_stop is not None:
            return self.idle_stop
        return self.auto.limit(self.last_used)

    def demand(self, now: float) -> None:
        """A message or typing is here: the idle gap it ends goes into the auto idle book."""
        waking = self.state == "waking" or (self._wake is not None and not self._wake.done())
        idle = self._used and self.in_flight == 0 and not waking
        self.auto.demand(now, self.last_used if idle else None)
        self._used = True

    def serves(self, model: str) -> bool:
        return not self.models or normalize_model(model) in self.models

    @property
    def free(self) -> bool:
        return self.usd_per_second == 0


class BackendPool:
    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        sessions: SessionSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        wake_timeout: float = 180.0,
        poll_interval: float = 1.0,
    ) -> None:
        self.backends = list(backends)
        self.sessions = sessions
        self._clock = clock
        self._wall = wall
        self.wake_timeout = wake_timeout
        self.poll_interval = poll_interval

    def route(self, model: str, *, free_only: bool = False) -> tuple[list[Backend], list[Backend]]:
        """(backends to try in order, backends serving the model but resting after failures)."""
        serving = [b for b in self.backends if b.serves(model) and (b.free or not free_only)]
        resting = [b for b in serving if not b.breaker.allows()]
        usable = [b for b in serving if b.breaker.allows()]
        usable.sort(key=lambda b: b.state != "up")  # stable: configured order within each group
        return usable, resting

    async def acquire(
        self, backend: Backend, model: str, notify: Callable[[str], None] | None = None
    ) -> None:
        """Count a request in flight on `backend`, waking it first if needed (shared wake)."""
        backend.demand(self._clock())
        backend.in_flight += 1
        try:
            if backend.state != "up":
                if notify is not None:
                    notify(WAKING_NOTICE.format(name=backend.name))
                await asyncio.shield(self._wake_task(backend, model))
        except BaseException:
            self.release(backend)
            raise

    def release(self, backend: Backend) -> None:
        backend.in_flight = max(0, backend.in_flight - 1)
        backend.last_used = self._clock()

    async def failed(self, backend: Backend) -> None:
        """A request failed before its first token: rest the backend (circuit breaker).

        A woken backend that stopped answering is put to sleep too, so the next request after
        the rest wakes it again instead of trusting a machine that may have gone away.
        """
        self._rest(backend)
        if not backend.driver.always_on and backend.state == "up" and backend.in_flight == 0:
            await self._sleep(backend, "failed")

    def _rest(self, backend: Backend) -> None:
        delay = backend.breaker.failure()
        log.warning("%s failed; resting it for %.0fs", backend.name, delay)

    async def prewake(self, model: str) -> bool:
        """Someone is typing: start waking a backend for `model` unless one is up already.

        An up backend counts as used now, so it is not stopped just before the message comes.
        Returns True if a wake was started (or is under way). Never waits for it.
        """
        usable, _ = self.route(model)
        if not usable:
            return False
        backend = usable[0]
        backend.demand(self._clock())
        if backend.state == "up":
            backend.last_used = max(backend.last_used, self._clock())
            return False
        self._wake_task(backend, model).add_done_callback(_consume)
        return True

    def _wake_task(self, backend: Backend, model: str) -> asyncio.Task[None]:
        if backend._wake is None or backend._wake.done():
            backend._wake = asyncio.create_task(self._wake_up(backend, model))
        return backend._wake

    async def _wake_up(self, backend: Backend, model: str) -> None:
        if backend._stop is not None:
            await backend._stop.wait()
        if backend.state == "up":
            return
        if await backend.brain.ready(model):  # left running, or the bot restarted
            log.info("%s was already up", backend.name)
            self._mark_up(backend, started=True)
            return
        self._mark_up(backend, started=False)
        backend.cold_starts += 1
        log.info("waking %s (%s) for %s", backend.name, backend.driver.kind, model)
        slept = 0.0  # the last polling sleep: the machine may have been ready through it
        try:
            async with asyncio.timeout(self.wake_timeout):
                await backend.driver.start()
                while True:  # poll: the remote machine has no way to tell us
                    if await backend.brain.ready(model):
                        break
                    before = self._clock()
                    await asyncio.sleep(self.poll_interval)
                    slept = self._clock() - before
        except (WakeFailed, TimeoutError) as exc:
            reason = str(exc) if isinstance(exc, WakeFailed) else "it did not wake in time"
            self._rest(backend)
            await self._sleep(backend, "wake failed")
            raise WakeFailed(f"{backend.name}: {reason.split(': ', 1)[-1]}") from exc
        backend.state = "up"
        backend.last_used = self._clock()
        backend.breaker.success()
        backend.wake_seconds = self._clock() - (backend.woken_at or 0.0)
        backend.auto.wake = round(backend.wake_seconds - slept, 3)  # ms, as sessions are
        log.info("%s is up after %.1fs", backend.name, backend.wake_seconds)

    def _mark_up(self, backend: Backend, *, started: bool) -> None:
        backend.state = "up" if started else "waking"
        backend.woken_at = self._clock()
        backend.woken_wall = self._wall()
        backend.last_used = backend.woken_at

    async def idle_check(self) -> list[str]:
        """Stop every woken backend idle for its `idle_stop`; returns the names stopped."""
        stopped: list[str] = []
        now = self._clock()
        for backend in self.backends:
            if backend.driver.always_on or backend.state != "up" or backend.in_flight:
                continue
            if now - backend.last_used < backend.idle_limit():
                continue
            if await self._sleep(backend, "idle"):
                stopped.append(backend.name)
        return stopped

    async def _sleep(self, backend: Backend, reason: str) -> bool:
        """Stop the machine and book its interval; on a failed stop it stays `up` (retried)."""
        backend.state = "stopping"
        backend._stop = done = asyncio.Event()
        began = self._clock()
        try:
            await backend.driver.stop()
            backend.auto.stop = round(self._clock() - began, 3)
        except WakeFailed as exc:
            log.error("%s could not be stopped (%s); it is still billing", backend.name, exc)
            if reason == "idle":
                backend.state = "up"
                return False
        finally:
            backend._stop = None
            done.set()
        backend.state = "asleep"
        log.info("%s stopped (%s)", backend.name, reason)
        await self._book(backend, reason)
        return True

    async def _book(self, backend: Backend, reason: str) -> None:
        if backend.woken_at is None or backend.woken_wall is None:
            return
        seconds = Decimal(max(0.0, self._clock() - backend.woken_at)).quantize(_MS)
        session = Session(
            backend.name,
            backend.woken_wall,
            self._wall(),
            seconds,
            backend.usd_per_second,
            reason,
        )
        backend.woken_at = backend.woken_wall = None
        if self.sessions is not None:
            try:
                await self.sessions.record(session)
            except Exception:
                log.exception("could not record %s's session of %ss", backend.name, seconds)

    async def aclose(self) -> None:
        """Stop whatever we woke (an unattended machine bills forever), then close clients."""
        for backend in self.backends:
            if backend._wake is not None and not backend._wake.done():
                backend._wake.cancel()
                with contextlib.suppress(BaseException):
                    await backend._wake
            if not backend.driver.always_on and backend.state in ("up", "waking"):
                await self._sleep(backend, "shutdown")
            await backend.driver.aclose()
            await backend.brain.aclose()


def _consume(task: asyncio.Task[None]) -> None:
    """A pre-wake nobody waits for: log its failure instead of leaving it unretrieved."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("pre-wake failed: %s", task.exception())
