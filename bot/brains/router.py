"""Pick the model that answers: the backend pool first, the local CPU model when none can.

`open()` returns only once a backend has produced its first chunk, so the caller knows who is
answering (and can tell the user) before any text is shown. With a pool (pool.py) it tries, in
order, the backends that serve the persona's model: one that fails before its first token rests
(circuit breaker) and the next is tried; a sleeping one is woken, and the caller hears about it
through `notify` ("waking up…") before the first token. Then the plain `brains` (the local
model), unless the persona's `fallback` is `apologise`. `opening()` is the same as an async
generator that yields those notices as they happen and the `Answer` last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from bot.brains.base import Brain, CallStats, ChatRequest, Chunk, ToolCall
from bot.brains.local import LOCAL_MODEL_NAME, LocalBrain
from bot.brains.pool import Backend, BackendPool, Lease
from bot.errors import ModelError, ModelInterrupted, ModelUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    backend: str
    model: str
    reason: str


@dataclass
class Answer:
    """A reply being streamed by one backend."""

    brain: Brain
    request: ChatRequest
    label: str
    failures: list[Failure]
    _first: Chunk
    _rest: AsyncIterator[Chunk]
    stats: CallStats | None = None
    text_parts: list[str] = field(default_factory=list)
    queued: bool = False  # it waited for a backend to come back (the user was told then)
    tool_calls: list[ToolCall] = field(default_factory=list)  # tools the model asked for

    @property
    def notice(self) -> str | None:
        if not self.failures or self.queued:
            return None
        why = "; ".join(f"{f.backend} ({f.reason})" for f in self.failures)
        return f"Answering with {self.label}, because {why} could not answer."

    async def chunks(self) -> AsyncIterator[str]:
        """The reply's text pieces; raises ModelInterrupted if the backend fails part-way."""
        chunk: Chunk | None = self._first
        try:
            while chunk is not None:
                if chunk.stats is not None:
                    self.stats = chunk.stats
                self.tool_calls.extend(chunk.tool_calls)
                if chunk.text:
                    self.text_parts.append(chunk.text)
                    yield chunk.text
                chunk = await anext(self._rest, None)
        except ModelError as exc:
            raise ModelInterrupted(str(exc)) from exc
        finally:
            # A reader that stops early ends the stream now (and frees its pooled backend).
            closer = getattr(self._rest, "aclose", None)
            if closer is not None:
                await closer()

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    async def aclose(self) -> None:
        """Stop the reply early (e.g. the guard blocked it): the backend is released."""
        closer = getattr(self._rest, "aclose", None)
        if closer is not None:
            await closer()


Notify = Callable[[str], None]
QUEUED_NOTICE = (
    "My model isn't answering right now; I'll reply as soon as it is back (within {minutes} min)."
)
_RESTING = "it is resting after failures"
_QUEUE_POLL = 0.5  # seconds: the shortest wait between retries of a queued reply


