"""Prompt building: Jinja2 templates over prompts/, the per-user seed, and the history window.

The layout lets a model's prompt cache (Ollama, llama.cpp's server, vLLM) reuse everything but
the new turn: what is stable comes first, what changes per message comes last.

    system    persona, rules, who is talking (one-to-one) — the same on every turn
    history   the conversation in order, from a start that moves in steps, not every turn
    user      the notes for this reply (recalled memories, the time), quoted and labelled as
              notes about the speaker, not orders; then the new message

Lessons from the talk this project follows: no timestamps or other noise in the prompt unless the
persona asks (`include_time`, and then only in the notes); the sampling seed is a stable hash of
who is speaking; the temperature is the persona's.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import jinja2

from bot.core.personas import Persona
from bot.errors import ConfigError

_PER_MESSAGE_TOKENS = 4
HISTORY_ROWS = 200  # the most messages one prompt's history is chosen from
_NOTES_TEMPLATE = "notes.j2"
_KEPT_SYSTEMS = 1024  # system prompts kept rendered (a persona and a speaker each)
# When the history outgrows its budget, the oldest turns are dropped until it fills at most this
# share of the budget, so that the window's start (and the prompt's prefix) then stays put for
# many turns instead of moving by one message every turn.
_TRIM_TO = 0.5


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
    id: int | None = None  # the message's row id, when it comes from the database


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
        # (template, persona, speaker) by their ids -> the system prompt rendered for them
        self._systems: OrderedDict[
            tuple[int, int, str | None], tuple[jinja2.Template, Persona, str]
        ] = OrderedDict()

    def system(self, persona: Persona, *, speaker: str | None = None) -> str:
        """The stable part of the prompt: the persona, its rules and, in a one-to-one chat, who
        it talks with (`speaker`; None in a group, where each line carries its writer's name).
        Nothing in it changes from one message to the next, so it is rendered once for a
        persona and speaker and kept while the template and the persona are the same objects
        (an edited template is a new object, a reloaded persona file a new persona)."""
        template = self._template(persona.prompt_template, persona.name)
        key = (id(template), id(persona), speaker)
        kept = self._systems.get(key)
        if kept is not None and kept[0] is template and kept[1] is persona:
            self._systems.move_to_end(key)
            return kept[2]
        text = self._render(template, persona=persona, speaker=speaker).strip()
        self._systems[key] = (template, persona, text)
        if len(self._systems) > _KEPT_SYSTEMS:
            self._systems.popitem(last=False)
        return text

    def notes(
        self,
        persona: Persona,
        *,
        speaker: str,
        memories: Sequence[str] = (),
        now: datetime | None = None,
    ) -> str:
        """What changes per message, put just before the new message: the speaker's recalled
        memories, quoted and labelled as notes, not orders; the time when the persona asks.
        Empty when there is nothing to note."""
        when = None
        if persona.include_time:
            when = (now or datetime.now(UTC)).strftime("%A %d %B %Y, %H:%M UTC")
        if not memories and when is None:
            return ""
        quoted = [" ".join(m.split()) for m in memories]  # one line each: no way out of the quote
        template = self._template(_NOTES_TEMPLATE, persona.name)
        return self._render(
            template, persona=persona, speaker=speaker, memories=quoted, now=when
        ).strip()

    def _template(self, name: str, persona: str) -> jinja2.Template:
        try:
            return self._env.get_template(name)
        except jinja2.TemplateNotFound as exc:
            raise ConfigError(f"persona {persona}: prompt template {name} not found") from exc
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"prompts/{exc.name}:{exc.lineno}: {exc.message}") from exc

    @staticmethod
    def _render(template: jinja2.Template, **values: object) -> str:
        try:
            return template.render(**values)
        except jinja2.UndefinedError as exc:
            raise ConfigError(f"prompt template {template.name}: {exc}") from exc


def turn_tokens(turn: Turn) -> int:
    return estimate_tokens(turn.content) + _PER_MESSAGE_TOKENS


def history_window(
    history: Sequence[Turn],
    budget_tokens: int,
    *,
    start: int | None = None,
    max_turns: int | None = None,
) -> list[Turn]:
    """The turns the prompt keeps, oldest first: those from the message id `start` on, while they
    fit `budget_tokens` and number fewer than `max_turns` (the most the caller fetched, so a
    full fetch may have cut some off). When they do not, the oldest are dropped until what is
    left fills at most half of either, so the window's start, and the prompt's prefix with it,
    stays put for many turns. The caller keeps the first kept turn's id as the next `start`.
    """
    kept = [t for t in history if start is None or t.id is None or t.id >= start]
    total = sum(turn_tokens(t) for t in kept)
    if total <= budget_tokens and (max_turns is None or len(kept) < max_turns):
        return kept
    most_tokens = budget_tokens * _TRIM_TO
    most_turns = len(kept) if max_turns is None else int(max_turns * _TRIM_TO)
    first = 0
    while first < len(kept) and (total > most_tokens or len(kept) - first > most_turns):
        total -= turn_tokens(kept[first])
        first += 1
    return kept[first:]


def is_group(window: Sequence[Turn], speaker: str) -> bool:
    """True when more than one person speaks in the window: then user lines carry names."""
    return len({t.author_name for t in window if t.role == "user"} | {speaker}) > 1


def fixed_tokens(system: str, notes: str, text: str) -> int:
    """What the prompt costs besides the history: system prompt, notes and the new message."""
    return estimate_tokens(system) + estimate_tokens(notes) + estimate_tokens(text) + 12


def build_messages(
    system: str,
    window: Sequence[Turn],
    speaker: str,
    text: str,
    *,
    notes: str = "",
) -> list[dict[str, str]]:
    """System prompt, the history window (see `history_window`), then the new message with
    this reply's notes before it.

    Names are put before user lines only when more than one person speaks in the window, so a
    one-to-one chat carries no noise.
    """
    named = is_group(window, speaker)

    def user_line(name: str, content: str) -> str:
        return f"{name}: {content}" if named else content

    messages = [{"role": "system", "content": system}]
    for turn in window:
        content = user_line(turn.author_name, turn.content) if turn.role == "user" else turn.content
        messages.append({"role": turn.role, "content": content})
    last = user_line(speaker, text)
    messages.append({"role": "user", "content": f"{notes}\n\n{last}" if notes else last})
    return messages


def lay_out(
    builder: PromptBuilder,
    persona: Persona,
    *,
    speaker: str,
    text: str,
    turns: Sequence[Turn],
    memories: Sequence[str],
    start: int | None,
) -> tuple[list[dict[str, str]], int | None]:
    """The messages for one reply, laid out for a model's prompt cache (see the module's
    docstring), and the history window's new start when it stepped forward (else None).
    `start` is where the window started for the turn before (a message id)."""
    notes = builder.notes(persona, speaker=speaker, memories=memories)
    solo, group = builder.system(persona, speaker=speaker), builder.system(persona)
    fixed = max(fixed_tokens(solo, notes, text), fixed_tokens(group, notes, text))
    room = persona.context_window - persona.max_reply_tokens - fixed
    window = history_window(turns, room, start=start, max_turns=HISTORY_ROWS)
    moved = window[0].id if window and window[0].id != start else None
    system = group if is_group(window, speaker) else solo
    return build_messages(system, window, speaker, text, notes=notes), moved
