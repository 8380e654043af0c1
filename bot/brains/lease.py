"""A lease: one request in flight on a pooled backend (see pool.py), from before the wake to
after the last token. Released on every path: `await lease.release()`, or `async with`."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.brains.pool import Backend, BackendPool


class Lease:
    """One request in flight on a backend; `await lease.release()` (or `async with`) ends it."""

    def __init__(self, pool: BackendPool, backend: Backend) -> None:
        self.pool = pool
        self.backend = backend
        self.touched = pool.now()
        self.probe = False  # the half-open breaker's one trial request
        self.released = False

    def touch(self) -> None:
        """A chunk arrived: the request is alive."""
        self.touched = self.pool.now()

    async def release(self) -> None:
        await self.pool.release(self)

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()
