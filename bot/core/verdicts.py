"""Verdicts: what the pipeline reads of a safety check, and where the checked text was said.

The types the engine and the moderation step (bot/core/moderation.py) handle; the guard
(bot/safety/) makes them. Kept in the core so that the core never imports the safety package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

FailPolicy = Literal["open", "closed"]
Kind = Literal["input", "output", "image_prompt", "memory"]  # what a check judged


@dataclass(frozen=True)
class Verdict:
    safe: bool  # the decision: the text may go on
    categories: list[str] = field(default_factory=list)  # what the model named
    unknown: bool = False  # no valid verdict: unreachable, too slow or no verdict
    blocking: list[str] = field(default_factory=list)  # the categories that blocked it
    reason: str = ""  # why the verdict is unknown
    policy: FailPolicy | None = None  # the fail policy applied to an unknown verdict
    checked: bool = True  # False when the guard is turned off
    latency_ms: float = 0.0
    at: datetime = field(default_factory=lambda: datetime.now(UTC))  # when it was decided
    answered: bool = False  # unknown although the guard answered: it gave no verdict

    @property
    def label(self) -> str:
        """The model's verdict: 'safe', 'unsafe' or 'unknown'."""
        if self.unknown:
            return "unknown"
        return "unsafe" if self.categories else "safe"

    @property
    def no_verdict(self) -> bool:
        """The guard was reached and answered something that is not a verdict."""
        return self.unknown and self.answered

    @property
    def blocked(self) -> bool:
        """The guard named a category that blocks here."""
        return not self.safe and not self.unknown

    @property
    def unmoderated(self) -> bool:
        """Let through without a verdict, under the `open` fail policy."""
        return self.unknown and self.safe


UNCHECKED = Verdict(safe=True, checked=False)


@dataclass(frozen=True)
class Where:
    """Where the text was said, for the policy and the records."""

    platform: str
    conversation: str | None = None  # the platform's id of the channel, room or chat
    conversation_id: int | None = None  # our conversations.id, when there is one
    user_key: str | None = None
    nsfw: bool = False
