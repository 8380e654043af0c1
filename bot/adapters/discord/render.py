"""Pure helpers for the Discord adapter: splitting replies, cleaning mentions, inlining files.

Nothing here talks to Discord, so each piece is tested on its own (tests/test_discord_render.py).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

from bot.core.ports import rate_limited

DISCORD_LIMIT = 2000
_FENCE = "```"
_CLOSE = "\n" + _FENCE

# Prose is cut at lines first, then sentence ends, then spaces, then anywhere.
_PROSE_SPLITS: list[tuple[str, re.Pattern[str]]] = [
    ("\n", re.compile(r"\n")),
    (" ", re.compile(r"(?<=[.!?…])\s+")),
    (" ", re.compile(r"\s+")),
]

TEXT_SUFFIXES = frozenset(
    [
        ".txt",
        ".md",
        ".markdown",
        ".rst",
        ".py",
        ".js",
        ".ts",
        ".json",
        ".yaml",
        ".yml",
        ".toml",
        ".ini",
        ".cfg",
        ".csv",
        ".log",
        ".html",
        ".css",
        ".xml",
        ".sh",
        ".c",
        ".h",
        ".cpp",
        ".rs",
        ".go",
        ".java",
        ".kt",
        ".lua",
        ".sql",
        ".tex",
    ]
)


@dataclass(frozen=True)
class _Block:
    text: str
    fence: str | None = None  # the opening fence line of a code block
    body: tuple[str, ...] = ()


def _is_fence(line: str) -> bool:
    stripped = line.strip()
    # "```x```" on one line is inline code, not a fence.
    return stripped.startswith(_FENCE) and _FENCE not in stripped[3:]


def _blocks(text: str) -> list[_Block]:
    """Paragraphs (split at blank lines) and whole code blocks (which may hold blank lines)."""
    lines = text.split("\n")
    blocks: list[_Block] = []
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            blocks.append(_Block("\n".join(paragraph)))
            paragraph.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        if _is_fence(line):
            flush()
            end = i + 1
            while end < len(lines) and not _is_fence(lines[end]):
                end += 1
            fence = line.strip()
            body = tuple(lines[i + 1 : end])
            blocks.append(_Block(_fenced(fence, body), fence, body))
            i = end + 1
        elif not line.strip():
            flush()
            i += 1
        else:
            paragraph.append(line)
            i += 1
    flush()
    return blocks


def _fenced(fence: str, body: Iterable[str]) -> str:
    inner = "\n".join(body)
    return f"{fence}\n{inner}{_CLOSE}" if inner else f"{fence}{_CLOSE}"


def _hard_cut(text: str, limit: int) -> list[str]:
    return [text[i : i + limit] for i in range(0, len(text), limit)]


def _pack(pieces: Iterable[str], sep: str, limit: int) -> list[str]:
    """Join pieces with `sep` greedily into chunks no longer than `limit`."""
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + len(sep) + len(piece) <= limit:
            current += sep + piece
        else:
            if current:
                chunks.append(current)
            current = piece
    if current:
        chunks.append(current)
    return chunks


def _split_prose(text: str, limit: int, level: int = 0) -> list[str]:
    if len(text) <= limit:
        return [text]
    if level >= len(_PROSE_SPLITS):
        return _hard_cut(text, limit)
    sep, pattern = _PROSE_SPLITS[level]
    parts = [part for part in pattern.split(text) if part]
    pieces: list[str] = []
    for part in parts:
        pieces.extend(_split_prose(part, limit, level + 1))
    return _pack(pieces, sep, limit)


def _split_code(block: _Block, limit: int) -> list[str]:
    """A code block too long for one message: cut at lines, close and reopen the fence."""
    assert block.fence is not None
    budget = max(1, limit - len(block.fence) - 1 - len(_CLOSE))
    lines: list[str] = []
    for line in block.body:
        lines.extend(_hard_cut(line, budget) if len(line) > budget else [line])
    return [_fenced(block.fence, [piece]) for piece in _pack(lines, "\n", budget)]


def split_message(text: str, limit: int = DISCORD_LIMIT) -> list[str]:
    """Cut a reply into messages of at most `limit` characters.

    Cuts fall between paragraphs where possible, then between lines, sentences and words; never
    inside a code block unless the block alone is too long, and then the fence is closed at the
    end of one message and reopened (with its language) at the start of the next.
    """
    pieces: list[str] = []
    for block in _blocks(text.strip()):
        if len(block.text) <= limit:
            pieces.append(block.text)
        elif block.fence is not None:
            pieces.extend(_split_code(block, limit))
        else:
            pieces.extend(_split_prose(block.text, limit))
    return _pack(pieces, "\n\n", limit)


_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")
_CHANNEL_MENTION = re.compile(r"<#(\d+)>")


def clean_text(
    content: str,
    *,
    bot_id: int | None,
    users: dict[int, str] | None = None,
    roles: dict[int, str] | None = None,
    channels: dict[int, str] | None = None,
) -> str:
    """The text the model sees: the bot's own mention removed, other mentions made readable."""
    users, roles, channels = users or {}, roles or {}, channels or {}

    def user(match: re.Match[str]) -> str:
        uid = int(match.group(1))
        return "" if uid == bot_id else "@" + users.get(uid, "someone")

    text = _USER_MENTION.sub(user, content)
    text = _ROLE_MENTION.sub(lambda m: "@" + roles.get(int(m.group(1)), "role"), text)
    text = _CHANNEL_MENTION.sub(lambda m: "#" + channels.get(int(m.group(1)), "channel"), text)
    return re.sub(r"[ \t]{2,}", " ", text).strip()


