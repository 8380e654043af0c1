"""`!` commands on Matrix, through the platform-neutral command layer (bot/core/commands.py).

Matrix has no ephemeral messages, so a private result (`!memories`, `!help`, …) asked for in a
room that is not a direct room (`m.direct`) goes to a direct room with the asker, encrypted when
the question came from an encrypted room, and the asking room gets a pointer. Progress
reports (`!imagine`) edit one notice; a result's file (a picture, the `!spend` chart) is
uploaded to the media repository and sent after the text (a flagged picture as a plain file,
not shown inline).
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nio import AsyncClient, MatrixRoom, RoomCreateResponse, UploadResponse

from bot.adapters.matrix.direct import DirectRooms
from bot.adapters.matrix.render import edit_content, message_content, relation, transaction_id
from bot.core.commands import CommandContext, CommandResult, Commands
from bot.errors import BotError, user_message

log = logging.getLogger(__name__)

_ENCRYPTION = {
    "type": "m.room.encryption",
    "state_key": "",
    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
}
# (room id, content, transaction id) → the sent event's id, or None when it failed
Sender = Callable[[str, dict[str, Any], str | None], Awaitable[str | None]]


class MatrixCommands:
    def __init__(
        self, client: AsyncClient, commands: Commands, send: Sender, direct: DirectRooms
    ) -> None:
        self.client = client
        self.commands = commands
        self._send = send
        self.direct = direct

    async def run(
        self,
        room: MatrixRoom,
        context: CommandContext,
        name: str,
        args: list[str],
        *,
        event_id: str,
        thread_root: str | None,
    ) -> list[str]:
        """Run a command and send its result; returns the ids of the events sent."""
        progress = _Progress(self._send, room.room_id, event_id, thread_root)
        context = CommandContext(
            context.platform,
            context.conversation,
            context.author_id,
            context.author_name,
            is_admin=context.is_admin,
            progress=progress,
            guild=room.room_id.split(":", 1)[-1],
        )
        result = await self._result(context, name, args)
        target_room, reply_to = room.room_id, event_id
        sent: list[str] = []
        if result.private and not self.direct.is_direct(room.room_id):
            direct = await self._direct_room(context.author_id, encrypted=room.encrypted)
            if direct is not None:
                pointer = "I sent you the answer in a direct message."
                sent += await self._text(room.room_id, pointer, event_id, thread_root, "pointer")
                target_room, reply_to, thread_root = direct, "", None
        if progress.event_id is not None and target_room == room.room_id:
            content = edit_content(progress.event_id, result.text, "m.notice")
            await self._send(room.room_id, content, transaction_id(event_id, "result"))
            sent.append(progress.event_id)
        else:
            sent += await self._text(
                target_room, result.text, reply_to, thread_root, "result", answered=event_id
            )
        if result.attachment is not None:
            sent += await self.send_file(target_room, result.attachment, result.spoiler, event_id)
        return sent

    async def _result(self, context: CommandContext, name: str, args: list[str]) -> CommandResult:
        try:
            return await self.commands.run(context, name, args)
        except BotError as exc:
            return CommandResult(user_message(exc))
        except Exception:
            log.exception("command %s failed", name)
            return CommandResult(user_message(Exception()))

    async def _text(
        self,
        room_id: str,
        text: str,
        reply_to: str,
        thread_root: str | None,
        step: str,
        *,
        answered: str | None = None,
    ) -> list[str]:
        """A notice answering `reply_to` ("" for none); the transaction id follows `answered`."""
        content = message_content(text, "m.notice")
        if reply_to:
            content["m.relates_to"] = relation(reply_to, thread_root)
        sent = await self._send(room_id, content, transaction_id(answered or reply_to, step))
        return [sent] if sent else []

    async def _direct_room(self, user_id: str, *, encrypted: bool) -> str | None:
        """A direct room with the user (`m.direct`): an existing one, else a new invitation.
        An answer asked for in an encrypted room goes only to an encrypted direct room."""
        for room_id in self.direct.room_with(user_id):
            room = self.client.rooms.get(room_id)
            if room is not None and user_id in room.users and (room.encrypted or not encrypted):
                return room_id
        state = [_ENCRYPTION] if encrypted else []
        response = await self.client.room_create(
            invite=[user_id], is_direct=True, initial_state=state
        )
        if not isinstance(response, RoomCreateResponse):
            log.warning("could not open a direct room with %s", user_id)
            return None
        await self.direct.add(str(response.room_id), user_id)
        return str(response.room_id)

    async def send_file(self, room_id: str, path: Path, spoiler: bool, event_id: str) -> list[str]:
        """Upload a file (a picture: m.image; flagged or other: m.file) answering `event_id`."""
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        data = await asyncio.to_thread(path.read_bytes)
        room = self.client.rooms.get(room_id)
        encrypt = bool(room is not None and room.encrypted and self.client.olm)
        response, keys = await self.client.upload(
            lambda *_: data, content_type=mime, filename=path.name, filesize=len(data),
            encrypt=encrypt,
        )  # fmt: skip
        if not isinstance(response, UploadResponse):
            log.warning("uploading %s failed", path.name)
            return []
        inline = mime.startswith("image/") and not spoiler
        content: dict[str, Any] = {
            "msgtype": "m.image" if inline else "m.file",
            "body": path.name if not spoiler else f"flagged picture, open with care: {path.name}",
            "info": {"mimetype": mime, "size": len(data)},
        }
        if keys is not None:
            content["file"] = {**keys, "url": response.content_uri}
        else:
            content["url"] = response.content_uri
        sent = await self._send(room_id, content, transaction_id(event_id, "file"))
        return [sent] if sent else []


class _Progress:
    """`CommandContext.progress`: the first report is a notice, later ones edit it."""

    def __init__(self, send: Sender, room_id: str, event_id: str, thread_root: str | None) -> None:
        self._send = send
        self._room_id = room_id
        self._answered = event_id
        self._thread_root = thread_root
        self._steps = 0
        self.event_id: str | None = None

    async def __call__(self, text: str) -> None:
        self._steps += 1
        txn = transaction_id(self._answered, f"progress{self._steps}")
        if self.event_id is None:
            content = message_content(text, "m.notice")
            content["m.relates_to"] = relation(self._answered, self._thread_root)
            self.event_id = await self._send(self._room_id, content, txn)
        else:
            await self._send(self._room_id, edit_content(self.event_id, text, "m.notice"), txn)
