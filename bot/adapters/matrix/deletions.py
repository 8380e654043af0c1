"""Matrix redactions and edits, honoured (issue 15).

A redaction (`m.room.redaction`, by the sender or a moderator) removes the message from the
engine's history, with the reply to it and the facts memory drew from it. An edit (an
`m.room.message` whose `m.relates_to` is `rel_type: m.replace`) replaces the stored text with
its `m.new_content`. The redacted event's id is `content.redacts` from room version 11 on, and
the top-level `redacts` before (Matrix spec, "Redactions"; Synapse sends both).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

log = logging.getLogger(__name__)

PLATFORM = "matrix"


class _Removals(Protocol):
    async def message_deleted(self, platform: str, message_id: str) -> None: ...

    async def message_edited(self, platform: str, message_id: str, text: str) -> None: ...


async def honour_removal(engine: _Removals, source: dict[str, Any]) -> bool:
    """Pass a redaction or an edit on to the engine; True when the event was one."""
    content = source.get("content") or {}
    try:
        if source.get("type") == "m.room.redaction":
            redacts = content.get("redacts") or source.get("redacts")
            if isinstance(redacts, str):
                await engine.message_deleted(PLATFORM, redacts)
            return True
        relates = content.get("m.relates_to") or {}
        if source.get("type") == "m.room.message" and relates.get("rel_type") == "m.replace":
            new = (content.get("m.new_content") or {}).get("body")
            target = relates.get("event_id")
            if isinstance(new, str) and isinstance(target, str) and new.strip():
                await engine.message_edited(PLATFORM, target, new.strip())
            return True
    except Exception:
        log.exception("honouring Matrix event %s failed", source.get("event_id"))
        return True
    return False
