"""Sending to Matrix under the homeserver's rate limit: messages and redactions.

On M_LIMIT_EXCEEDED the room's pacer (pacing.py) slows down; a `droppable` edit is then
skipped, anything else waits the `retry_after_ms` the server named and goes again with the
same transaction id (so never twice). With encryption, a message waits until nio has synced
the room (a direct room just opened).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nio import AsyncClient, RoomRedactResponse, RoomSendResponse

from bot.adapters.matrix.pacing import Pacers

log = logging.getLogger(__name__)

_SEND_ATTEMPTS = 8  # a message that must land waits out this many M_LIMIT_EXCEEDED answers


class Outbox:
    def __init__(self, client: AsyncClient, pacers: Pacers) -> None:
        self.client = client
        self.pacers = pacers
        self.synced = asyncio.Condition()  # notified after every processed sync

    async def room_synced(self) -> None:
        async with self.synced:
            self.synced.notify_all()

    async def send(
        self,
        room_id: str,
        content: dict[str, Any],
        txn: str | None,
        *,
        droppable: bool = False,
    ) -> str | None:
        """Send a room message; the event id, or None (logged) when it was not sent.

        On M_LIMIT_EXCEEDED the room's pacer slows down; a `droppable` edit is then skipped,
        anything else waits `retry_after_ms` and goes again with the same transaction id."""
        await self._known(room_id)
        response = await self._paced(
            room_id,
            lambda: self.client.room_send(
                room_id, "m.room.message", content, tx_id=txn, ignore_unverified_devices=True
            ),
            droppable=droppable,
        )
        if isinstance(response, RoomSendResponse):
            return str(response.event_id)
        return None

    async def redact(self, room_id: str, event_id: str, txn: str) -> None:
        """Take a message back (redaction); logged when the homeserver refused."""
        response = await self._paced(
            room_id,
            lambda: self.client.room_redact(room_id, event_id, reason="withheld", tx_id=txn),
        )
        if not isinstance(response, RoomRedactResponse):
            log.warning("redacting %s in %s failed", event_id, room_id)

    async def _paced(
        self, room_id: str, call: Callable[[], Awaitable[Any]], *, droppable: bool = False
    ) -> Any:
        pacer = self.pacers(room_id)
        response: Any = None
        for _ in range(_SEND_ATTEMPTS):
            if not droppable:
                await pacer.ready()
            try:
                response = await call()
            except Exception:
                log.exception("sending to %s failed", room_id)
                return None
            if getattr(response, "status_code", None) != "M_LIMIT_EXCEEDED":
                break
            wait = pacer.limited(getattr(response, "retry_after_ms", None))
            log.info("rate limited in %s: next send in %.1fs", room_id, wait)
            if droppable:
                return None
        if isinstance(response, RoomSendResponse | RoomRedactResponse):
            pacer.succeeded()
        else:
            log.warning("sending to %s failed: %s", room_id, getattr(response, "status_code", ""))
        return response

    async def _known(self, room_id: str, wait: float = 10.0) -> None:
        """With encryption, nio sends only to rooms it has synced (a direct room just opened)."""
        if not self.client.olm or room_id in self.client.rooms:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait), self.synced:
                await self.synced.wait_for(lambda: room_id in self.client.rooms)