class BrainRouter:
    def __init__(
        self,
        brains: Sequence[Brain],
        pool: BackendPool | None = None,
        *,
        degrade: Callable[[str | None], Awaitable[int]] | None = None,
        queue_wait: float = 600.0,
    ) -> None:
        self.brains = list(brains)
        self.pool = pool
        self.queue_wait = queue_wait  # persona fallback "queue": how long a reply may wait
        # The ledger's degrade ladder: 1 free backends only, 2 and up the local model only;
        # called with the persona a request is for (its own monthly cap counts too).
        self.degrade = degrade

    async def prewake(self, model: str) -> bool:
        """Someone started typing: wake a backend for `model` now (see BackendPool.prewake)."""
        return await self.pool.prewake(model) if self.pool is not None else False

    def level_check(self, persona: str | None) -> asyncio.Future[int] | None:
        """The degrade ladder's step for a request about to be made for `persona`, asked now, so
        that it is read while the prompt is being made (recall) and `open(level=…)` finds it
        ready; None without a ladder. A check no request awaits runs to its end all the same
        (it may be sending the admins an alert)."""
        if self.degrade is None:
            return None
        level = asyncio.ensure_future(self.degrade(persona))
        level.add_done_callback(_retrieved)
        return level

    async def opening(
        self,
        request: ChatRequest,
        *,
        fallback: str = "local",
        persona: str | None = None,
        level: Awaitable[int] | None = None,
    ) -> AsyncIterator[str | Answer]:
        """`open()` as a stream: notices (e.g. "waking up…") as they happen, the Answer last."""
        notices: asyncio.Queue[str] = asyncio.Queue()
        task = asyncio.create_task(
            self.open(
                request,
                fallback=fallback,
                notify=notices.put_nowait,
                persona=persona,
                level=level,
            )
        )
        handed = False
        try:
            while not task.done():
                getter = asyncio.ensure_future(notices.get())
                try:
                    await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                finally:  # also when this generator is cancelled (e.g. the guard refused)
                    if not getter.done():
                        getter.cancel()
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            while not notices.empty():
                yield notices.get_nowait()
            answer = task.result()
            handed = True
            yield answer
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            elif not handed and not task.cancelled() and task.exception() is None:
                await task.result().aclose()  # opened, but the caller left before taking it

    def _request_for(self, brain: Brain, request: ChatRequest) -> ChatRequest:
        if isinstance(brain, LocalBrain):  # no tools for the small local model
            messages = _without_tools(request.messages)
            return replace(request, model=LOCAL_MODEL_NAME, tools=(), messages=messages)
        return request

    async def open(
        self,
        request: ChatRequest,
        *,
        fallback: str = "local",
        notify: Notify | None = None,
        persona: str | None = None,
        level: Awaitable[int] | None = None,
    ) -> Answer:
        """The first backend that answers; `level`: the ladder's step, asked beforehand
        (`level_check`), else asked now."""
        failures: list[Failure] = []
        if level is not None:
            step = await level
        else:
            step = await self.degrade(persona) if self.degrade is not None else 0
        if self.pool is not None and step < 2:
            answer = await self._open_pool(self.pool, request, failures, notify, step == 1)
            if answer is None and fallback == "queue":
                answer = await self._queued(self.pool, request, failures, notify, step == 1)
            if answer is not None:
                return answer
        for brain in self.brains:
            if fallback in ("apologise", "queue") and isinstance(brain, LocalBrain):
                continue
            attempt = self._request_for(brain, request)
            stream = brain.stream(attempt)
            try:
                first = await anext(stream)
            except (ModelUnavailable, StopAsyncIteration) as exc:
                failures.append(Failure(brain.name, attempt.model, _reason(exc)))
                closer = getattr(stream, "aclose", None)
                if closer is not None:
                    await closer()
                continue
            label = brain.label(attempt.model)
            log.info("answering with %s", label)
            return Answer(brain, attempt, label, failures, first, stream)
        raise NoBackend(failures)

    async def _queued(
        self,
        pool: BackendPool,
        request: ChatRequest,
        failures: list[Failure],
        notify: Notify | None,
        free_only: bool,
    ) -> Answer | None:
        """Fallback "queue": wait (up to `queue_wait`) for a backend to come back, retrying
        whenever one's rest is over; None if none did, or none serves the model at all."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.queue_wait
        if notify is not None:
            notify(QUEUED_NOTICE.format(minutes=max(1, round(self.queue_wait / 60))))
        while (left := deadline - loop.time()) > 0:
            usable, resting = pool.route(
                request.model, free_only=free_only, context_needed=request.context_needed()
            )
            if not usable and not resting:
                return None
            soonest = min((b.breaker.remaining() for b in resting), default=0.0)
            await asyncio.sleep(min(left, max(_QUEUE_POLL, soonest if not usable else 0.0)))
            tried: list[Failure] = []
            answer = await self._open_pool(pool, request, tried, None, free_only)
            failures.extend(f for f in tried if f.reason != _RESTING)
            if answer is not None:
                answer.failures = list(failures)
                answer.queued = True
                return answer
        return None

    async def _open_pool(
        self,
        pool: BackendPool,
        request: ChatRequest,
        failures: list[Failure],
        notify: Notify | None,
        free_only: bool,
    ) -> Answer | None:
        usable, resting = pool.route(
            request.model, free_only=free_only, context_needed=request.context_needed()
        )
        for backend in resting:
            failures.append(Failure(backend.name, request.model, _RESTING))
        for backend in usable:
            try:
                lease = await pool.acquire(backend, request.model, notify)
            except ModelUnavailable as exc:
                failures.append(Failure(backend.name, request.model, _reason(exc)))
                continue
            answer = await self._first_token(pool, backend, lease, request, failures)
            if answer is not None:
                return answer
        return None

    async def _first_token(
        self,
        pool: BackendPool,
        backend: Backend,
        lease: Lease,
        request: ChatRequest,
        failures: list[Failure],
    ) -> Answer | None:
        """The backend's first chunk, with the lease; on every way out before it (a failure,
        a cancellation, an error of any kind) the lease is released."""
        stream = backend.brain.stream(_fitted(request, backend))
        try:
            first = await anext(stream)
        except BaseException as exc:
            await lease.release()
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]
            if not isinstance(exc, (ModelUnavailable, StopAsyncIteration)):
                raise
            await pool.failed(backend, exc)
            failures.append(Failure(backend.name, request.model, _reason(exc)))
            return None
        backend.breaker.success()
        label = backend.brain.label(request.model)
        log.info("answering with %s", label)
        return Answer(backend.brain, request, label, failures, first, _Leased(stream, lease))

    async def aclose(self) -> None:
        for brain in self.brains:
            await brain.aclose()
        if self.pool is not None:
            await self.pool.aclose()


def _retrieved(level: asyncio.Future[int]) -> None:
    """A check nobody awaited (the request was never made) leaves no "never retrieved" noise."""
    if not level.cancelled():
        level.exception()


def _without_tools(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool calls and results as plain turns, for a model that knows no tools."""
    plain: list[dict[str, Any]] = []
    for message in messages:
        if message.get("role") == "tool":
            plain.append({"role": "system", "content": f"(Tool result: {message.get('content')})"})
        elif message.get("tool_calls"):
            if message.get("content"):
                plain.append({"role": message["role"], "content": message["content"]})
        else:
            plain.append(message)
    return plain


