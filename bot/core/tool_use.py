"""The chat model's tools in a reply: when the model calls draw_image, the picture is drawn (one
per reply), the tool results go back to the model, and its reply goes on through the same
output screen. Mixed into the Engine (bot/core/engine.py), which provides `_opening` (a model's
notices, then its Answer) and `_stream` (an Answer's text through the output screen); the draw
tool itself is a `DrawingPort` (bot/images/draw_tool.py) that bot/app.py hands the engine.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from bot.brains import ChatRequest
from bot.brains.router import Answer
from bot.core.calls import CallContext
from bot.core.events import Delta, Event, Incoming, Notice, Picture
from bot.core.moderation import OutputScreen
from bot.core.personas import Persona
from bot.core.ports import DRAW_IMAGE, ONE_PER_REPLY, DrawingPort, Speaker, tool_messages
from bot.errors import BotError

log = logging.getLogger(__name__)


@dataclass
class Turn:
    """One reply as it goes through tool calls: the answer streaming now, the text so far,
    the pictures drawn for it (one at most)."""

    answer: Answer
    text: str
    pictures: list[Picture] = field(default_factory=list)
    drew: bool = False


class ToolUse:
    """The tool loop of a reply; the Engine provides what is declared here."""

    drawing: DrawingPort | None

    def _opening(
        self, request: ChatRequest, context: CallContext, fallback: str
    ) -> AsyncIterator[str | Answer]:
        raise NotImplementedError

    def _stream(
        self, answer: Answer, context: CallContext, screen: OutputScreen
    ) -> AsyncIterator[Event]:
        raise NotImplementedError

    async def _turn(
        self,
        incoming: Incoming,
        persona: Persona,
        context: CallContext,
        screen: OutputScreen,
        turn: Turn,
    ) -> AsyncIterator[Event]:
        """Stream the answer; when the model called draw_image, draw and let it finish."""
        answer = turn.answer
        async for event in self._stream(answer, context, screen):
            yield event
        turn.text = answer.text
        if screen.blocked is None and answer.tool_calls and answer.request.tools:
            async for event in self._use_tools(incoming, persona, context, screen, turn):
                yield event

    async def _use_tools(
        self,
        incoming: Incoming,
        persona: Persona,
        context: CallContext,
        screen: OutputScreen,
        turn: Turn,
    ) -> AsyncIterator[Event]:
        """Run the model's tool calls (one drawing at most), then continue the reply: a second
        chat with the tool results and no tools, streamed through the same output screen.
        `turn` ends up with the second Answer, the whole text and the picture."""
        answer = turn.answer
        results: list[str] = []
        async for item in self._tool_results(incoming, persona, answer, turn):
            if isinstance(item, Notice):
                yield item  # "Drawing…", the image service's queue and progress
            else:
                results.append(item)
        calls = answer.tool_calls
        messages = [*answer.request.messages, *tool_messages(answer.text, calls, results)]
        request = replace(answer.request, messages=messages, tools=())
        try:
            follow: Answer | None = None
            async for opened in self._opening(request, context, persona.fallback):
                if isinstance(opened, str):
                    yield Notice(opened, user_text=opened)
                else:
                    follow = opened
            assert follow is not None
            if follow.notice:
                log.warning("%s", follow.notice)
                yield Notice(follow.notice)
            if answer.text.strip():
                yield Delta("\n\n")
            async for event in self._stream(follow, context, screen):
                yield event
        except BotError:
            for picture in turn.pictures:  # drawn and paid for: posted all the same
                yield picture
            raise
        turn.answer = follow
        turn.text = f"{answer.text}\n\n{follow.text}" if answer.text.strip() else follow.text
        if not turn.text.strip() and turn.pictures:  # it drew and said nothing: the caption
            turn.text = turn.pictures[0].caption
            yield Delta(turn.text)

    async def _tool_results(
        self, incoming: Incoming, persona: Persona, answer: Answer, turn: Turn
    ) -> AsyncIterator[Notice | str]:
        """The drawing's progress as notices, and one tool message per call, in order."""
        speaker = Speaker(
            incoming.platform,
            incoming.conversation,
            incoming.author_id,
            incoming.guild,
            incoming.nsfw,
        )
        for call in answer.tool_calls:
            if call.name != DRAW_IMAGE or self.drawing is None:
                yield f"There is no tool called {call.name!r}."
            elif turn.drew:
                yield ONE_PER_REPLY
            else:
                turn.drew = True
                async for item in self.drawing.run(call, speaker, persona):
                    if isinstance(item, str):
                        yield Notice(item, user_text=item)
                        continue
                    if item.result is not None:
                        caption = f"{persona.display_name} drew “{item.prompt}”"
                        turn.pictures.append(
                            Picture(item.result.path, item.result.spoiler, caption)
                        )
                    yield item.reply
