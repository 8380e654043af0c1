"""Matrix replies: Markdown → sanitised HTML, message contents, and streaming with edits.

The model's text is Markdown; raw HTML in it is escaped (markdown-it with `html` off) and the
result is cleaned again by nh3 to the tags Matrix clients render, so no model output can
inject markup. A streamed reply is sent once and then replaced (`m.replace`) at most once per
`edit_interval` seconds; a whole reply is sent once at the end. Transaction ids are derived
from the answered event id, so a retried send can never post a second copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nh3
from markdown_it import MarkdownIt

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


def edit_content(original: str, text: str, msgtype: str) -> dict[str, Any]:
    new = message_content(text, msgtype)
    return {
        **message_content(f"* {text}", msgtype),
        "m.new_content": new,
        "m.relates_to": {"rel_type": "m.replace", "event_id": original},
        "m.mentions": {},  # an edit pings nobody again
    }


def transaction_id(event_id: str, step: str) -> str:
    """Stable per answered event and step: a replayed send is deduplicated by the server."""
    digest = hashlib.sha256(f"{event_id}\0{step}".encode()).hexdigest()[:32]
    return f"pb-{digest}-{step}"


Send = Callable[[dict[str, Any], str], Awaitable[str | None]]  # (content, txn id) → event id
Attach = Callable[[Path, bool], Awaitable[list[str]]]  # (file, spoiler) → event ids sent


@dataclass
class ReplyTarget:
    event_id: str  # the message answered
    thread_root: str | None
    msgtype: str
    stream: bool
    edit_interval: float
    asker: str | None = None  # mentioned intentionally in the reply, as clients do for replies


class StreamedReply:
    """Renders the engine's events into one Matrix message (edited while it grows)."""

    def __init__(
        self,
        target: ReplyTarget,
        send: Send,
        clock: Callable[[], float] = time.monotonic,
        *,
        attach: Attach | None = None,
    ) -> None:
        self.target = target
        self._send = send
        self._attach = attach  # uploads a picture the model drew (the /imagine upload)
        self.files: list[str] = []  # event ids of the pictures sent
        self._clock = clock
        self._text = ""
        self._shown = ""
        self._sent_id: str | None = None
        self._last_edit = 0.0
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
                await self._pace()
                await self._show(event.text, step="final")
            elif isinstance(event, Picture) and self._attach is not None:
                self.files += await self._attach(event.path, event.spoiler)
            elif isinstance(event, Failed):
                if event.retract:
                    self._text = ""  # the guard withheld what was shown: edit it away
                await self._failed(event.text)
        return self._sent_id

    async def _progress(self) -> None:
        text = self._text.strip()
        if not text:
            return
        if self._sent_id is None:
            await self._show(text, step="first")
        elif self._clock() - self._last_edit >= self.target.edit_interval:
            self._edits += 1
            await self._show(text, step=f"edit{self._edits}")

    async def _pace(self) -> None:
        """Before the last edit: keep edits at most one per `edit_interval`."""
        if self._sent_id is not None and self._text.strip() != self._shown:
            wait = self.target.edit_interval - (self._clock() - self._last_edit)
            if wait > 0:
                await asyncio.sleep(wait)

    async def _show(self, text: str, *, step: str) -> None:
        if text == self._shown:
            return
        txn = transaction_id(self.target.event_id, step)
        if self._sent_id is None:
            content = message_content(text, self.target.msgtype)
            content["m.relates_to"] = relation(self.target.event_id, self.target.thread_root)
            content["m.mentions"] = {"user_ids": [self.target.asker]} if self.target.asker else {}
            self._sent_id = await self._send(content, txn)
        else:
            await self._send(edit_content(self._sent_id, text, self.target.msgtype), txn)
        self._shown = text
        self._last_edit = self._clock()

    async def _failed(self, message: str) -> None:
        partial = self._text.strip()
        if self._sent_id is not None and partial:
            await self._show(f"{partial}\n\n*({message})*", step="failed")
            return
        if self._sent_id is not None:  # a notice or a retracted reply is showing: replace it
            await self._show(message, step="failed")
            return
        content = message_content(message, "m.notice")
        content["m.relates_to"] = relation(self.target.event_id, self.target.thread_root)
        self._sent_id = await self._send(content, transaction_id(self.target.event_id, "failed"))
