"""The backend pool: an ordered list of Ollama backends, woken on demand, stopped when idle.

Routing (`route`): among the backends that serve the model and are not resting after a failure
(see breaker.py), those already up come first, in configured order, then the sleeping ones in
order; so an awake machine is used before another is woken.

Leases (`acquire` … `release`): every request holds a `Lease` on its backend from before the
wake to after its last token. A lease is released on every path (the router's `_Leased`
stream and `Lease` as an async context manager); one left behind by a bug stops counting
after `lease_ttl` seconds without a chunk, so it can never keep a machine up for ever. Leases
are also counted per process in PostgreSQL (sessions.py), so no process stops a machine under
another's reply.

Waking: a request for a sleeping backend starts one shared wake task (concurrent requests wait
on the same task), and is told once through its `notify` callback. The task opens the
backend's session (or joins the one another process opened), asks the wake driver to start
the machine, then polls Ollama with an empty chat until it answers with the model loaded. Any
failure of the driver or the backend ends the wake: the backend rests (breaker) and is stopped.

Sleeping (`idle_check`, run by the scheduler in every process at least once a second): a
machine nobody (in any process) used for its idle time (`idle_stop` seconds, or for `auto` the
learned idle time of idle.py, from the gaps between uses and the billed cost of a restart) is
stopped by the one process that claims its session; that
process books the interval's last increment and closes it. `book` (every minute, once across
replicas) books the GPU time of open sessions as it runs; `reconcile` (every few minutes) asks
each driver for the machine's real state and mends the books.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from bot.brains.backend import Backend, PoolBrain, normalize_model
from bot.brains.base import BackendRefused, RequestRejected
from bot.brains.lease import Lease

__all__ = ["WAKING_NOTICE", "Backend", "BackendPool", "Lease", "PoolBrain", "normalize_model"]
from bot.brains.sessions import MemorySessions, SessionStore
from bot.brains.wake import WakeFailed

log = logging.getLogger(__name__)

WAKING_NOTICE = "Waking up {name} (it was asleep to save money); the first reply takes a moment…"
LEASE_TTL = 900.0  # seconds without a chunk after which a lease left behind stops counting


def _holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class BackendPool:
    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        sessions: SessionStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] | None = None,
        wake_timeout: float = 180.0,
        poll_interval: float = 1.0,
        holder: str | None = None,
        lease_ttl: float = LEASE_TTL,
    ) -> None:
        self.backends = list(backends)
        self.sessions: SessionStore = sessions if sessions is not None else MemorySessions()
        self._clock = clock
        if wall is None:  # a clock of its own (tests, the simulator) drives the wall clock too
            wall = _now if clock is time.monotonic else lambda: datetime.fromtimestamp(clock(), UTC)
        self._wall = wall
        self.wake_timeout = wake_timeout
        self.poll_interval = poll_interval
        self.holder = holder or _holder()
        self.lease_ttl = lease_ttl

    def now(self) -> float:
        return self._clock()

    def route(
        self, model: str, *, free_only: bool = False, context_needed: int | None = None
    ) -> tuple[list[Backend], list[Backend]]:
        """(backends to try in order, backends serving the model but resting after failures).
        A backend whose `max_context` is below `context_needed` tokens is left out."""
        serving = [
            b
            for b in self.backends
            if b.serves(model) and (b.free or not free_only) and b.fits(context_needed)
        ]
        resting = [b for b in serving if not b.breaker.allows()]
        usable = [b for b in serving if b.breaker.allows()]
        usable.sort(key=lambda b: b.state != "up")  # stable: configured order within each group
        return usable, resting

    async def acquire(
        self, backend: Backend, model: str, notify: Callable[[str], None] | None = None
    ) -> Lease:
        """A lease on `backend`, waking it first if needed (shared wake)."""
        backend.demand(self._clock())
        lease = Lease(self, backend)
        backend.leases.add(lease)
        lease.probe = backend.breaker.begin()
        try:
            if not backend.driver.always_on:  # an always-on backend is never stopped
                state = await self.sessions.hold(backend.name, self.holder, 1, self._wall())
                await self._sync(backend, state)
            if backend.state != "up":
                if notify is not None:
                    notify(WAKING_NOTICE.format(name=backend.name))
                await asyncio.shield(self._wake_task(backend, model))
        except BaseException:
            await self.release(lease)
            raise
        return lease

    async def _sync(self, backend: Backend, state: str) -> None:
        """Align what this process believes with the shared session: wait for a stop another
        process is making, and forget an "up" machine someone else has stopped."""
        deadline = self._clock() + self.wake_timeout
        while state == "stopping" and self._clock() < deadline:
            if backend._stop is not None:  # this process's own stop: wait for it to the moment
                await backend._stop.wait()
            else:
                await asyncio.sleep(self.poll_interval)
            state = await self.sessions.state(backend.name)
        if state != "open" and backend.state == "up":
            log.info("%s was stopped by another process", backend.name)
            backend.state = "asleep"

    async def release(self, lease: Lease) -> None:
        """End a lease (idempotent). Never raises: a request is over either way."""
        if lease.released:
            return
        lease.released = True
        backend = lease.backend
        backend.leases.discard(lease)
        backend.last_used = self._clock()
        if lease.probe:
            backend.breaker.abandon()
        if backend.driver.always_on:
            return
        try:
            await self.sessions.hold(backend.name, self.holder, -1, self._wall())
        except Exception:
            log.exception("could not release the lease on %s", backend.name)

    async def failed(self, backend: Backend, exc: BaseException | None = None) -> None:
        """A request failed before its first token: rest the backend (circuit breaker), for as
        long as the backend said when it did (429's Retry-After, a refused key: `BackendRefused`).

        A woken backend that stopped answering is put to sleep too, so the next request after
        the rest wakes it again instead of trusting a machine that may have gone away. A
        request the backend refused for its own sake (a bad request, a model not pulled there)
        says nothing about the machine: it neither rests nor stops it.
        """
        if isinstance(exc, RequestRejected):
            log.info("%s refused the request (%s); it stays in service", backend.name, exc)
            return
        if isinstance(exc, BackendRefused) and exc.rest is not None:
            backend.breaker.rest(exc.rest)
            log.warning("%s refused; resting it for %.0fs", backend.name, exc.rest)
        else:
            self._rest(backend)
        if not backend.driver.always_on and backend.state == "up" and not self._live(backend):
            await self._stop(backend, "failed", idle_since=None)

    def _rest(self, backend: Backend) -> None:
        delay = backend.breaker.failure()
        log.warning("%s failed; resting it for %.0fs", backend.name, delay)

    def _live(self, backend: Backend) -> int:
        """This process's leases on `backend` that are not left-behind ones."""
        since = self._clock() - self.lease_ttl
        return sum(1 for lease in backend.leases if lease.touched >= since)

    async def prewake(self, model: str) -> bool:
        """Someone is typing: start waking a backend for `model` unless one is up already.

        An up backend counts as used now, so it is not stopped just before the message comes.
        Returns True if a wake was started (or is under way). Never waits for it.
        """
        usable, _ = self.route(model)
        if not usable:
            return False
        backend = usable[0]
        backend.demand(self._clock(), typing=True)
        if not backend.driver.always_on:
            state = await self.sessions.hold(backend.name, self.holder, 0, self._wall())
            if state == "closed" and backend.state == "up":
                backend.state = "asleep"
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
        started = self._wall()
        backend.state = "waking"
        backend.woken_at = backend.last_used = self._clock()
        try:
            async with asyncio.timeout(self.wake_timeout):
                await self.sessions.open(backend.name, backend.usd_per_second, started)
                if await backend.brain.ready(model):  # another process's, or left running
                    log.info("%s was already up", backend.name)
                else:
                    await self._cold_start(backend, model)
        except Exception as exc:  # any failure ends the wake: nothing stays "waking"
            await self._wake_failed(backend, exc)
        backend.state = "up"
        backend.last_used = self._clock()
        backend.breaker.success()

    async def _cold_start(self, backend: Backend, model: str) -> None:
        backend.cold_starts += 1
        log.info("waking %s (%s) for %s", backend.name, backend.driver.kind, model)
        await backend.driver.start()
        slept = 0.0  # the last polling sleep: the machine may have been ready through it
        while True:  # poll: the remote machine has no way to tell us
            if await backend.brain.ready(model):
                break
            before = self._clock()
            await asyncio.sleep(self.poll_interval)
            slept = self._clock() - before
        backend.wake_seconds = self._clock() - (backend.woken_at or 0.0)
        backend.auto.wake = round(backend.wake_seconds - slept, 3)  # ms, as sessions are
        log.info("%s is up after %.1fs", backend.name, backend.wake_seconds)

    async def _wake_failed(self, backend: Backend, exc: Exception) -> None:
        if isinstance(exc, WakeFailed):
            reason = str(exc).split(": ", 1)[-1]
        elif isinstance(exc, TimeoutError):
            reason = "it did not wake in time"
        else:
            log.warning("waking %s failed", backend.name, exc_info=exc)
            reason = f"the wake failed ({type(exc).__name__})"
        self._rest(backend)
        await self._stop(backend, "wake failed", idle_since=None)
        backend.state = "asleep"
        raise WakeFailed(f"{backend.name}: {reason}") from exc

    async def idle_check(self) -> list[str]:
        """Stop every machine nobody used for its idle time; returns the names stopped."""
        live = [b.name for b in self.backends if self._live(b)]
        await self.sessions.renew(self.holder, self._wall(), live)
        stopped: list[str] = []
        now = self._clock()
        for backend in self.backends:
            if backend.driver.always_on or backend.state in ("waking", "stopping"):
                continue
            limit = backend.idle_limit()
            if self._live(backend) or now - backend.last_used < limit:
                continue
            idle_since = self._wall() - timedelta(seconds=limit)
            if await self._stop(backend, "idle", idle_since=idle_since):
                stopped.append(backend.name)
            elif backend.state == "up" and await self.sessions.state(backend.name) == "closed":
                backend.state = "asleep"
        return stopped

    async def _stop(self, backend: Backend, reason: str, *, idle_since: datetime | None) -> bool:
        """Claim the machine's session, stop it, close and book the session. False when
        another process holds it, or the stop failed (then the session stays open and the
        idle check tries again)."""
        try:
            claimed = await self.sessions.claim(backend.name, self.holder, self._wall(), idle_since)
        except Exception:
            if reason == "idle":
                raise
            log.exception("could not claim %s's session; stopping it all the same", backend.name)
            claimed = True
        if not claimed:
            if reason != "idle":
                backend.state = "asleep"
            return False
        backend.state = "stopping"
        backend._stop = done = asyncio.Event()
        began = self._clock()
        try:
            await backend.driver.stop()
            backend.auto.stop = round(self._clock() - began, 3)
        except Exception as exc:
            log.error("%s could not be stopped (%s); it is still billing", backend.name, exc)
            backend.state = "up" if reason == "idle" else "asleep"
            with contextlib.suppress(Exception):
                await self.sessions.unclaim(backend.name, self.holder)
            return False
        finally:
            backend._stop = None
            done.set()
        backend.state = "asleep"
        log.info("%s stopped (%s)", backend.name, reason)
        try:
            await self.sessions.close(backend.name, self._wall(), reason)
        except Exception:
            log.exception("could not close %s's session; reconciliation will", backend.name)
        return True

    async def book(self) -> int:
        """Book the GPU time of the machines up now (a scheduled job, every minute)."""
        return await self.sessions.book(self._wall())

    async def reconcile(self) -> list[str]:
        """Ask each driver for its machine's real state and mend the books: a machine running
        with no session open gets one (the idle check then stops it when nobody uses it); a
        session whose machine is gone is closed. Returns what was mended."""
        mended: list[str] = []
        for backend in self.backends:
            if backend.driver.always_on or backend.state in ("waking", "stopping"):
                continue
            try:
                real = await backend.driver.state()
            except Exception as exc:
                log.warning("reconcile: could not ask %s its state (%s)", backend.name, exc)
                continue
            booked = await self.sessions.state(backend.name)
            if real == "up" and booked == "closed":
                log.warning(
                    "%s is running with no session: adopted, so it is stopped when idle",
                    backend.name,
                )
                await self.sessions.open(backend.name, backend.usd_per_second, self._wall())
                mended.append(f"{backend.name}: adopted")
            elif real == "down" and booked == "open" and not self._live(backend):
                since = self._wall() - timedelta(seconds=self.wake_timeout)
                if await self.sessions.claim(backend.name, self.holder, self._wall(), since):
                    log.warning("%s's machine is gone: its session is closed", backend.name)
                    await self.sessions.close(backend.name, self._wall(), "gone")
                    backend.state = "asleep"
                    mended.append(f"{backend.name}: closed")
        return mended

    async def aclose(self) -> None:
        """Stop whatever nobody else holds (an unattended machine bills forever), then close."""
        with contextlib.suppress(Exception):
            await self.sessions.forget(self.holder)
        for backend in self.backends:
            if backend._wake is not None and not backend._wake.done():
                backend._wake.cancel()
                with contextlib.suppress(BaseException):
                    await backend._wake
            if not backend.driver.always_on and backend.state in ("up", "waking"):
                with contextlib.suppress(Exception):
                    await self._stop(backend, "shutdown", idle_since=None)
            await backend.driver.aclose()
            await backend.brain.aclose()


def _now() -> datetime:
    return datetime.now(UTC)


def _consume(task: asyncio.Task[None]) -> None:
    """A pre-wake nobody waits for: log its failure instead of leaving it unretrieved."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("pre-wake failed: %s", task.exception())
