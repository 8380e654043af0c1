"""Which conversation a Discord message belongs to, and its persona, decided without writing.

A channel, a DM and a thread are each one conversation, keyed by the channel id. A thread
started from a message we answered or sent forks that conversation: on its first answer it gets a
copy of the history so far, the persona and the cast, and from then on owns its history (`/reset`,
`/persona set` and `/persona cast` inside it touch the thread only). Any other thread takes its
parent's persona and cast (a copy, made on its first answer).

Most messages in a busy guild are not for the bot, so the decision whether to answer is made
from memory: personas are cached per conversation (read with a SELECT on a miss, never created),
and nothing is written until the bot has decided to answer (`adopt`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import discord

from bot.adapters.message_map import MessageMap
from bot.core.history import Conversation
from bot.core.personas import Persona

if TYPE_CHECKING:
    from bot.core.engine import Engine

PLATFORM = "discord"
_TTL = 60.0  # seconds a cached persona is trusted (another process may have changed it)
_MAX_CACHED = 10_000


def is_forward(reference: discord.MessageReference | None) -> bool:
    """A forwarded message carries a reference too, but it is not a reply."""
    return reference is not None and reference.type == discord.MessageReferenceType.forward


def replied_to(message: discord.Message) -> discord.MessageReference | None:
    """The message's reply reference, or None (no reference, or a forward)."""
    reference = message.reference
    if reference is None or reference.message_id is None or is_forward(reference):
        return None
    return reference


class Conversations:
    def __init__(
        self,
        engine: Engine,
        messages: MessageMap,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._messages = messages
        self._clock = clock
        # conversation → (expires, (persona name, cast names))
        self._cache: dict[str, tuple[float, tuple[str | None, list[str]]]] = {}

    @staticmethod
    def key_of(channel: object) -> str:
        return str(getattr(channel, "id", ""))

    async def replies_to_bot(self, message: discord.Message, my_id: int) -> bool:
        """Is this a reply to one of the bot's messages? From the cache where possible."""
        reference = replied_to(message)
        if reference is None:
            return False
        resolved = reference.resolved or reference.cached_message
        if isinstance(resolved, discord.Message):
            return resolved.author.id == my_id
        mapped = await self._messages.lookup(str(reference.message_id))
        return mapped is not None and mapped.from_bot

    async def persona(self, key: str, channel: object) -> Persona:
        """The persona answering in this conversation (a new thread: its parent channel's)."""
        name = (await self._known(key))[0]
        parent = getattr(channel, "parent_id", None)
        if name is None and isinstance(channel, discord.Thread) and parent:
            name = (await self._known(str(parent)))[0]
        return self._engine.persona_named(name)

    async def cast(self, key: str, channel: object) -> list[Persona]:
        """The conversation's cast (bot/core/cast.py): a cast of one is the conversation's
        persona; a thread not yet answered in plays its parent channel's cast. Personas no
        longer loaded are left out; never empty."""
        persona = await self.persona(key, channel)
        own, names = await self._known(key)
        parent = getattr(channel, "parent_id", None)
        if own is None and isinstance(channel, discord.Thread) and parent:
            names = (await self._known(str(parent)))[1]
        members: dict[str, Persona] = {}
        for name in names:
            member = self._engine.personas.find(name)
            if member is not None:
                members.setdefault(name, member)
        return list(members.values()) or [persona]

    async def _known(self, key: str) -> tuple[str | None, list[str]]:
        """The conversation's persona name and cast names, from the cache or read (never
        created): one row and its cast, read together on a miss."""
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await self._engine.history.find(PLATFORM, key)
        known: tuple[str | None, list[str]] = (None, [])
        if found is not None:
            known = (found.persona, await self._engine.history.cast(found.id))
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        self._cache[key] = (now + _TTL, known)
        return known

    def forget(self) -> None:
        """Drop what is cached (after `/persona set` or `cast`; threads inherit, so all of it)."""
        self._cache.clear()

    async def adopt(self, key: str, channel: object) -> None:
        """Before the first answer (or command) in a thread: give it its persona and, when it was
        started from a message of a known conversation, a copy of that conversation's history."""
        if not isinstance(channel, discord.Thread):
            return
        engine = self._engine
        conversation = await engine.conversation(PLATFORM, key)
        if conversation.persona is not None:
            return
        persona = await self.persona(key, channel)
        origin = await self._messages.lookup(key)  # a thread has its starter message's id
        source: Conversation | None
        if origin is not None and origin.conversation != key:
            source = await engine.conversation(PLATFORM, origin.conversation)
            await engine.history.fork(source.id, conversation.id, persona.name)
        else:
            source = await engine.history.find(PLATFORM, str(channel.parent_id))
            await engine.history.set_persona(conversation.id, persona.name)
        cast = await engine.history.cast(source.id) if source is not None else []
        if cast:  # the channel's cast plays in the thread too
            await engine.history.add_to_cast(conversation.id, cast)
        self._cache.pop(key, None)
