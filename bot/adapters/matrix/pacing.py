"""Edit pacing under the homeserver's rate limit, shared by every reply the bot sends.

Synapse allows a user 0.2 messages a second with a burst of 10 (`rc_message`), counted per
account across all its rooms (synapse/api/ratelimiting.py keys the limiter on the requester's
user id); an edit is a message. So the account keeps one `Pacer`, whatever the room: streamed
replies edit at most once per `interval`
(2 s at first), the interval doubles on `M_LIMIT_EXCEEDED` (up to a minute) and eases back
after successes, and nothing is sent before the `retry_after_ms` the server named. Edits in
progress are skipped when not due; first messages, final texts, notices and redactions wait for
`retry_after_ms` and are sent again (same transaction id, so never twice).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

_MAX_INTERVAL = 60.0


class Pacer:
    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.base = interval
        self.interval = interval
        self._clock = clock
        self._not_before = 0.0
        self._last_edit = float("-inf")

    def edit_due(self) -> bool:
        """May a reply in this room show its progress now?"""
        now = self._clock()
        return now >= self._not_before and now - self._last_edit >= self.interval

    def edited(self) -> None:
        self._last_edit = self._clock()

    def limited(self, retry_after_ms: int | None) -> float:
        """The server said M_LIMIT_EXCEEDED: slow down; returns the seconds to wait."""
        self.interval = min(self.interval * 2, _MAX_INTERVAL)
        wait = (retry_after_ms or 1000) / 1000
        self._not_before = max(self._not_before, self._clock() + wait)
        return wait

    def succeeded(self) -> None:
        self.interval = max(self.base, self.interval * 0.9)

    async def ready(self) -> None:
        """Wait out a `retry_after_ms` the server named, if any."""
        wait = self._not_before - self._clock()
        if wait > 0:
            await asyncio.sleep(wait)


class Pacers:
    """The pacer for a room: the account's one `Pacer`, since the homeserver limits the account,
    not the room (a limit met in one room holds back edits in every room)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._account = Pacer(interval, clock)

    def __call__(self, room_id: str) -> Pacer:
        return self._account
