"""The Discord gateway connection's health, for /healthz and for the runner.

discord.py reconnects by itself after network trouble and ordinary closes. Two things it cannot
fix are reported here:

- A fatal close after start (4004: the token was reset; 4013/4014: intents invalid or not
  allowed; 4010/4011: sharding): the connection task ends with an error. `fatal` is set and a
  clear line logged; the runner then stops and exits non-zero, so the container restarts (with
  the new token, once someone sets it) instead of idling without a gateway.
- A reconnect that takes too long: `healthy` stays true through a short blip and turns false
  once the gateway has been down longer than `grace` seconds (a minute), so /healthz goes 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import discord

log = logging.getLogger(__name__)

RECONNECT_GRACE = 60.0

_FATAL: dict[int, str] = {
    4004: "Discord rejected the bot token (was it reset?): set DISCORD_TOKEN to the new token",
    4010: "Discord rejected the shard: check DISCORD_SHARD_COUNT",
    4011: "Discord requires sharding for this bot: set DISCORD_SHARDED=true",
    4012: "Discord rejected the gateway version: upgrade discord.py",
    4013: "Discord rejected the intents the bot asked for",
    4014: "Discord refused the message content intent: enable it in the developer portal "
    "(Bot → Privileged Gateway Intents)",
}


def describe(error: BaseException | None) -> str:
    """A plain sentence for why the gateway connection ended."""
    if isinstance(error, discord.PrivilegedIntentsRequired):
        return _FATAL[4014]
    if isinstance(error, discord.ConnectionClosed):
        return _FATAL.get(error.code, f"Discord closed the gateway with code {error.code}")
    if isinstance(error, discord.LoginFailure):
        return _FATAL[4004]
    if error is None:
        return "the Discord gateway connection ended"
    return f"the Discord gateway connection failed ({type(error).__name__})"


class Gateway:
    def __init__(
        self,
        client: discord.Client,
        *,
        grace: float = RECONNECT_GRACE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.grace = grace
        self.fatal = asyncio.Event()
        self.reason: str | None = None
        self.closing = False
        self._clock = clock
        self._ever_ready = False
        self._down_since: float | None = None
        client.event(self.on_ready)
        client.event(self.on_resumed)
        client.event(self.on_disconnect)

    async def on_ready(self) -> None:
        self._ever_ready = True
        self._down_since = None

    async def on_resumed(self) -> None:
        self._down_since = None

    async def on_disconnect(self) -> None:
        if self._down_since is None:
            self._down_since = self._clock()
            log.warning("the Discord gateway disconnected; discord.py is reconnecting")

    @property
    def healthy(self) -> bool:
        """Connected, or reconnecting for less than `grace` seconds."""
        if not self._ever_ready or self.fatal.is_set() or self.client.is_closed():
            return False
        return self._down_since is None or self._clock() - self._down_since < self.grace

    def watch(self, connection: asyncio.Task[None]) -> None:
        """Report the connection task ending on its own (not because we closed it)."""
        connection.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self.closing or task.cancelled():
            return
        self.reason = describe(task.exception())
        log.critical("Discord connection lost for good: %s. Exiting so it restarts.", self.reason)
        self.fatal.set()