_CUSTOM_EMOJI = re.compile(r"<a?:\w+:\d+>")
_URL = re.compile(r"<?https?://\S+>?", re.IGNORECASE)
_CODE_BLOCK = re.compile(r"```.*?(```|$)", re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_ANY_MENTION = re.compile(r"<(@[!&]?|#)\d+>")


def trigger_text(content: str) -> str:
    """What a person reads, for matching persona names: custom emoji (`<:mimi:123>`), links,
    code and mentions are removed, so "mimi" in any of them does not call Mimi."""
    text = _CODE_BLOCK.sub(" ", content)
    text = _INLINE_CODE.sub(" ", text)
    text = _CUSTOM_EMOJI.sub(" ", text)
    text = _URL.sub(" ", text)
    text = _ANY_MENTION.sub(" ", text)
    return re.sub(r"\s+", " ", text).strip()


def is_text_attachment(filename: str, content_type: str | None) -> bool:
    if content_type and content_type.split(";")[0].strip().startswith("text/"):
        return True
    return PurePosixPath(filename.lower()).suffix in TEXT_SUFFIXES


def inline_attachment(name: str, data: bytes) -> str:
    """A text file as a fenced block the model can read; fences inside it are defused."""
    text = data.decode("utf-8", errors="replace").replace(_FENCE, "`\u200b``")
    return f'Attached file "{name}":\n{_FENCE}\n{text.rstrip()}\n{_FENCE}'


def with_attachments(text: str, inlined: list[str], skipped: list[str]) -> str:
    parts = [text] if text else []
    parts.extend(inlined)
    if skipped:
        parts.append("(Files not read: " + ", ".join(skipped) + ")")
    return "\n\n".join(parts)


class Throttle:
    """Allows an action at most once per `interval` seconds (the first at once)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: float | None = None

    def ready(self) -> bool:
        now = self._clock()
        if self._last is not None and now - self._last < self.interval:
            return False
        self._last = now
        return True


def rate_limited_notice(display_name: str) -> str:
    return rate_limited(display_name)  # the words of a persona's own limit too


CUT_OFF = "(I was cut off: I'm restarting. Please ask again in a minute.)"
