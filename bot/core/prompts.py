"""Prompt building: Jinja2 templates over prompts/, the per-user seed, and history trimming.

Lessons from the talk this project follows: no timestamps or other noise in the prompt unless the
persona asks (`include_time`); the sampling seed is a stable hash of who is speaking; the
temperature is the persona's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import jinja2

from bot.core.personas import Persona
from bot.errors import ConfigError

_PER_MESSAGE_TOKENS = 4


def user_seed(platform: str, user_id: str) -> int:
    """A sampling seed that is the same for one user across restarts and differs between users."""
    digest = hashlib.sha256(f"{platform}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFF_FFFF


def estimate_tokens(text: str) -> int:
    """A cheap token estimate (about four characters a token for English), never zero."""
    return len(text) // 4 + 1


@dataclass(frozen=True)
class Turn:
    """One message of history as the prompt sees it."""

    role: str  # "user" or "assistant"
    author_name: str
    content: str


class PromptBuilder:
    def __init__(self, directory: Path) -> None:
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(directory),
            undefined=jinja2.StrictUndefined,
            autoescape=False,  # noqa: S701 - prompts are plain text, never HTML
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=True,
        )

    def system(
        self,
        persona: Persona,
        *,
        speaker: str,
        memories: Sequence[str] = (),
        now: datetime | None = None,
    ) -> str:
        try:
            template = self._env.get_template(persona.prompt_template)
        except jinja2.TemplateNotFound as exc:
            raise ConfigError(
                f"persona {persona.name}: prompt template {persona.prompt_template} not found"
            ) from exc
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"prompts/{exc.name}:{exc.lineno}: {exc.message}") from exc
        when = None
        if persona.include_time:
            when = (now or datetime.now(UTC)).strftime("%A %d %B %Y, %H:%M UTC")
        try:
            text = template.render(
                persona=persona, speaker=speaker, memories=list(memories), now=when
            )
        except jinja2.UndefinedError as exc:
            raise ConfigError(f"prompt template {persona.prompt_template}: {exc}") from exc
        return text.strip()


def build_messages(
    system: str,
    history: Sequence[Turn],
    speaker: str,
    text: str,
    budget_tokens: int,
) -> list[dict[str, str]]:
    """System prompt, then as much recent history as fits the budget, then the new message.

    Names are put before user lines only when more than one person speaks in the window, so a
    one-to-one chat carries no noise.
    """
    used = estimate_tokens(system) + estimate_tokens(text) + 2 * _PER_MESSAGE_TOKENS
    kept: list[Turn] = []
    for turn in reversed(history):
        cost = estimate_tokens(turn.content) + _PER_MESSAGE_TOKENS
        if used + cost > budget_tokens:
            break
        used += cost
        kept.append(turn)
    kept.reverse()
    speakers = {t.author_name for t in kept if t.role == "user"} | {speaker}
    named = len(speakers) > 1

    def user_line(name: str, content: str) -> str:
        return f"{name}: {content}" if named else content

    messages = [{"role": "system", "content": system}]
    for turn in kept:
        content = user_line(turn.author_name, turn.content) if turn.role == "user" else turn.content
        messages.append({"role": turn.role, "content": content})
    messages.append({"role": "user", "content": user_line(speaker, text)})
    return messages
