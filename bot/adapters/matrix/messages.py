"""Matrix room messages → triggers, conversations, `!` commands and replies.

Conversations: a thread (`m.thread`) is its own conversation, whose context starts from the
thread's root and earlier messages (threads.py); a reply to a message the bot answered or sent
continues that message's conversation; anything else belongs to the room. A thread message's
`m.in_reply_to` only counts as a reply when `is_falling_back` is not set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nio import MatrixRoom

from bot.adapters.matrix.cast import CastPlayer
from bot.adapters.matrix.cast import Turn as CastTurn
from bot.adapters.matrix.commands import MatrixCommands
from bot.adapters.matrix.direct import DirectRooms
from bot.adapters.matrix.faces import Avatars
from bot.adapters.matrix.pacing import Pacers
from bot.adapters.matrix.render import (
    ReplyTarget,
    StreamedReply,
    message_content,
    relation,
    transaction_id,
)
from bot.adapters.matrix.state import MatrixState
from bot.adapters.matrix.threads import ThreadContext
from bot.app import App
from bot.core.attention import Attention
from bot.core.background import Background
from bot.core.cast import Choice, Said
from bot.core.commands import CommandContext, parse
from bot.core.engine import Incoming
from bot.core.events import user_key
from bot.core.personas import Persona
from bot.spend.ratelimit import RateLimiter

log = logging.getLogger(__name__)

PLATFORM = "matrix"
PREFIX = "!"
# Commands the bot answers to on Matrix; those the command layer lacks say "not available yet".
KNOWN_COMMANDS = ("help", "persona", "reset", "memories", "forget", "imagine", "spend")
_UNDECRYPTABLE_EVERY = 600.0  # seconds between "can't decrypt" notices in one room
_TEXT_TYPES = frozenset({"m.text", "m.notice", "m.emote"})
_FALLBACK_QUOTE = re.compile(r"^(> .*\n)+\n?")


# (room id, content, transaction id) → the sent event's id, or None when it failed
class Sender(Protocol):
    async def __call__(
        self, room_id: str, content: dict[str, Any], txn: str | None, *, droppable: bool = False
    ) -> str | None: ...


Typing = Callable[[str, bool], Awaitable[None]]
Redactor = Callable[[str, str, str], Awaitable[None]]  # (room id, event id, txn id)


@dataclass(frozen=True)
class RoomMessage:
    room_id: str
    event_id: str
    sender: str
    body: str
    msgtype: str
    mentions: tuple[str, ...] | None  # `m.mentions` user ids; None when the client sent none
    reply_to: str | None  # a real reply (not a thread's fallback `m.in_reply_to`)
    thread_root: str | None
    formatted: str

    @classmethod
    def from_source(cls, room_id: str, source: dict[str, Any]) -> RoomMessage | None:
        content = source.get("content") or {}
        body = content.get("body")
        if not isinstance(body, str) or "m.new_content" in content:
            return None  # not text, or an edit: edits are never answered
        if content.get("msgtype", "m.text") not in _TEXT_TYPES:
            return None  # pictures, files, …: their body is only a file name
        relates = content.get("m.relates_to") or {}
        reply_to = (relates.get("m.in_reply_to") or {}).get("event_id")
        thread_root = relates.get("event_id") if relates.get("rel_type") == "m.thread" else None
        if thread_root and relates.get("is_falling_back", False):
            reply_to = None  # only there for clients without threads: not a reply (spec)
        if reply_to and not thread_root:
            body = _FALLBACK_QUOTE.sub("", body)  # the quoted reply fallback of older clients
        mentions = content.get("m.mentions")
        user_ids = (mentions.get("user_ids") or []) if isinstance(mentions, dict) else None
        return cls(
            room_id=room_id,
            event_id=str(source.get("event_id")),
            sender=str(source.get("sender")),
            body=body.strip(),
            msgtype=str(content.get("msgtype", "m.text")),
            mentions=None if user_ids is None else tuple(str(u) for u in user_ids),
            reply_to=reply_to,
            thread_root=thread_root,
            formatted=str(content.get("formatted_body") or ""),
        )


class MatrixMessages:
    """Decides whether and how to answer each live message; replies run as background tasks."""

    def __init__(
        self,
        app: App,
        state: MatrixState,
        user_id: str,
        *,
        send: Sender,
        typing: Typing,
        commands: MatrixCommands,
        direct: DirectRooms,
        pacers: Pacers,
        redact: Redactor,
        threads: ThreadContext,
    ) -> None:
        self.app = app
        self.direct = direct
        self.commands = commands
        self.settings = app.settings
        self.state = state
        self.user_id = user_id
        self._send = send
        self._typing = typing
        self.pacers = pacers
        self.threads = threads
        self._redact = redact
        self.attention = Attention()
        self.cast = CastPlayer(
            app.engine,
            threads,
            Avatars(threads.client, self.settings.personas_dir, state),
            self.attention,
            answer_dms=self.settings.matrix_answer_dms,
            answer_bots=self.settings.matrix_answer_bots,
        )
        self.limiter = RateLimiter(
            app.pool, self.settings.matrix_rate_per_minute, self.settings.matrix_rate_burst
        )
        self.admins = _csv(self.settings.matrix_admins)
        self._tasks = Background("handling a Matrix message")
        self._undecryptable: dict[str, float] = {}

    def is_admin(self, user_id: str) -> bool:
        """Deployment-wide commands (`!spend`, persona changes) are for `MATRIX_ADMINS` only:
        anyone can create a room and hold power level 100 in it."""
        return user_id in self.admins

    async def on_message(self, room: MatrixRoom, message: RoomMessage) -> None:
        conversation = await self._conversation(message)
        command = parse(message.body, PREFIX)
        if command is not None and command[0] in KNOWN_COMMANDS and message.msgtype != "m.notice":
            if await self.state.claim(message.event_id, room.room_id, conversation):
                self._spawn(self._command(room, message, conversation, *command))
            return
        if not await self.state.claim(message.event_id, room.room_id, conversation):
            log.info("event %s was handled before; not again", message.event_id)
            return
        cast = await self.cast.cast(conversation, room.room_id)
        said = await self._said(room, message, cast)
        choices = self.cast.who_speaks(cast, said, conversation)
        log.debug("event %s in %s: %s", message.event_id, conversation, choices)
        if not choices:
            return
        if not await self.limiter.allow(user_key(PLATFORM, message.sender)):
            return
        self._spawn(self._reply(room, message, conversation, cast, choices))

    async def on_undecryptable(self, room: MatrixRoom, event_id: str) -> None:
        """With encryption on, a message the bot cannot decrypt gets a clear notice (at most one
        per room a while). With it off the adapter leaves encrypted rooms instead."""
        now = time.monotonic()
        if now - self._undecryptable.get(room.room_id, -_UNDECRYPTABLE_EVERY) < (
            _UNDECRYPTABLE_EVERY
        ):
            return
        if not await self.state.claim(event_id, room.room_id, room.room_id):
            return
        self._undecryptable[room.room_id] = now
        text = "I couldn't decrypt that message, so I can't answer it. Please send it again."
        content = message_content(text, "m.notice")
        content["m.relates_to"] = relation(event_id, None)
        await self._send(room.room_id, content, transaction_id(event_id, "undecryptable"))

    async def drain(self) -> None:
        await self._tasks.drain()

    def cancel(self) -> None:
        self._tasks.cancel()

    async def _conversation(self, message: RoomMessage) -> str:
        if message.thread_root:
            return f"{message.room_id}|{message.thread_root}"
        if message.reply_to:
            known = await self.state.lookup(message.reply_to)
            if known is not None:
                return known[0]
        return message.room_id

    async def _said(self, room: MatrixRoom, message: RoomMessage, cast: list[Persona]) -> Said:
        """The message as the cast sees it: a reply to (or in a thread on) one of the bot's
        events is a reply to the persona that sent it; to the cast when that is unknown."""
        replied: str | None = None
        for event_id in (message.reply_to, message.thread_root):
            known = await self.state.lookup(event_id) if event_id else None
            if event_id and known is not None and known[1]:
                replied = await self.cast.author(room.room_id, event_id, cast)
                break
        else:
            event_id = None
        return Said(
            text=message.body,
            reply_to=replied,
            mentioned=self._mentioned(message) or (event_id is not None and replied is None),
            is_dm=self.direct.is_direct(room.room_id),
            from_bot=message.msgtype == "m.notice",
        )

    def _mentioned(self, message: RoomMessage) -> bool:
        """`m.mentions` decides when the client sent it; otherwise a pill or the full user id.
        The bot's localpart is no trigger word: persona names and aliases are (attention)."""
        if message.mentions is not None:
            return self.user_id in message.mentions
        return self.user_id in message.formatted or self.user_id in message.body

    def _spawn(self, work: Awaitable[None]) -> None:
        self._tasks.spawn(work)

    async def _reply(
        self,
        room: MatrixRoom,
        message: RoomMessage,
        conversation: str,
        cast: list[Persona],
        choices: list[Choice],
    ) -> None:
        before = ""
        if message.thread_root and conversation == f"{room.room_id}|{message.thread_root}":
            names = {user: room.user_name(user) or user for user in room.users}
            before = await self.threads.seed(
                room.room_id, message.thread_root, message.event_id, names
            )
        incoming = Incoming(
            PLATFORM,
            conversation,
            message.sender,
            room.user_name(message.sender) or message.sender,
            before + message.body,
            guild=message.room_id.split(":", 1)[-1],
            message_id=message.event_id,
        )

        async def answer(turn: CastTurn) -> tuple[str, str] | None:
            return await self._answer(room, message.thread_root, turn)

        await self.cast.play(incoming, message.event_id, cast, choices, answer=answer)

    async def _answer(
        self, room: MatrixRoom, thread_root: str | None, turn: CastTurn
    ) -> tuple[str, str] | None:
        """One persona's answer, rendered; (its event id, its text) when it was given."""
        target = ReplyTarget(
            turn.answering,
            thread_root,
            self.settings.matrix_msgtype,
            self.settings.matrix_stream,
            self.settings.matrix_max_edits,
            asker=turn.asker,
            face=turn.face,
        )

        async def send(content: dict[str, Any], txn: str, *, droppable: bool = False) -> str | None:
            return await self._send(room.room_id, content, txn, droppable=droppable)

        async def attach(path: Path, spoiler: bool) -> list[str]:
            return await self.commands.send_file(room.room_id, path, spoiler, turn.answering)

        async def redact(event_id: str, txn: str) -> None:
            await self._redact(room.room_id, event_id, txn)

        reply = StreamedReply(target, send, self.pacers(room.room_id), attach=attach, redact=redact)
        typing = asyncio.create_task(self._keep_typing(room.room_id))
        conversation = turn.incoming.conversation
        try:
            async with contextlib.aclosing(self.app.engine.handle(turn.incoming)) as events:
                await reply.render(events)
        finally:
            typing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await typing
            await self._typing(room.room_id, False)
            if reply.event_id is not None:
                await self.state.sent(reply.event_id, room.room_id, conversation)
            for event_id in reply.files:
                await self.state.sent(event_id, room.room_id, conversation)
        if reply.event_id is None or reply.answered is None:
            return None
        return reply.event_id, reply.answered

    async def _keep_typing(self, room_id: str) -> None:
        """Typing notices expire; renew them until the reply is done (cold starts)."""
        while True:
            await self._typing(room_id, True)
            await asyncio.sleep(self.settings.matrix_typing_timeout * 2 / 3)

    async def on_typing(self, room: MatrixRoom) -> None:
        """Someone is typing where the persona would likely answer: wake a sleeping GPU now,
        so the reply does not wait for its cold start (as on Discord). Never answers."""
        try:
            persona = await self.app.engine.persona_for(PLATFORM, room.room_id)
            likely = (
                self.direct.is_direct(room.room_id) and self.settings.matrix_answer_dms
            ) or self.attention.probability(room.room_id, persona) > 0
            if likely and await self.app.engine.router.prewake(persona.model):
                log.info(
                    "pre-waking a backend for %s: someone is typing in %s",
                    persona.model,
                    room.room_id,
                )
        except Exception:
            log.exception("pre-wake on typing failed")

    async def _command(
        self, room: MatrixRoom, message: RoomMessage, conversation: str, name: str, args: list[str]
    ) -> None:
        if name not in {command.name for command in self.app.commands.all()}:
            content = message_content(f"{PREFIX}{name} is not available yet.", "m.notice")
            content["m.relates_to"] = relation(message.event_id, message.thread_root)
            await self._send(room.room_id, content, transaction_id(message.event_id, "command"))
            return
        await self.cast.adopt(conversation, room.room_id)  # a thread: its room's cast first
        context = CommandContext(
            PLATFORM,
            conversation,
            message.sender,
            room.user_name(message.sender) or message.sender,
            is_admin=self.is_admin(message.sender),
        )
        sent = await self.commands.run(
            room, context, name, args, event_id=message.event_id, thread_root=message.thread_root
        )
        for event_id in sent:
            await self.state.sent(event_id, room.room_id, conversation)


def _csv(value: str) -> set[str]:
    return {part.strip() for part in value.split(",") if part.strip()}
