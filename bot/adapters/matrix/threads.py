"""A thread's context, the way Element shows it: its root, then the thread's messages.

The first time the bot is addressed in a thread, the thread's conversation has no history of
its own. `ThreadContext.seed` fetches the root (`GET /rooms/{room}/event/{root}`) and the
thread's earlier messages (the relations API, `rel_type` `m.thread`; a cast member's message
under its persona, its name fallback taken off), and stores them as the conversation's first
exchanges: a run of people's messages followed by one of the bot's becomes an exchange; when
the root is the bot's answer, the question it answered comes first.
People's messages after the bot's last word are handed back, to go before the new message.
Edits count as shown (the server bundles the latest `m.replace`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from nio import AsyncClient, MegolmEvent, RoomGetEventResponse
from nio.api import RelationshipType

from bot.adapters.matrix.faces import profile_id, without_fallback
from bot.core.engine import Engine

log = logging.getLogger(__name__)

PLATFORM = "matrix"
_MAX_EVENTS = 100  # thread messages read at most


@dataclass(frozen=True)
class Line:
    sender: str
    name: str
    text: str
    persona: str | None = None  # the cast member who said it (its per-message profile)


class ThreadContext:
    def __init__(self, client: AsyncClient, engine: Engine, user_id: str) -> None:
        self.client = client
        self.engine = engine
        self.user_id = user_id

    async def seed(self, room_id: str, root: str, current: str, names: dict[str, str]) -> str:
        """Store the thread's context once; returns what to put before the new message."""
        conversation = await self.engine.conversation(PLATFORM, f"{room_id}|{root}")
        if await self.engine.history.recent(conversation.id, limit=1):
            return ""  # the thread already has its history
        lines = await self._lines(room_id, root, current, names)
        persona = self.engine.persona_named(conversation.persona).name
        pending: list[Line] = []
        for line in lines:
            if line.sender != self.user_id:
                pending.append(line)
                continue
            if not pending:
                continue  # nothing to pair the bot's words with
            await self.engine.history.append_exchange(
                conversation.id,
                author_id=pending[-1].sender,
                author_name=pending[-1].name,
                text=_joined(pending),
                persona=line.persona or persona,
                reply=line.text,
            )
            pending = []
        return f"{_joined(pending)}\n\n" if pending else ""

    async def _lines(
        self, room_id: str, root: str, current: str, names: dict[str, str]
    ) -> list[Line]:
        root_source = await self.event(room_id, root)
        if root_source is None:
            return []
        sources = [root_source]
        if root_source.get("sender") == self.user_id:  # "reply in thread" on the bot's answer
            asked = _in_reply_to(root_source)
            question = await self.event(room_id, asked) if asked else None
            if question is not None:
                sources.insert(0, question)
        thread: list[dict[str, Any]] = []
        try:
            async for event in self.client.room_get_event_relations(
                room_id, root, rel_type=RelationshipType.thread, limit=_MAX_EVENTS
            ):
                thread.append(await self._source(event))
                if len(thread) >= _MAX_EVENTS:
                    break
        except Exception:
            log.warning("reading thread %s in %s failed", root, room_id, exc_info=True)
        thread.reverse()  # the API pages newest first
        sources += [s for s in thread if s.get("event_id") != current]
        return [line for s in sources if (line := _line(s, names)) is not None]

    async def event(self, room_id: str, event_id: str) -> dict[str, Any] | None:
        response = await self.client.room_get_event(room_id, event_id)
        if not isinstance(response, RoomGetEventResponse):
            log.warning("could not read event %s in %s", event_id, room_id)
            return None
        return await self._source(response.event)

    async def _source(self, event: Any) -> dict[str, Any]:
        if isinstance(event, MegolmEvent) and self.client.olm:
            try:
                event = self.client.decrypt_event(event)
            except Exception:
                log.info("a thread message could not be decrypted")
        source = dict(event.source)
        if hasattr(event, "body") and "content" in source and isinstance(event.body, str):
            source["content"] = {**source["content"], "body": event.body}  # decrypted body
        return source


def _line(source: dict[str, Any], names: dict[str, str]) -> Line | None:
    if source.get("type") != "m.room.message":
        return None
    content = source.get("content") or {}
    replaced = ((source.get("unsigned") or {}).get("m.relations") or {}).get("m.replace")
    if isinstance(replaced, dict):
        content = (replaced.get("content") or {}).get("m.new_content") or content
    body = content.get("body")
    if not isinstance(body, str) or not body.strip():
        return None
    sender = str(source.get("sender"))
    persona = profile_id(content)
    return Line(sender, names.get(sender) or sender, without_fallback(content, body), persona)


def _in_reply_to(source: dict[str, Any]) -> str | None:
    relates = (source.get("content") or {}).get("m.relates_to") or {}
    event_id = (relates.get("m.in_reply_to") or {}).get("event_id")
    return str(event_id) if event_id else None


def _joined(lines: list[Line]) -> str:
    if len({line.sender for line in lines}) == 1:
        return "\n".join(line.text for line in lines)
    return "\n".join(f"{line.name}: {line.text}" for line in lines)
