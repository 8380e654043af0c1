"""The `draw_image` tool: the chat model draws on its own, through Ollama tool calling.

Offered in the chat request when pictures are set up (FAL_KEY) and the persona allows it
(`draw: true`); the local CPU model is never offered tools. A call runs the image service
exactly as `/imagine` does (rate limit, monthly cap, the guard's check of the prompt, the
ledger's reservation, settlement or release, the record in `images`, the file), for the member
who spoke, in their conversation. The model then gets a tool message saying the picture was
drawn, or the plain reason it was not, and finishes its reply (engine.py). One picture per reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from bot.brains.base import ToolCall
from bot.core.personas import Persona
from bot.core.ports import DRAW_IMAGE, Speaker
from bot.errors import BotError, user_message
from bot.images.presets import MAX_PROMPT_CHARS, SIZES
from bot.images.service import ImageRequest, ImageResult, ImageService

log = logging.getLogger(__name__)

DRAW_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": DRAW_IMAGE,
        "description": (
            "Draw a picture, which is posted with your reply. Use it when someone asks you to "
            "draw, paint or show them something. Describe what to draw; your own art style is "
            "added for you."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "prompt": {
                    "type": "string",
                    "description": "what the picture shows: subject, setting, mood, colours",
                },
                "size": {
                    "type": "string",
                    "enum": list(SIZES),
                    "description": "the picture's shape (default square)",
                },
            },
            "required": ["prompt"],
        },
    },
}
DRAWING = "Drawing…"


@dataclass(frozen=True)
class Drawing:
    """What a call did: the tool message for the model, and the picture when one was drawn."""

    reply: str
    prompt: str
    result: ImageResult | None = None


class DrawTool:
    def __init__(self, images: ImageService) -> None:
        self.images = images

    def tools(self, persona: Persona) -> tuple[dict[str, Any], ...]:
        """The tools to offer this persona's model: draw_image, or none."""
        return (DRAW_TOOL,) if persona.draw and self.images.configured else ()

    async def run(
        self, call: ToolCall, speaker: Speaker, persona: Persona
    ) -> AsyncIterator[str | Drawing]:
        """Progress lines while the picture is drawn, then the `Drawing` last."""
        prompt, size, problem = _arguments(call.arguments)
        if problem is not None:
            yield Drawing(f"Not drawn: {problem}", prompt)
            return
        reports: asyncio.Queue[str] = asyncio.Queue()

        async def progress(text: str) -> None:
            reports.put_nowait(text)

        request = ImageRequest(
            platform=speaker.platform,
            conversation=speaker.conversation,
            author_id=speaker.author_id,
            prompt=prompt,
            persona=persona,
            size=size,
            nsfw_allowed=speaker.nsfw,
            guild=speaker.guild,
            progress=progress,
        )
        yield DRAWING
        task = asyncio.create_task(self.images.generate(request))
        try:
            while not task.done():
                getter = asyncio.ensure_future(reports.get())
                try:
                    await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not getter.done():
                        getter.cancel()
                if getter.done() and not getter.cancelled():
                    yield getter.result()
            while not reports.empty():
                yield reports.get_nowait()
            try:
                result = task.result()
            except BotError as exc:
                log.info("draw_image for %s not drawn: %s", request.user_key, exc)
                yield Drawing(f"Not drawn: {user_message(exc)}", prompt)
                return
            except Exception as exc:
                log.exception("draw_image for %s failed unexpectedly", request.user_key)
                yield Drawing(f"Not drawn: {user_message(exc)}", prompt)
                return
            yield Drawing(
                "Drawn: the picture is posted with your reply. Tell them about it briefly; "
                "do not write a link or a file name.",
                prompt,
                result,
            )
        finally:
            if not task.done():  # the reply was abandoned: the service releases what it reserved
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


def _arguments(arguments: dict[str, Any]) -> tuple[str, str, str | None]:
    """(prompt, size, what is wrong with them or None), from the model's arguments."""
    prompt = arguments.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return "", "square", "the prompt was empty; say what to draw."
    prompt = " ".join(prompt.split())
    if len(prompt) > MAX_PROMPT_CHARS:
        return prompt, "square", f"the prompt was over {MAX_PROMPT_CHARS} characters."
    size = arguments.get("size")
    size = size.strip().lower() if isinstance(size, str) and size.strip() else "square"
    return prompt, size if size in SIZES else "square", None
