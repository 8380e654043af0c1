"""Matrix replies: Markdown → sanitised HTML, message contents, and streaming with edits.

The model's text is Markdown; raw HTML in it is escaped (markdown-it with `html` off) and the
result is cleaned again by nh3 to the tags Matrix clients render, so no model output can
inject markup. A streamed reply is sent once and then replaced (`m.replace`) as the room's
pacer allows (bot/adapters/matrix/pacing.py); a whole reply is sent once at the end.
Transaction ids are derived from the answered event id, so a retried send never posts twice.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import nh3
from markdown_it import MarkdownIt

from bot.adapters.matrix.faces import PROFILE, Face, dress
from bot.adapters.matrix.pacing import Pacer
from bot.core.engine import Delta, Done, Event, Failed, Notice, Picture

log = logging.getLogger(__name__)

_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable(["strikethrough", "table"])
_TAGS = {
    "p", "br", "strong", "em", "b", "i", "u", "s", "del", "code", "pre", "blockquote",
    "ul", "ol", "li", "a", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
    "table", "thead", "tbody", "tr", "th", "td",
}  # fmt: skip
_ATTRIBUTES = {"a": {"href"}, "code": {"class"}, "ol": {"start"}}
_URL_SCHEMES = {"http", "https", "mailto", "matrix"}


def to_html(markdown: str) -> str:
    """Sanitised HTML for a Matrix `formatted_body`."""
    rendered = _MARKDOWN.render(markdown)
    return nh3.clean(rendered, tags=_TAGS, attributes=_ATTRIBUTES, url_schemes=_URL_SCHEMES).strip()


def message_content(text: str, msgtype: str) -> dict[str, Any]:
    return {
        "msgtype": msgtype,
        "body": text,
        "format": "org.matrix.custom.html",
        "formatted_body": to_html(text),
    }


def relation(reply_to: str, thread_root: str | None) -> dict[str, Any]:
    """`m.relates_to` for an answer to `reply_to`, inside its thread when there is one."""
    if thread_root is None:
        return {"m.in_reply_to": {"event_id": reply_to}}
    return {
        "rel_type": "m.thread",
        "event_id": thread_root,
        "is_falling_back": False,
        "m.in_reply_to": {"event_id": reply_to},
    }


def edit_content(
    original: str, text: str, msgtype: str, face: Face | None = None
) -> dict[str, Any]:
    """An `m.replace` edit; a cast member's profile and fallback go in `m.new_content`."""
    new = message_content(text, msgtype)
    shown = message_content(f"* {text}", msgtype)
    if face is not None:  # clients without edits show the top level: the fallback alone
        new = dress(new, face)
        shown = {**new, "body": f"* {new['body']}"}
        del shown[PROFILE]
    return {
        **shown,
        "m.new_content": new,
        "m.relates_to": {"rel_type": "m.replace", "event_id": original},
        "m.mentions": {},  # an edit pings nobody again
    }


def transaction_id(event_id: str, step: str) -> str:
    """Stable per answered event and step: a replayed send is deduplicated by the server."""
    digest = hashlib.sha256(f"{event_id}\0{step}".encode()).hexdigest()[:32]
    return f"pb-{digest}-{step}"


class Send(Protocol):
    """(content, txn id) → the sent event's id; a `droppable` edit may be skipped when limited."""

    async def __call__(
        self, content: dict[str, Any], txn: str, *, droppable: bool = False
    ) -> str | None: ...


Redact = Callable[[str, str], Awaitable[None]]  # (event id, txn id): take a message back
Attach = Callable[[Path, bool], Awaitable[list[str]]]  # (file, spoiler) → event ids sent


@dataclass
class ReplyTarget:
    event_id: str  # the message answered
    thread_root: str | None
    msgtype: str
    stream: bool
    max_edits: int = 8  # edits in progress per reply; the final text is always sent
    asker: str | None = None  # mentioned intentionally in the reply, as clients do for replies
    face: Face | None = None  # a cast member speaking under its own name (faces.py)

    def txn(self, step: str) -> str:
        """The step's transaction id; cast members answering one event each have their own."""
        if self.face is None:
            return transaction_id(self.event_id, step)
        return transaction_id(f"{self.event_id}\0{self.face.id}", step)

    def dressed(self, content: dict[str, Any]) -> dict[str, Any]:
        return content if self.face is None else dress(content, self.face)


