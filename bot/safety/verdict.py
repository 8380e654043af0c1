"""Llama Guard's verdicts: how its answer is read, which categories a persona enforces where,
and the decision the engine acts on (`Verdict`)."""

from __future__ import annotations

import re

from bot.core.categories import CATEGORIES, CHILD_EXPLOITATION, SEXUAL_CONTENT, UNSPECIFIED
from bot.core.personas import Persona
from bot.core.verdicts import UNCHECKED, FailPolicy, Kind, Verdict, Where
from bot.safety.prompt import model_codes

__all__ = [
    "NO_VERDICT",
    "UNCHECKED",
    "FailPolicy",
    "Kind",
    "Verdict",
    "Where",
    "enforced_codes",
    "parse_verdict",
]


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
