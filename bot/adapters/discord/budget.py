"""What every reply in a Discord channel shares: the edit budget and the permission notes.

Discord limits message sends and edits per channel (about five per five seconds; its 429 answers
say exactly when to retry). Replies streaming side by side in one channel draw from one budget,
so together they stay under it, and after a 429 the whole channel waits out `retry_after`.
A channel where the bot may not post is logged once, and each author is told once, by DM.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

_MAX_CHANNELS = 10_000  # forget everything past this many channels (a bound, not a policy)


class ChannelBudget:
    def __init__(
        self, actions: int = 5, per: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.actions = actions
        self.per = per
        self._clock = clock
        self._times: dict[int, deque[float]] = {}
        self._until: dict[int, float] = {}
        self._denied: set[int] = set()
        self._told: set[tuple[int, int]] = set()

    def delay(self, channel_id: int) -> float:
        """Seconds to wait before the next send or edit in this channel."""
        now = self._clock()
        wait = self._until.get(channel_id, now) - now
        times = self._times.get(channel_id)
        if times is not None:
            while times and times[0] <= now - self.per:
                times.popleft()
            if len(times) >= self.actions:
                wait = max(wait, times[0] + self.per - now)
        return max(0.0, wait)

    def spend(self, channel_id: int) -> None:
        """One send or edit happened now."""
        if len(self._times) >= _MAX_CHANNELS:
            self._times.clear()
            self._until.clear()
        self._times.setdefault(channel_id, deque()).append(self._clock())

    def back_off(self, channel_id: int, seconds: float) -> None:
        """Discord answered 429: nothing more in this channel for `seconds`."""
        until = self._clock() + max(0.0, seconds)
        self._until[channel_id] = max(until, self._until.get(channel_id, 0.0))

    def first_denial(self, channel_id: int) -> bool:
        """True the first time the bot is refused permission in this channel."""
        if channel_id in self._denied:
            return False
        self._denied.add(channel_id)
        return True

    def first_telling(self, channel_id: int, user_id: int) -> bool:
        """True the first time this user should be told the bot can't post in this channel."""
        if (channel_id, user_id) in self._told:
            return False
        self._told.add((channel_id, user_id))
        return True
