"""A cast of personas in a Matrix room: the glue between the adapter and bot/core/cast.py.

Who a message replies to: an event one of our personas sent is known by its id in the `Stage`
(this process) or, after a restart, by the per-message profile it carries (its `id` is the
persona's name; the event is read back from the homeserver). Who speaks is decided by the core
(`who_speaks`); `CastPlayer.play` then lets each chosen persona answer once, under its own name
and face (faces.py), and lets the others answer that reply within the persona-turn budget.
A cast of one speaks exactly as before: from the bot's account, no profile, no name.
A thread plays its room's cast: before its first answer it takes a copy of the room's persona
and cast (`adopt`), and from then on keeps its own (`!persona cast` inside it changes it only).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from bot.adapters.matrix.faces import Avatars, Face, profile_id
from bot.adapters.matrix.threads import ThreadContext
from bot.core.attention import Attention
from bot.core.cast import Casting, Choice, Cue, Said, cast_for, play
from bot.core.engine import Engine, Incoming
from bot.core.personas import Persona

log = logging.getLogger(__name__)

PLATFORM = "matrix"


@dataclass(frozen=True)
class Turn:
    """One persona's answer to be given: to which event, under which face."""

    incoming: Incoming
    answering: str  # the event answered
    face: Face | None  # None: a cast of one, from the bot's account as before
    asker: str | None  # who to mention (the person asking; nobody for a persona's message)


# Gives one answer; returns (the sent event's id, the reply's text), or None when nothing was said.
Answer = Callable[[Turn], Awaitable[tuple[str, str] | None]]


class CastPlayer(Casting):
    def __init__(
        self,
        engine: Engine,
        threads: ThreadContext,
        avatars: Avatars,
        attention: Attention,
        *,
        answer_dms: bool,
        answer_bots: bool,
    ) -> None:
        self.engine = engine
        self.threads = threads
        super().__init__(attention, answer_dms=answer_dms, answer_bots=answer_bots)
        self.avatars = avatars

    async def cast(self, conversation: str, room_id: str) -> list[Persona]:
        """The conversation's cast; a thread not yet answered in takes its room's first."""
        engine = self.engine
        own = await engine.conversation(PLATFORM, conversation)
        if conversation != room_id and own.persona is None:
            await self.adopt(conversation, room_id)
            own = await engine.conversation(PLATFORM, conversation)
        return await cast_for(engine.history, engine.persona_named, own)

    async def adopt(self, conversation: str, room_id: str) -> None:
        """A thread's conversation takes a copy of its room's persona and cast (once)."""
        history = self.engine.history
        own = await self.engine.conversation(PLATFORM, conversation)
        if conversation == room_id or own.persona is not None:
            return
        room = await self.engine.conversation(PLATFORM, room_id)
        await history.set_persona(own.id, self.engine.persona_named(room.persona).name)
        names = await history.cast(room.id)
        if names:
            await history.add_to_cast(own.id, names)

    async def author(self, room_id: str, event_id: str, cast: Sequence[Persona]) -> str | None:
        """The cast member who sent `event_id` (one of the bot's events), when known."""
        if len(cast) == 1:
            return cast[0].name
        known = self.stage.author(event_id)
        if known is not None:
            return known[0]
        source = await self.threads.event(room_id, event_id)
        name = profile_id(source.get("content") or {}) if source is not None else None
        return name if any(p.name == name for p in cast) else None

    async def play(
        self,
        incoming: Incoming,
        event_id: str,
        cast: list[Persona],
        choices: list[Choice],
        *,
        answer: Answer,
    ) -> None:
        """Each chosen persona answers `event_id` once (mentioning its sender, a person); the
        others may answer that reply, within the persona-turn budget (bot/core/cast.py)."""

        async def one(cue: Cue) -> tuple[str, str] | None:
            face = await self.avatars.face(cue.persona) if len(cast) > 1 else None
            asker = incoming.author_id if cue.incoming.from_persona is None else None
            return await answer(Turn(cue.incoming, cue.message_id, face, asker))

        def speaks(said: Said) -> list[Choice]:
            return self.who_speaks(cast, said, incoming.conversation)

        await play(self.stage, speaks, incoming, event_id, choices, answer=one)
