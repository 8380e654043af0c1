"""The reply pipeline every platform shares.

    Incoming → persona for the conversation → history → prompt → model (streamed) → events

Adapters turn platform events into `Incoming` and render the events `handle()` yields:
`Notice` (say it quietly: stderr, an ephemeral note), `Delta` (reply text so far grows),
`Done` (the whole reply and who answered) or `Failed` (a plain sentence for the user).
Conversations never wait on each other; within one conversation messages are answered in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass

from bot.brains import BrainRouter, CallStats, ChatRequest
from bot.brains.router import Answer, NoBackend
from bot.calls import CallContext, CallLog
from bot.errors import BotError, ModelError, user_message
from bot.guard import UNCHECKED, Verdict, Where
from bot.guard_categories import describe
from bot.history import Conversation, History
from bot.memory import Memory
from bot.memory_store import Exchange
from bot.metrics import Metrics
from bot.moderation import INPUT_UNCHECKED, UNMODERATED, Moderation, OutputScreen, gated, withheld
from bot.personas import Persona, PersonaRegistry
from bot.prompts import PromptBuilder, build_messages, user_seed

log = logging.getLogger(__name__)


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

    @property
    def user_key(self) -> str:
        return f"{self.platform}:{self.author_id}"


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


Event = Notice | Delta | Done | Failed


class _ConversationLocks:
    """One lock per live conversation, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    async def __call__(self, key: tuple[str, str]) -> _Held:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        await lock.acquire()
        return _Held(self, key, lock)

    def release(self, key: tuple[str, str], lock: asyncio.Lock) -> None:
        lock.release()
        _, users = self._locks[key]
        if users <= 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


@dataclass
class _Held:
    owner: _ConversationLocks
    key: tuple[str, str]
    lock: asyncio.Lock

    def release(self) -> None:
        self.owner.release(self.key, self.lock)


