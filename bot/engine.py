"""The reply pipeline every platform shares.

    Incoming → persona for the conversation → history → prompt → model (streamed) → events

Adapters turn platform events into `Incoming` and render the events `handle()` yields:
`Notice` (say it quietly: stderr, an ephemeral note), `Delta` (reply text so far grows),
`Done` (the whole reply and who answered) or `Failed` (a plain sentence for the user).
Conversations never wait on each other; within one conversation messages are answered in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass

from bot.brains import BrainRouter, CallStats, ChatRequest
from bot.brains.router import Answer, NoBackend
from bot.calls import CallContext, CallLog
from bot.errors import BotError, ModelError, user_message
from bot.history import Conversation, History
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
    text: str


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
    ) -> None:
        self.personas = personas
        self.prompts = prompts
        self.history = history
        self.router = router
        self.calls = calls
        self.default_persona = default_persona
        self._locks = _ConversationLocks()
        self._background: set[asyncio.Task[None]] = set()

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
        try:
            async for event in self._answer(incoming):
                yield event
        except BotError as exc:
            log.warning("reply to %s failed: %s", incoming.user_key, exc)
            yield Failed(user_message(exc))
        except Exception:
            log.exception("reply to %s failed unexpectedly", incoming.user_key)
            yield Failed(user_message(Exception()))
        finally:
            held.release()

    async def _answer(self, incoming: Incoming) -> AsyncIterator[Event]:
        conversation = await self.history.conversation(incoming.platform, incoming.conversation)
        persona = self.persona_named(conversation.persona)
        request = await self._request(incoming, conversation, persona)
        context = CallContext(incoming.platform, conversation.id, incoming.user_key, persona.name)
        try:
            answer = await self.router.open(request)
        except NoBackend as exc:
            for failure in exc.failures:
                self._record(context, request, failure.backend, None, failure.reason)
            raise
        for failure in answer.failures:
            self._record(context, request, failure.backend, None, failure.reason)
        if answer.notice:
            log.warning("%s", answer.notice)
            yield Notice(answer.notice)
        async for event in self._stream(answer, context):
            yield event
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
        log.info("%s answered %s with %s", persona.name, incoming.user_key, answer.label)
        yield Done(reply, persona, answer.label)

    async def _stream(self, answer: Answer, context: CallContext) -> AsyncIterator[Event]:
        try:
            async for text in answer.chunks():
                yield Delta(text)
        except ModelError as exc:
            self._record(context, answer.request, answer.brain.name, answer.stats, str(exc))
            raise
        self._record(context, answer.request, answer.brain.name, answer.stats, None)

    async def _request(
        self, incoming: Incoming, conversation: Conversation, persona: Persona
    ) -> ChatRequest:
        turns = await self.history.recent(conversation.id)
        system = self.prompts.system(persona, speaker=incoming.author_name)
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

    def _record(
        self,
        context: CallContext,
        request: ChatRequest,
        backend: str,
        stats: CallStats | None,
        error: str | None,
    ) -> None:
        self.spawn(self.calls.record(context, request, backend=backend, stats=stats, error=error))

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

    @property
    def live_conversations(self) -> int:
        return len(self._locks)
