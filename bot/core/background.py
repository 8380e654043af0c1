"""Work that runs after a reply without delaying it (records, alerts, memory), and can be waited
for before the process exits so that nothing is lost; `Quiet` holds back what can wait until no
reply is being answered."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterator

log = logging.getLogger(__name__)


class Background:
    def __init__(self, what: str) -> None:
        self._what = what
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Awaitable[None]) -> None:
        """Start `work`; a failure is logged (never raised into the reply)."""

        async def guarded() -> None:
            try:
                await work
            except Exception:
                log.exception("%s failed", self._what)

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait until all work, including work spawned meanwhile, has finished (a piece that
        was cancelled counts as finished)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def cancel(self) -> None:
        """Cancel whatever is still running (after a drain that ran out of time)."""
        for task in self._tasks:
            task.cancel()

    def __len__(self) -> int:
        return len(self._tasks)


class Quiet:
    """Replies come first: work that can wait (memory extraction) waits for a quiet moment, when
    no reply has been in flight for `settle` seconds, and for `patience` seconds at most. Its
    model calls would otherwise compete with the replies for the bot's CPU and for the model
    server (a GPU answers a few requests at once); waiting, it also gathers a user's messages
    into one call. `drain()` (shutdown, tests) ends every wait at once."""

    def __init__(self, settle: float = 0.25) -> None:
        self.settle = settle
        self._replies = 0
        self._flushing = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._timer: asyncio.TimerHandle | None = None  # the end of the settling time

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Around a reply."""
        self._replies += 1
        self._stop_timer()
        try:
            yield
        finally:
            self._replies -= 1
            if not self._replies and self._waiters:
                self._start_timer()

    @contextlib.contextmanager
    def flushing(self) -> Iterator[None]:
        """While it lasts, nothing waits."""
        self._flushing += 1
        self._release()
        try:
            yield
        finally:
            self._flushing -= 1

    async def wait(self, patience: float) -> None:
        """Until a quiet moment, or `patience` seconds. One timer for all that wait, reset per
        reply: a thousand waiting cost nothing until they are let go."""
        if self._flushing:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        if not self._replies and self._timer is None:
            self._start_timer()
        deadline = loop.call_later(patience, _settle, waiter)
        try:
            await waiter
        finally:
            deadline.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)  # let go by its own deadline, or cancelled

    def _start_timer(self) -> None:
        """The settling time, from now."""
        self._stop_timer()
        self._timer = asyncio.get_running_loop().call_later(self.settle, self._release)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _release(self) -> None:
        self._stop_timer()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            _settle(waiter)


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
