"""The engine's side of long-term memory: the speaker's facts recalled for the prompt, each
answered exchange handed over afterwards, and deletions and edits on the platform passed on.

Memory itself (extraction, the store, embeddings) is bot/memory/, which the engine knows only as
a `MemoryPort` (bot/core/ports.py); with none, or a persona with `memory: false`, nothing is
recalled or learned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from bot.core.calls import CallContext
from bot.core.events import Incoming
from bot.core.history import Conversation, History
from bot.core.personas import Persona
from bot.core.ports import EarlyEmbedding, Exchange, MemoryPort, Spawn, scope_of

log = logging.getLogger(__name__)


def scope_for(incoming: Incoming) -> str:
    """Where a fact learned from this message may be recalled (bot/core/ports.py)."""
    return scope_of(incoming.platform, incoming.conversation, incoming.guild)


class Recollection:
    def __init__(
        self,
        memory: MemoryPort | None,
        history: History,
        spawn: Spawn,
        personas: Callable[[str | None], Persona] | None = None,
    ) -> None:
        self.memory = memory
        self._history = history
        self._spawn = spawn
        self._personas = personas  # a persona by name (the engine's `persona_named`)

    def embed_early(self, incoming: Incoming, persona: Persona) -> EarlyEmbedding | None:
        """The message's embedding, started before its conversation is read, for `persona`
        (the one the conversation had when last read here): only when that persona recalls and
        the speaker is known to have memories where it would look (memory decides; None: not
        started). Whatever happens to the reply, `settle_early` must follow."""
        if self.memory is None or not self.memory.active(persona):
            return None
        scope = None if persona.memory_scope == "user" else scope_for(incoming)
        return self.memory.embed_early(incoming.user_key, incoming.text, scope)

    def settle_early(
        self,
        early: EarlyEmbedding,
        incoming: Incoming,
        conversation: Conversation | None,
        persona: Persona,
    ) -> None:
        """The early embedding's calls recorded under the reply's context, used or not."""
        if self.memory is not None:
            conversation_id = conversation.id if conversation is not None else None
            context = CallContext(
                incoming.platform, conversation_id, incoming.user_key, persona.name
            )
            self.memory.settle_early(early, context, self._spawn)

    async def recall(
        self,
        incoming: Incoming,
        conversation: Conversation,
        persona: Persona,
        early: EarlyEmbedding | None = None,
    ) -> list[str]:
        """The speaking user's facts for the prompt (only theirs, even in a group), from the
        place they are speaking in unless the persona widens it (`memory_scope: user`): the
        shared ones and those this persona keeps, never another cast member's. `early`: the
        message's embedding, already under way (`embed_early`)."""
        if self.memory is None or not self.memory.active(persona):
            return []
        context = CallContext(incoming.platform, conversation.id, incoming.user_key, persona.name)
        scope = None if persona.memory_scope == "user" else scope_for(incoming)
        found = await self.memory.recall(
            incoming.user_key,
            incoming.text,
            context=context,
            spawn=self._spawn,
            scope=scope,
            persona=persona.name,
            early=early,
        )
        return [m.text for m in found]

    def remember(
        self,
        incoming: Incoming,
        conversation: Conversation,
        persona: Persona,
        reply: str,
        message_row: int | None = None,
    ) -> None:
        """Hand an answered exchange to memory extraction, in the background: what is learned
        is this persona's alone unless it shares its memories (`share_memories: true`)."""
        if self.memory is None or not self.memory.active(persona) or incoming.from_persona:
            return  # nothing to learn about a person from another persona's words
        exchange = Exchange(
            incoming.user_key,
            incoming.author_name,
            persona.name,
            persona.model,
            incoming.platform,
            conversation.id,
            incoming.text,
            reply,
            scope_for(incoming),
            message_row,
            None if persona.share_memories else persona.name,
        )
        self._spawn(self.memory.remember(exchange))

    async def message_deleted(self, platform: str, message_id: str) -> None:
        """It and the reply to it leave the history; its pending extraction stops, and the
        facts drawn from it are deleted."""
        rows = await self._history.delete_message(platform, message_id)
        if rows and self.memory is not None:
            facts = await self.memory.message_deleted(rows)
            log.info(
                "message %s deleted on %s: %d facts from it deleted", message_id, platform, facts
            )

    async def message_edited(self, platform: str, message_id: str, text: str) -> None:
        """The stored text becomes the new one, in history and in a pending extraction; the
        facts already drawn from the old text are drawn again from the new one."""
        rows = await self._history.edit_message(platform, message_id, text)
        if rows and self.memory is not None:
            await self.memory.message_edited(rows, text, self._model_of)

    def _model_of(self, name: str) -> str | None:
        """The chat model persona `name` extracts with; None when it no longer learns."""
        if self._personas is None or self.memory is None:
            return None
        persona = self._personas(name)
        return persona.model if self.memory.active(persona) else None
