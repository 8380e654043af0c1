"""The reply pipeline every platform shares.

    Incoming → persona for the conversation → history → prompt → model (streamed) → events

Adapters turn platform events into `Incoming` and render the events `handle()` yields:
`Notice` (say it quietly: stderr, an ephemeral note), `Delta` (reply text so far grows),
`Done` (the whole reply and who answered) or `Failed` (a plain sentence for the user), and
last a `Picture` when the model drew one with the draw_image tool (bot/images/draw_tool.py).
Conversations never wait on each other; within one conversation messages are answered in order.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass

from bot.brains import BrainRouter, CallStats, ChatRequest
from bot.brains.local import LocalBrain
from bot.brains.router import Answer, NoBackend
from bot.core.background import Background, Quiet
from bot.core.calls import CallContext, CallLog
from bot.core.cast import cast_for, view_for
from bot.core.categories import describe
from bot.core.events import Delta, Done, Event, Failed, Incoming, Notice, Picture
from bot.core.history import Conversation, History
from bot.core.locks import ConversationLocks
from bot.core.metrics import Metrics, ReplyTimer
from bot.core.moderation import (
    Moderation,
    OutputScreen,
    gated,
    input_unchecked,
    unmoderated,
    withheld,
)
from bot.core.persona_files import PersonaRegistry
from bot.core.personas import Persona
from bot.core.ports import (
    DrawingPort,
    EarlyEmbedding,
    MemoryPort,
    RatePort,
    rate_limited,
)
from bot.core.prompts import PromptBuilder, lay_out, user_seed
from bot.core.prompts import Turn as HistoryTurn
from bot.core.recollection import Recollection
from bot.core.tool_use import ToolUse, Turn
from bot.core.verdicts import UNCHECKED, Verdict, Where
from bot.errors import BotError, ModelError, user_message

__all__ = ["Delta", "Done", "Engine", "Event", "Failed", "Incoming", "Notice", "Picture"]

log = logging.getLogger(__name__)

_PERSONAS_SEEN = 10_000  # conversations whose persona is remembered (the least recent go)


class Engine(ToolUse):
    def __init__(
        self,
        *,
        personas: PersonaRegistry,
        prompts: PromptBuilder,
        history: History,
        router: BrainRouter,
        calls: CallLog,
        default_persona: str | None = None,
        metrics: Metrics | None = None,
        memory: MemoryPort | None = None,
        moderation: Moderation | None = None,
    ) -> None:
        self.personas = personas
        self.prompts = prompts
        self.history = history
        self.router = router
        self.calls = calls
        self.default_persona = default_persona
        self._locks = ConversationLocks()
        self._background = Background("background work")
        self.quiet = Quiet()  # replies in flight, for work that waits for them (memory)
        self.metrics = metrics or Metrics()
        self.recollection = Recollection(memory, history, self.spawn, self.persona_named)
        self.moderation = moderation or Moderation()  # Llama Guard (issue 4); none: unchecked
        self.drawing: DrawingPort | None = None  # the draw_image tool (issue 8), set by the app
        self.rates: RatePort | None = None  # personas' own rate limits (issue 21), by the app
        # conversation -> its persona when last read here (None: the default): which persona
        # the next message will likely meet, before its conversation is read
        self._personas_seen: OrderedDict[tuple[str, str], str | None] = OrderedDict()

    def persona_named(self, name: str | None) -> Persona:
        found = self.personas.find(name) if name else None
        return found or self.personas.default(self.default_persona)

    async def conversation(self, platform: str, external_id: str) -> Conversation:
        return await self.history.conversation(platform, external_id)

    async def cast_for(self, platform: str, external_id: str) -> list[Persona]:
        """The conversation's cast of personas (bot/core/cast.py); one persona is a cast of one."""
        conversation = await self.history.conversation(platform, external_id)
        return await cast_for(self.history, self.persona_named, conversation)

    def _display(self, name: str) -> str:
        found = self.personas.find(name)
        return found.display_name if found is not None else name

    async def persona_for(self, platform: str, external_id: str) -> Persona:
        conversation = await self.history.conversation(platform, external_id)
        return self.persona_named(conversation.persona)

    async def handle(self, incoming: Incoming) -> AsyncGenerator[Event, None]:
        """Answer one message; yields events for the adapter to render."""
        if not incoming.addressed or not incoming.text.strip():
            return
        with self.quiet.busy():  # from the wait for the conversation's turn
            held = await self._locks((incoming.platform, incoming.conversation))
            timer = ReplyTimer(self.metrics, incoming.platform)
            try:
                async for event in self._answer(incoming):
                    if isinstance(event, Delta):
                        timer.first_piece()
                    elif isinstance(event, Done | Failed):
                        timer.outcome = "done" if isinstance(event, Done) else "failed"
                    yield event
            except BotError as exc:
                log.warning("reply to %s failed: %s", incoming.user_key, exc)
                timer.outcome = "failed"
                yield Failed(user_message(exc))
            except Exception:
                log.exception("reply to %s failed unexpectedly", incoming.user_key)
                timer.outcome = "failed"
                yield Failed(user_message(Exception()))
            finally:
                held.release()
                timer.finish()

    async def _answer(self, incoming: Incoming) -> AsyncIterator[Event]:
        # the message's embedding for recall runs while the conversation is read, when the
        # persona the conversation had when last read here recalls and the speaker has
        # memories where it looks; its calls are recorded whatever becomes of the reply
        seen = (incoming.platform, incoming.conversation)
        guess = self._persona_guess(incoming)
        early = self.recollection.embed_early(incoming, guess) if guess is not None else None
        conversation, persona = None, guess
        try:
            conversation, turns = await self.history.opening(*seen)
            persona = self.persona_named(incoming.persona or conversation.persona)
            self._personas_seen[seen] = conversation.persona
            self._personas_seen.move_to_end(seen)
            if len(self._personas_seen) > _PERSONAS_SEEN:
                self._personas_seen.popitem(last=False)
            answering = self._answer_with(incoming, conversation, turns, persona, early)
            async with contextlib.aclosing(answering) as events:
                async for event in events:
                    yield event
        finally:
            if early is not None and persona is not None:  # an early embedding had a guess
                self.recollection.settle_early(early, incoming, conversation, persona)

    def _persona_guess(self, incoming: Incoming) -> Persona | None:
        """The persona that will most likely answer, before the conversation is read: the
        one named, or the one the conversation had when last read here; None when unseen."""
        if incoming.persona:
            return self.persona_named(incoming.persona)
        key = (incoming.platform, incoming.conversation)
        if key not in self._personas_seen:
            return None
        return self.persona_named(self._personas_seen[key])

    async def _answer_with(
        self,
        incoming: Incoming,
        conversation: Conversation,
        turns: list[HistoryTurn],
        persona: Persona,
        early: EarlyEmbedding | None,
    ) -> AsyncGenerator[Event, None]:
        where = Where(
            incoming.platform,
            incoming.conversation,
            conversation.id,
            incoming.user_key,
            incoming.nsfw,
        )
        verdict, opened = UNCHECKED, None
        checked = self._checked_open(incoming, conversation, turns, persona, where, early=early)
        async with contextlib.aclosing(checked) as items:
            async for item in items:
                if isinstance(item, _Opened):
                    opened = item
                elif isinstance(item, Verdict):
                    verdict = item
                else:
                    yield item
        if opened is None:
            return  # the input was refused: the events above said so
        answer, context = opened.answer, opened.context
        if answer.notice:
            log.warning("%s", answer.notice)
            yield Notice(answer.notice, user_text=_fallback_words(answer))
        screen = self.moderation.output_screen(persona, where, incoming.text)
        turn = Turn(answer, "")
        async for event in self._turn(incoming, persona, context, screen, turn):
            yield event
        answer, pictures = turn.answer, turn.pictures
        if screen.blocked is not None:  # not shown; nothing enters history or memory
            yield Failed(withheld(persona, screen.blocked), retract=bool(screen.shown))
            for picture in pictures:  # checked and paid for on its own: posted all the same
                yield picture
            return
        if verdict.unmoderated or screen.unmoderated:
            yield Notice(unmoderated(verdict, screen.unchecked))
        reply = turn.text.strip()
        if not reply:
            yield Failed(f"{persona.display_name} drew a blank. Try saying that another way?")
            return
        message_row = await self.history.append_exchange(
            conversation.id,
            author_id=incoming.author_id,
            author_name=incoming.author_name,
            text=incoming.text,
            persona=persona.name,
            reply=reply,
            message_id=incoming.message_id,
            heard=incoming.from_persona is None and not incoming.repeat,
        )
        self.recollection.remember(incoming, conversation, persona, reply, message_row)
        log.info("%s answered %s with %s", persona.name, incoming.user_key, answer.label)
        yield Done(reply, persona, answer.label)
        for picture in pictures:
            yield picture

    async def _within_rate(self, incoming: Incoming, persona: Persona) -> bool:
        """The persona's own rate per member (`rate_limit_per_minute`), before anything is
        written or asked; another persona's words are not a member's message."""
        if self.rates is None or not persona.rate_limit_per_minute or incoming.from_persona:
            return True
        key = f"persona:{persona.name}:{incoming.user_key}"
        rate, burst = persona.rate_limit_per_minute, persona.rate_limit_burst
        return await self.rates.allow(key, rate, burst)

    async def _checked_open(
        self,
        incoming: Incoming,
        conversation: Conversation,
        turns: list[HistoryTurn],
        persona: Persona,
        where: Where,
        *,
        early: EarlyEmbedding | None = None,
    ) -> AsyncGenerator[Event | Verdict | _Opened, None]:
        """Open the model while the input check runs; nothing is shown before its verdict.

        Yields the verdict, then notices and the opened answer; for a refused input only the
        refusal (in character) or, when the guard gave no verdict, a notice; for a member over
        the persona's own rate, only that (nothing is checked, asked or written).
        """
        if not await self._within_rate(incoming, persona):
            yield Failed(rate_limited(persona.display_name))
            return
        check = self.moderation.check_input(incoming.text, persona, where)
        work = self._open(incoming, conversation, turns, persona, early=early)
        async with contextlib.aclosing(gated(check, work, self._discard)) as items:
            async for item in items:
                if isinstance(item, str):
                    yield Notice(item, user_text=item)  # "waking up…", while a backend wakes
                elif isinstance(item, Verdict) and not item.safe:
                    if item.unknown:
                        yield Failed(input_unchecked(item))
                        return
                    refusal = self.moderation.refusal(persona, item, incoming.author_name)
                    yield Delta(refusal)
                    yield Done(refusal, persona, f"a refusal ({describe(item.blocking)})")
                    return
                else:
                    yield item

    async def _open(
        self,
        incoming: Incoming,
        conversation: Conversation,
        turns: list[HistoryTurn],
        persona: Persona,
        *,
        early: EarlyEmbedding | None = None,
    ) -> AsyncIterator[str | _Opened]:
        """Recall and the prompt, then the model's first token; notices on the way. The budget's
        degrade ladder is asked first and read while recall runs (left to finish when no
        request follows: a check may be sending the admins its alert)."""
        level = self.router.level_check(persona.name)
        request = await self._request(incoming, conversation, turns, persona, early=early)
        context = CallContext(incoming.platform, conversation.id, incoming.user_key, persona.name)
        async for item in self._opening(request, context, persona.fallback, level):
            yield item if isinstance(item, str) else _Opened(item, context)

    async def _opening(
        self,
        request: ChatRequest,
        context: CallContext,
        fallback: str,
        level: Awaitable[int] | None = None,
    ) -> AsyncIterator[str | Answer]:
        """The router's notices, then the Answer; failed backends are recorded."""
        answer: Answer | None = None
        try:
            opening = self.router.opening(
                request, fallback=fallback, persona=context.persona, level=level
            )
            async for item in opening:
                if isinstance(item, str):
                    yield item
                else:
                    answer = item
        except NoBackend as exc:
            for failure in exc.failures:
                self._record(context, request, failure.backend, None, failure.reason)
            raise
        if answer is None:
            raise NoBackend([])
        for failure in answer.failures:
            self._record(context, request, failure.backend, None, failure.reason)
        yield answer

    async def _discard(self, item: Verdict | str | _Opened) -> None:
        """A model opened for an input the guard refused: stop it, record why."""
        if isinstance(item, _Opened):
            answer = item.answer
            await answer.aclose()
            reason = "stopped: the guard refused its input"
            stats = _estimate(answer)  # a per-token API bills the prompt it read all the same
            self._record(item.context, answer.request, answer.brain.name, stats, reason)

    async def _stream(
        self, answer: Answer, context: CallContext, screen: OutputScreen
    ) -> AsyncIterator[Event]:
        try:
            async for text in screen.release(answer.chunks()):
                yield Delta(text)
        except ModelError as exc:
            stats = answer.stats or _estimate(answer)
            self._record(context, answer.request, answer.brain.name, stats, str(exc))
            raise
        if screen.blocked is not None:
            await answer.aclose()
        self._record(
            context, answer.request, answer.brain.name, answer.stats or _estimate(answer), None
        )

    async def _request(
        self,
        incoming: Incoming,
        conversation: Conversation,
        turns: list[HistoryTurn],
        persona: Persona,
        *,
        early: EarlyEmbedding | None = None,
    ) -> ChatRequest:
        """The prompt: the history read with the conversation (`History.opening`), the
        speaker's recalled facts (their embedding perhaps started early)."""
        memories = await self.recollection.recall(incoming, conversation, persona, early)
        shown = view_for(
            persona,
            turns,
            self._display,
            heard_from=incoming.from_persona,
            repeat_of=incoming.text if incoming.repeat else None,
        )
        messages, moved = lay_out(
            self.prompts,
            persona,
            speaker=incoming.author_name,
            text=incoming.text,
            turns=shown,
            memories=memories,
            start=conversation.history_from,
        )
        if moved is not None:  # the history window stepped forward: remember where it starts
            self.spawn(self.history.set_window(conversation.id, moved))
        return ChatRequest(
            model=persona.model,
            messages=messages,
            temperature=persona.temperature,
            seed=user_seed(incoming.platform, incoming.author_id),
            max_tokens=persona.max_reply_tokens,
            context_window=persona.context_window,
            repeat_penalty=persona.repeat_penalty,
            tools=self.drawing.tools(persona) if self.drawing is not None else (),
        )

    def _record(
        self,
        context: CallContext,
        request: ChatRequest,
        backend: str,
        stats: CallStats | None,
        error: str | None,
    ) -> None:
        self.spawn(self.calls.record(context, request, backend=backend, stats=stats, error=error))
        self.metrics.model_calls.inc(backend=backend, result="ok" if error is None else "error")

    async def message_deleted(self, platform: str, message_id: str) -> None:
        """A message deleted on the platform (by its author or a moderator): it and the reply
        to it leave the history, and memory forgets what it drew from it."""
        await self.recollection.message_deleted(platform, message_id)

    async def message_edited(self, platform: str, message_id: str, text: str) -> None:
        """A message edited on the platform: the stored text becomes the new one."""
        await self.recollection.message_edited(platform, message_id, text)

    def spawn(self, work: Awaitable[None]) -> None:
        """Run work after the reply without delaying it; `drain()` waits for it."""
        self._background.spawn(work)

    async def drain(self) -> None:
        """Wait for background work (call records, memory, ledger, verdicts) to finish; work
        that waits for a quiet moment runs now."""
        with self.quiet.flushing(), self.calls.flushing():
            await self._background.drain()
            await self.moderation.drain()

    @property
    def live_conversations(self) -> int:
        return len(self._locks)


@dataclass(frozen=True)
class _Opened:
    """A model that has started answering, and the context its call is recorded under."""

    answer: Answer
    context: CallContext


BACKUP_MODEL_NOTICE = "My usual model isn't answering, so a small backup model is standing in."


def _estimate(answer: Answer) -> CallStats | None:
    """A stream that ended without its usage (cut off, or closed by the guard): what a backend
    billed per token most likely charged for it (its `estimate`); None for the others."""
    estimate = getattr(answer.brain, "estimate", None)
    return estimate(answer.request, answer.text) if callable(estimate) else None


def _fallback_words(answer: Answer) -> str | None:
    """What chat users are told when a fallback answers (no host names: those are for logs)."""
    return BACKUP_MODEL_NOTICE if isinstance(answer.brain, LocalBrain) else None
