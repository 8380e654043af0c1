"""Moderation in the reply pipeline: when the engine asks the guard, and what it shows.

- The input check starts as soon as the persona is known. `gated()` runs the engine's work
  (history, recall, prompt, opening the model) alongside it and releases nothing of it before
  the verdict; a blocked input stops the work and closes the model's stream.
- `OutputScreen` holds the reply back until the guard has seen it: whole (the default), or
  paragraph by paragraph (`GUARD_STREAM_MODE=paragraph`). Each check judges the new text as the
  Agent's answer to the user's message, after the last few paragraphs of the reply so far, so
  a check costs the same at the end of a long reply as at its start.
- The in-character refusal (prompts/refusal.j2) and the notices users see.

The guard itself (the model call, the policy, the records) is `bot/safety/guard.py`, handed to
`Moderation` by bot/app.py (bot/safety/moderation.py builds it); the core knows it only as a
`GuardPort`, so it never imports the safety package.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import jinja2

from bot.core.categories import category_name, describe
from bot.core.personas import Persona
from bot.core.verdicts import UNCHECKED, Kind, Verdict, Where

log = logging.getLogger(__name__)

T = TypeVar("T")
StreamMode = Literal["whole", "paragraph"]

UNMODERATED = "Llama Guard could not be reached: this reply is not moderated."
INPUT_UNCHECKED = (
    "I can't check messages for safety right now, so I'm not answering. "
    "Please try again in a moment."
)
OUTPUT_UNCHECKED = (
    "I couldn't check my reply for safety, so I'm not showing it. Please try again in a moment."
)
# The guard answered, but not with a verdict (a wrong tag, a model that answered prose).
UNMODERATED_NO_VERDICT = "The safety check gave no verdict: this reply is not moderated."
INPUT_NO_VERDICT = (
    "The safety check gave no verdict on your message, so I'm not answering. "
    "Please try again in a moment."
)
OUTPUT_NO_VERDICT = (
    "The safety check gave no verdict on my reply, so I'm not showing it. "
    "Please try again in a moment."
)


def input_unchecked(verdict: Verdict) -> str:
    """Why an input was not answered when the guard gave no verdict on it."""
    return INPUT_NO_VERDICT if verdict.no_verdict else INPUT_UNCHECKED


def unmoderated(*verdicts: Verdict | None) -> str:
    """The notice for a reply let through unchecked (fail policy open)."""
    if any(v is not None and v.unmoderated and v.no_verdict for v in verdicts):
        return UNMODERATED_NO_VERDICT
    return UNMODERATED


class GuardPort(Protocol):
    """What moderation needs of the guard (bot/safety/guard.py's `Guard`)."""

    @property
    def enabled(self) -> bool: ...

    async def judge(self, kind: Kind, text: str, *, persona: Persona, where: Where) -> Verdict: ...

    async def judge_reply(
        self, message: str, before: str, text: str, *, persona: Persona, where: Where
    ) -> Verdict: ...

    async def drain(self) -> None: ...

    async def aclose(self) -> None: ...


_PARAGRAPH_BREAK = "\n\n"
_END = object()


def withheld(persona: Persona, verdict: Verdict) -> str:
    """The notice that replaces a reply that was not shown."""
    if verdict.unknown:
        return OUTPUT_NO_VERDICT if verdict.no_verdict else OUTPUT_UNCHECKED
    return (
        f"{persona.display_name}'s reply was withheld: it broke the content rules here "
        f"({describe(verdict.blocking)})."
    )


async def gated(
    check: Awaitable[Verdict], work: AsyncIterator[T], discard: Callable[[T], Awaitable[None]]
) -> AsyncGenerator[Verdict | T, None]:
    """The input verdict first, then the items of `work`, which runs alongside the check.

    Nothing `work` yields is released before the verdict: what came early is held, then the
    rest is passed on as it comes, and `work`'s error is raised. When the input may not go
    on, only the verdict comes out: `work` is stopped and what it had made goes to `discard`.
    Close this generator (`contextlib.aclosing`) when leaving it early.
    """
    queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in work:
                queue.put_nowait((item, None))
        except Exception as exc:
            queue.put_nowait((_END, exc))
        else:
            queue.put_nowait((_END, None))

    pumping = asyncio.ensure_future(pump())
    try:
        verdict = await check
        yield verdict
        if not verdict.safe:
            return
        while True:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        pumping.cancel()
        await asyncio.gather(pumping, return_exceptions=True)
        while not queue.empty():
            item, _error = queue.get_nowait()
            if item is not _END:
                await discard(item)


class OutputScreen:
    """Releases a reply's text only after the guard has passed it."""

    def __init__(
        self, check: Callable[[str, str], Awaitable[Verdict]], mode: StreamMode | None
    ) -> None:
        self._check = check  # (reply so far, new text) → verdict on the new text
        self._mode = mode
        self.shown = ""  # text already released
        self.blocked: Verdict | None = None  # the verdict that stopped the reply
        self.unmoderated = False  # some of it went out unchecked (fail policy open)
        self.unchecked: Verdict | None = None  # the verdict it went out under, if so

    async def release(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """The checked text: once whole, or a paragraph at a time; stops at a block.

        With no mode (no guard) every piece goes out as it comes."""
        held = ""
        async for piece in chunks:
            if self._mode is None:
                self.shown += piece
                yield piece
                continue
            held += piece
            # each whole paragraph checked on its own, however many one piece completed (the
            # model's stream may bring several at once)
            while self._mode == "paragraph" and (cut := held.find(_PARAGRAPH_BREAK)) >= 0:
                cut += len(_PARAGRAPH_BREAK)
                ready, held = held[:cut], held[cut:]
                if not await self._passes(ready):
                    return
                yield ready
        if held and await self._passes(held):
            yield held

    async def _passes(self, text: str) -> bool:
        if text.strip():
            verdict = await self._check(self.shown, text)
            if verdict.unmoderated:
                self.unmoderated, self.unchecked = True, verdict
            if not verdict.safe:
                self.blocked = verdict
                return False
        self.shown += text
        return True


class Moderation:
    """What the engine holds: the guard (None or disabled: everything passes unchecked)."""

    def __init__(
        self,
        guard: GuardPort | None = None,
        *,
        prompts_dir: Path | None = None,
        stream_mode: StreamMode = "whole",
    ) -> None:
        self.guard = guard
        self.stream_mode = stream_mode
        self._templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(prompts_dir) if prompts_dir else None,
            undefined=jinja2.StrictUndefined,
            autoescape=False,  # noqa: S701 - plain chat text, never HTML
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=True,
        )

    @property
    def active(self) -> bool:
        return self.guard is not None and self.guard.enabled

    def check_input(self, text: str, persona: Persona, where: Where) -> asyncio.Future[Verdict]:
        """Start the input check now; await the result when it is needed."""
        if self.guard is None or not self.guard.enabled:
            done: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
            done.set_result(UNCHECKED)
            return done
        return asyncio.ensure_future(self.guard.judge("input", text, persona=persona, where=where))

    def output_screen(self, persona: Persona, where: Where, message: str) -> OutputScreen:
        """The screen for a reply to `message` (the user's words it answers)."""
        guard = self.guard

        async def check(before: str, text: str) -> Verdict:
            if guard is None:
                return UNCHECKED
            return await guard.judge_reply(message, before, text, persona=persona, where=where)

        return OutputScreen(check, self.stream_mode if self.active else None)

    def refusal(self, persona: Persona, verdict: Verdict, speaker: str) -> str:
        """The persona's in-character answer to a blocked message (prompts/refusal.j2)."""
        categories = [{"code": c, "name": category_name(c)} for c in verdict.blocking]
        try:
            template = self._templates.get_template("refusal.j2")
            text = template.render(persona=persona, speaker=speaker, categories=categories)
        except jinja2.TemplateError:
            log.exception("prompts/refusal.j2 could not be rendered; using the plain refusal")
            text = ""
        return text.strip() or f"{persona.display_name} would rather not talk about that."

    async def drain(self) -> None:
        if self.guard is not None:
            await self.guard.drain()

    async def aclose(self) -> None:
        if self.guard is not None:
            await self.guard.aclose()