def _fitted(request: ChatRequest, backend: Backend) -> ChatRequest:
    """The request within the backend's `max_context` (Ollama's num_ctx is sized from it)."""
    if backend.max_context is None or request.context_window <= backend.max_context:
        return request
    return replace(request, context_window=backend.max_context)


def _reason(exc: BaseException) -> str:
    return str(exc).split(": ", 1)[-1] if str(exc) else "no reply"


class _Leased:
    """The rest of a pooled reply, holding its lease until the stream ends, fails or is
    closed, even if it was never read (a class, not an async generator, because closing a
    generator that never started skips its `finally`)."""

    def __init__(self, stream: AsyncIterator[Chunk], lease: Lease) -> None:
        self._stream = stream
        self._lease = lease

    def __aiter__(self) -> _Leased:
        return self

    async def __anext__(self) -> Chunk:
        try:
            chunk = await anext(self._stream)
        except BaseException:
            await self.aclose()
            raise
        self._lease.touch()
        return chunk

    async def aclose(self) -> None:
        if self._lease.released:
            return
        try:
            closer = getattr(self._stream, "aclose", None)
            if closer is not None:
                await closer()
        finally:
            await self._lease.release()


class NoBackend(ModelUnavailable):
    def __init__(self, failures: list[Failure]) -> None:
        why = "; ".join(f"{f.backend}: {f.reason}" for f in failures) or "no backend configured"
        super().__init__(f"no model could answer ({why})")
        self.failures = failures
