"""Memory's plain types: what the engine hands memory, what the store returns, and the two
pure functions rows are keyed by (the dedupe hash and the scope of a place)."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Any

_SPACES = re.compile(r"\s+")
_EDGE_PUNCTUATION = ".,;:!?\"'`()[]{} "


def normalise(text: str) -> str:
    """The form dedupe compares: NFKC, case-folded, single spaces, no edge punctuation."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _SPACES.sub(" ", folded).strip(_EDGE_PUNCTUATION)


def text_hash(text: str) -> str:
    return hashlib.sha256(normalise(text).encode()).hexdigest()


@dataclass(frozen=True)
class Recalled:
    id: int
    text: str
    similarity: float
    score: float


@dataclass(frozen=True)
class MemoryRow:
    id: int
    text: str
    embed_model: str
    persona: str | None
    created_at: datetime
    last_recalled_at: datetime | None
    superseded_by: int | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "text": self.text,
            "embed_model": self.embed_model,
            "persona": self.persona,
            "created_at": self.created_at.isoformat(),
            "last_recalled_at": self.last_recalled_at.isoformat()
            if self.last_recalled_at
            else None,
            "superseded_by": self.superseded_by,
        }


def scope_of(platform: str, conversation: str, guild: str | None) -> str:
    """Where a fact learned here may be recalled: the terminal, a Matrix room (a DM is a room),
    a Discord server, or else the conversation itself (a Discord DM)."""
    if platform == "console":
        return "console"
    if platform == "matrix":  # a thread's conversation is "room|thread root": its room
        return f"matrix:room:{conversation.split('|', 1)[0]}"
    if guild:
        return f"{platform}:guild:{guild}"
    return f"{platform}:conv:{conversation}"


@dataclass(frozen=True)
class Exchange:
    """One answered message, as the engine hands it to memory."""

    user_key: str
    author_name: str
    persona: str
    model: str
    platform: str
    conversation_id: int | None
    message: str
    reply: str
    scope: str | None = None  # scope_of() the place it was said; None: before scopes
    message_id: int | None = None  # messages.id of the user's message in history


@dataclass(frozen=True)
class Job:
    id: int
    exchange: Exchange
    attempts: int


@dataclass(frozen=True)
class NewFact:
    text: str
    vector: list[float]
    replaces: tuple[int, ...] = ()
