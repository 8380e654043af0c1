"""Memory's plain types: what the engine hands memory, what the store returns, and the two
pure functions rows are keyed by (the dedupe hash and the scope of a place)."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bot.core.ports import Exchange, scope_of

__all__ = ["Exchange", "scope_of"]  # and the memory types below

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
    private_to: str | None = None  # the persona that alone recalls it; None: shared

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
            "private_to": self.private_to,
        }


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
