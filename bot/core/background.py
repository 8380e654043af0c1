"""Work that runs after a reply without delaying it (records, alerts, memory), and can be waited
for before the process exits so that nothing is lost."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

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