class StreamedReply:
    """Renders the engine's events into one Matrix message (edited while it grows).

    Edits in progress follow the room's `Pacer` (shared with the room's other replies) and
    stop after `max_edits`; the final text waits only for a `retry_after_ms` the server named.
    A reply the guard withholds after part of it was shown is redacted, the original and every
    edit, and then the notice is posted.
    """

    def __init__(
        self,
        target: ReplyTarget,
        send: Send,
        pacer: Pacer,
        *,
        attach: Attach | None = None,
        redact: Redact | None = None,
    ) -> None:
        self.target = target
        self._send = send
        self._pacer = pacer
        self._attach = attach  # uploads a picture the model drew (the /imagine upload)
        self._redact = redact
        self.files: list[str] = []  # event ids of the pictures sent
        self.shown_events: list[str] = []  # the reply message and its edits, oldest first
        self.answered: str | None = None  # the whole reply, once the engine gave it
        self._text = ""
        self._shown = ""
        self._sent_id: str | None = None
        self._edits = 0

    @property
    def event_id(self) -> str | None:
        return self._sent_id

    async def render(self, events: AsyncIterator[Event]) -> str | None:
        """Consume the events; returns the id of the reply message (None if nothing was sent)."""
        async for event in events:
            if isinstance(event, Notice):
                log.info("engine notice for %s: %s", self.target.event_id, event.text)
                if event.user_text and not self._text.strip():
                    self._edits += 1
                    await self._show(f"*{event.user_text}*", step=f"notice{self._edits}")
            elif isinstance(event, Delta):
                self._text += event.text
                if self.target.stream:
                    await self._progress()
            elif isinstance(event, Done):
                await self._pacer.ready()
                await self._show(event.text, step="final")
                self.answered = event.text
            elif isinstance(event, Picture) and self._attach is not None:
                self.files += await self._attach(event.path, event.spoiler)
            elif isinstance(event, Failed):
                if event.retract:
                    await self._retract()
                await self._failed(event.text)
        return self._sent_id

    async def _progress(self) -> None:
        text = self._text.strip()
        if not text:
            return
        if self._sent_id is None:
            await self._show(text, step="first")
        elif self._edits < self.target.max_edits and self._pacer.edit_due():
            self._edits += 1
            await self._show(text, step=f"edit{self._edits}", droppable=True)

    async def _show(self, text: str, *, step: str, droppable: bool = False) -> None:
        if text == self._shown:
            return
        txn = self.target.txn(step)
        if self._sent_id is None:
            content = self.target.dressed(message_content(text, self.target.msgtype))
            content["m.relates_to"] = relation(self.target.event_id, self.target.thread_root)
            content["m.mentions"] = {"user_ids": [self.target.asker]} if self.target.asker else {}
            self._sent_id = await self._send(content, txn)
            sent = self._sent_id
        else:
            content = edit_content(self._sent_id, text, self.target.msgtype, self.target.face)
            sent = await self._send(content, txn, droppable=droppable)
        self._pacer.edited()
        if sent is not None:
            self.shown_events.append(sent)
            self._shown = text

    async def _retract(self) -> None:
        """Take back what was shown: redact the edits and the original, newest first."""
        self._text = ""
        if self._redact is None or not self.shown_events:
            return
        for number, event_id in enumerate(reversed(self.shown_events)):
            await self._redact(event_id, self.target.txn(f"redact{number}"))
        self.shown_events.clear()
        self._sent_id, self._shown = None, ""

    async def _failed(self, message: str) -> None:
        partial = self._text.strip()
        if self._sent_id is not None and partial:
            await self._show(f"{partial}\n\n*({message})*", step="failed")
            return
        if self._sent_id is not None:  # a notice is showing: replace it
            await self._show(message, step="failed")
            return
        content = self.target.dressed(message_content(message, "m.notice"))
        content["m.relates_to"] = relation(self.target.event_id, self.target.thread_root)
        self._sent_id = await self._send(content, self.target.txn("failed"))
