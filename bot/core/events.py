"""What goes into the engine (`Incoming`) and what comes out of it (the events adapters render).

`Notice` (say it quietly: stderr, an ephemeral note; `user_text` is what chat users may see),
`Delta` (reply text so far grows), `Done` (the whole reply and who answered), `Failed` (a plain
sentence for the user) and last a `Picture` when the model drew one (bot/images/draw_tool.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bot.core.personas import Persona


def user_key(platform: str, user_id: str) -> str:
    """Who someone is across the bot: memories, seeds, budgets and rate limits are keyed by it."""
    return f"{platform}:{user_id}"


@dataclass(frozen=True)
class Incoming:
    platform: str
    conversation: str
    author_id: str
    author_name: str
    text: str
    addressed: bool = True
    guild: str | None = None  # Discord guild or Matrix server, for per-guild policy and budgets
    nsfw: bool = False  # the channel is marked NSFW (the guard may relax S12 for some personas)
    message_id: str | None = None  # the platform's id of the message, to honour its deletion
    # A cast (issue 21): which cast member answers (None: the conversation's persona), and
    # when the message is another cast member's reply, that persona's name (bot/core/cast.py).
    persona: str | None = None
    from_persona: str | None = None
    repeat: bool = False  # another cast member already answered (and stored) this message

    @property
    def user_key(self) -> str:
        return user_key(self.platform, self.author_id)


@dataclass(frozen=True)
class Notice:
    """Something to say beside the reply. `text` is for the operator (it may name hosts);
    `user_text`, when set, is safe to show anyone in a chat (e.g. "waking up…")."""

    text: str
    user_text: str | None = None


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    text: str
    persona: Persona
    answered_by: str


@dataclass(frozen=True)
class Failed:
    text: str
    retract: bool = False  # take back the text shown so far (e.g. the guard blocked it)


@dataclass(frozen=True)
class Picture:
    """A picture the model drew for this reply (draw_image): a file to post after the reply
    (behind a spoiler when `spoiler`); `caption` says what it shows."""

    path: Path
    spoiler: bool
    caption: str


Event = Notice | Delta | Done | Failed | Picture