class Engine:
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
        memory: Memory | None = None,
        moderation: Moderation | None = None,
    ) -> None:
        self.personas = personas
        self.prompts = prompts
        self.history = history
        self.router = router
        self.calls = calls
        self.default_persona = default_persona
        self._locks = _ConversationLocks()
        self._background: set[asyncio.Task[None]] = set()
        self.metrics = metrics or Metrics()
        self.memory = memory
        self.moderation = moderation or Moderation()  # Llama Guard (issue 4); none: unchecked

    def persona_named(self, name: str | None) -> Persona:
        found = self.personas.find(name) if name else None
        return found or self.personas.default(self.default_persona)

    async def conversation(self, platform: str, external_id: str) -> Conversation:
        return await self.history.conversation(platform, external_id)

    async def persona_for(self, platform: str, external_id: str) -> Persona:
        conversation = await self.history.conversation(platform, external_id)
        return self.persona_named(conversation.persona)

    async def handle(self, incoming: Incoming) -> AsyncGenerator[Event, None]:
        """Answer one message; yields events for the adapter to render."""
        if not incoming.addressed or not incoming.text.strip():
            return
        held = await self._locks((incoming.platform, incoming.conversation))
        timer = _ReplyTimer(self.metrics, incoming.platform)
        try:
            async for event in self._answer(incoming):
                timer.saw(event)
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
        conversation = await self.history.conversation(incoming.platform, incoming.conversation)
        persona = self.persona_named(conversation.persona)
        where = Where(
            incoming.platform,
            incoming.conversation,
            conversation.id,
            incoming.user_key,
            incoming.nsfw,
        )
        verdict, opened = UNCHECKED, None
        checked = self._checked_open(incoming, conversation, persona, where)
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
        screen = self.moderation.output_screen(persona, where)
        async for event in self._stream(answer, context, screen):
            yield event
        if screen.blocked is not None:  # not shown; nothing enters history or memory
            yield Failed(withheld(persona, screen.blocked), retract=bool(screen.shown))
            return
        if verdict.unmoderated or screen.unmoderated:
            yield Notice(UNMODERATED)
        reply = answer.text.strip()
        if not reply:
            yield Failed(f"{persona.display_name} drew a blank. Try saying that another way?")
            return
        await self.history.append_exchange(
            conversation.id,
            author_id=incoming.author_id,
            author_name=incoming.author_name,
            text=incoming.text,
            persona=persona.name,
            reply=reply,
        )
        self._remember(incoming, conversation, persona, reply)
        log.info("%s answered %s with %s", persona.name, incoming.user_key, answer.label)
        yield Done(reply, persona, answer.label)

    async def _checked_open(
        self, incoming: Incoming, conversation: Conversation, persona: Persona, where: Where
    ) -> AsyncGenerator[Event | Verdict | _Opened, None]:
        """Open the model while the input check runs; nothing is shown before its verdict.

        Yields the verdict, then notices and the opened answer; for a refused input only the
        refusal (in character) or, when the guard gave no verdict, a notice.
        """
        check = self.moderation.check_input(incoming.text, persona, where)
        work = self._open(incoming, conversation, persona)
        async with contextlib.aclosing(gated(check, work, self._discard)) as items:
            async for item in items:
                if isinstance(item, str):
                    yield Notice(item, user_text=item)  # "waking up…", while a backend wakes
                elif isinstance(item, Verdict) and not item.safe:
                    if item.unknown:
                        yield Failed(INPUT_UNCHECKED)
                        return
                    refusal = self.moderation.refusal(persona, item, incoming.author_name)
                    yield Delta(refusal)
                    yield Done(refusal, persona, f"a refusal ({describe(item.blocking)})")
                    return
                else:
                    yield item

    async def _open(
        self, incoming: Incoming, conversation: Conversation, persona: Persona
    ) -> AsyncIterator[str | _Opened]:
        """History, recall and the prompt, then the model's first token; notices on the way."""
        request = await self._request(incoming, conversation, persona)
        context = CallContext(incoming.platform, conversation.id, incoming.user_key, persona.name)
        answer: Answer | None = None
        try:
            async for item in self.router.opening(request, fallback=persona.fallback):
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
        yield _Opened(answer, context)

    async def _discard(self, item: Verdict | str | _Opened) -> None:
        """A model opened for an input the guard refused: stop it, record why."""
        if isinstance(item, _Opened):
            answer = item.answer
            await answer.aclose()
            reason = "stopped: the guard refused its input"
            self._record(item.context, answer.request, answer.brain.name, None, reason)

    async def _stream(
        self, answer: Answer, context: CallContext, screen: OutputScreen
    ) -> AsyncIterator[Event]:
        try:
            async for text in screen.release(answer.chunks()):
                yield Delta(text)
        except ModelError as exc:
            self._record(context, answer.request, answer.brain.name, answer.stats, str(exc))
            raise
        if screen.blocked is not None:
            await answer.aclose()
        self._record(context, answer.request, answer.brain.name, answer.stats, None)

    async def _request(
        self, incoming: Incoming, conversation: Conversation, persona: Persona
    ) -> ChatRequest:
        turns, memories = await asyncio.gather(
            self.history.recent(conversation.id), self._recall(incoming, conversation, persona)
        )
        system = self.prompts.system(persona, speaker=incoming.author_name, memories=memories)
        budget = persona.context_window - persona.max_reply_tokens
        messages = build_messages(system, turns, incoming.author_name, incoming.text, budget)
        return ChatRequest(
            model=persona.model,
            messages=messages,
            temperature=persona.temperature,
            seed=user_seed(incoming.platform, incoming.author_id),
            max_tokens=persona.max_reply_tokens,
            context_window=persona.context_window,
            repeat_penalty=persona.repeat_penalty,
        )

    async def _recall(
        self, incoming: Incoming, conversation: Conversation, persona: Persona
    ) -> list[str]:
        """The speaking user's memories for the prompt (only theirs, even in a group)."""
        if self.memory is None or not self.memory.active(persona):
            return []
        context = CallContext(incoming.platform, conversation.id, incoming.user_key, persona.name)
        found = await self.memory.recall(
            incoming.user_key, incoming.text, context=context, spawn=self.spawn
        )
        return [m.text for m in found]

    def _remember(
        self, incoming: Incoming, conversation: Conversation, persona: Persona, reply: str
    ) -> None:
        """Hand an answered exchange to memory extraction, in the background."""
        if self.memory is None or not self.memory.active(persona):
            return
        exchange = Exchange(
            incoming.user_key,
            incoming.author_name,
            persona.name,
            persona.model,
            incoming.platform,
            conversation.id,
            incoming.text,
            reply,
        )
        self.spawn(self.memory.remember(exchange))

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

    def spawn(self, work: Awaitable[None]) -> None:
        """Run work after the reply without delaying it; `drain()` waits for it."""

        async def guarded() -> None:
            try:
                await work
            except Exception:
                log.exception("background work failed")

        task = asyncio.create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for background work (call records, later memory and ledger) to finish."""
        while self._background:
            await asyncio.gather(*list(self._background))
        await self.moderation.drain()

    @property
    def live_conversations(self) -> int:
        return len(self._locks)


@dataclass(frozen=True)
class _Opened:
    """A model that has started answering, and the context its call is recorded under."""

    answer: Answer
    context: CallContext


class _ReplyTimer:
    """Counts one reply's outcome and latency (first piece, whole reply) for /metrics."""

    def __init__(self, metrics: Metrics, platform: str) -> None:
        self._metrics = metrics
        self._platform = platform
        self._started = time.perf_counter()
        self._first = False
        self.outcome = "cancelled"

    def saw(self, event: Event) -> None:
        if isinstance(event, Delta) and not self._first:
            self._first = True
            elapsed = time.perf_counter() - self._started
            self._metrics.first_token_seconds.observe(elapsed, platform=self._platform)
        elif isinstance(event, Done):
            self.outcome = "done"
        elif isinstance(event, Failed):
            self.outcome = "failed"

    def finish(self) -> None:
        elapsed = time.perf_counter() - self._started
        self._metrics.replies.inc(platform=self._platform, outcome=self.outcome)
        if self.outcome == "done":
            self._metrics.reply_seconds.observe(elapsed, platform=self._platform)


BACKUP_MODEL_NOTICE = "My usual model isn't answering, so a small backup model is standing in."


def _fallback_words(answer: Answer) -> str | None:
    """What chat users are told when a fallback answers (no host names: those are for logs)."""
    from bot.brains.local import LocalBrain

    return BACKUP_MODEL_NOTICE if isinstance(answer.brain, LocalBrain) else None
