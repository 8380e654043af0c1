"""Llama Guard's verdicts: how its answer is read, which categories a persona enforces where,
and the decision the engine acts on (`Verdict`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from bot.core.personas import Persona
from bot.safety.categories import CATEGORIES, CHILD_EXPLOITATION, SEXUAL_CONTENT, UNSPECIFIED
from bot.safety.prompt import model_codes

Kind = Literal["input", "output", "image_prompt", "memory"]
FailPolicy = Literal["open", "closed"]

_FIRST_WORD = re.compile(r"[a-z]+")
_CODE = re.compile(r"\bS(\d{1,2})\b", re.IGNORECASE)
NO_VERDICT = "it gave no verdict"


def parse_verdict(raw: str) -> tuple[bool, list[str]] | None:
    """'safe' → (True, []); 'unsafe\\nS1,S10' → (False, ['S1', 'S10']); 'UNSAFE' →
    (False, ['unspecified']); anything whose first line is neither → None.

    Case and surrounding whitespace are tolerated; codes the model invents (S15) are not
    categories, and an unsafe verdict left with none blocks as "unspecified".
    """
    lines = [line.strip() for line in raw.strip().splitlines() if line.strip()]
    first = _FIRST_WORD.match(lines[0].lower()) if lines else None
    if first is None or first.group(0) not in ("safe", "unsafe"):
        return None
    rest = lines[0][first.end() :].strip(" .:,")
    if first.group(0) == "safe":
        return (True, []) if not rest and len(lines) == 1 else None
    named = [f"S{int(n)}" for n in _CODE.findall(" ".join([rest, *lines[1:]]))]
    codes = list(dict.fromkeys(code for code in named if code in CATEGORIES))
    return False, codes or [UNSPECIFIED]


def enforced_codes(persona: Persona, *, nsfw: bool, model: str) -> list[str]:
    """The categories listed in the guard's prompt for this persona here, in code order: the
    persona's `guard_block` and S4, without S12 in an NSFW channel for a persona with
    `allow_nsfw`, among those the guard model knows (no S14 for the 1B)."""
    wanted = set(persona.guard_block) | {CHILD_EXPLOITATION}
    if nsfw and persona.allow_nsfw:
        wanted.discard(SEXUAL_CONTENT)
    return [code for code in model_codes(model) if code in wanted]


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
