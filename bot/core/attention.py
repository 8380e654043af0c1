"""When a persona answers: triggers plus a decaying attention model. Platform-neutral.

A persona always answers when it is addressed: an @mention, a reply to one of its messages, a DM
(when DMs are answered), its name or an alias in the text as a word, or a channel set to always
listen. After being addressed it keeps following the conversation for a while: each later
message is answered with a probability that starts at `persona.attention_start` and falls
linearly to 0 over `persona.attention_window` seconds since it was last addressed there.
Messages from bots are never answered unless `answer_bots` is set.

The last-addressed times live in this process. That is enough when one process handles a
conversation (Discord shards split by guild, so a channel always lands on the same shard); a
restart simply forgets who was talking, which only makes the persona quieter for a while.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from bot.core.personas import Persona

_PRUNE_EVERY = 1024  # decisions between sweeps of expired last-addressed times


@dataclass(frozen=True)
class Trigger:
    mentioned: bool = False
    reply_to_bot: bool = False
    is_dm: bool = False
    always_listen: bool = False
    from_bot: bool = False


@dataclass(frozen=True)
class Decision:
    answer: bool
    reason: str


def names_in(persona: Persona) -> list[str]:
    """Every name a persona answers to: its slug, display name and aliases."""
    seen: dict[str, None] = {}
    for name in (persona.name, persona.display_name, *persona.aliases):
        if name.strip():
            seen.setdefault(name.strip().lower(), None)
    return list(seen)


def mentions_name(persona: Persona, text: str) -> bool:
    """True when one of the persona's names appears in `text` as a whole word (any case)."""
    for name in names_in(persona):
        if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.IGNORECASE):
            return True
    return False


class Attention:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._clock = clock
        self._rng = rng
        self._last: dict[tuple[str, str], tuple[float, float]] = {}  # → (when, window)
        self._decisions = 0

    def decide(
        self,
        *,
        conversation_key: str,
        persona: Persona,
        text: str,
        trigger: Trigger,
        answer_dms: bool = True,
        answer_bots: bool = False,
    ) -> Decision:
        self._decisions += 1
        if self._decisions % _PRUNE_EVERY == 0:
            self._prune()
        if trigger.from_bot and not answer_bots:
            return Decision(False, "from a bot")
        if trigger.is_dm:
            if not answer_dms:
                return Decision(False, "direct messages are not answered")
            return self._addressed(conversation_key, persona, "direct message")
        reason = self._address_reason(persona, text, trigger)
        if reason is not None:
            return self._addressed(conversation_key, persona, reason)
        return self._follow(conversation_key, persona)

    def addressed(self, conversation_key: str, persona: Persona) -> None:
        """Record that the persona was addressed here (e.g. by a slash command)."""
        self._last[(conversation_key, persona.name)] = (self._clock(), persona.attention_window)

    def probability(self, conversation_key: str, persona: Persona) -> float:
        """The chance the persona follows an unaddressed message here right now."""
        last = self._last.get((conversation_key, persona.name))
        if last is None or persona.attention_start <= 0:
            return 0.0
        elapsed = max(0.0, self._clock() - last[0])
        if elapsed >= persona.attention_window:
            return 0.0
        return persona.attention_start * (1.0 - elapsed / persona.attention_window)

    @staticmethod
    def _address_reason(persona: Persona, text: str, trigger: Trigger) -> str | None:
        if trigger.mentioned:
            return "mentioned"
        if trigger.reply_to_bot:
            return "reply to the bot"
        if mentions_name(persona, text):
            return "name in the text"
        if trigger.always_listen:
            return "always listening here"
        return None

    def _addressed(self, conversation_key: str, persona: Persona, reason: str) -> Decision:
        self.addressed(conversation_key, persona)
        return Decision(True, reason)

    def _follow(self, conversation_key: str, persona: Persona) -> Decision:
        chance = self.probability(conversation_key, persona)
        if chance <= 0.0:
            return Decision(False, "not addressed")
        if self._rng() < chance:
            return Decision(True, f"following the conversation (p={chance:.2f})")
        return Decision(False, f"stayed quiet (p={chance:.2f})")

    def _prune(self) -> None:
        now = self._clock()
        expired = [key for key, (when, window) in self._last.items() if now - when >= window]
        for key in expired:
            del self._last[key]

    def __len__(self) -> int:
        return len(self._last)
