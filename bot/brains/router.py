"""Pick the model that answers: Ollama first, the local CPU model when Ollama cannot.

`open()` returns only once a backend has produced its first chunk, so the caller knows who is
answering (and can tell the user) before any text is shown. Issue #6 grows this into a pool of
backends with wake drivers and a circuit breaker; the interface stays the same.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

from bot.brains.base import Brain, CallStats, ChatRequest, Chunk
from bot.brains.local import LOCAL_MODEL_NAME, LocalBrain
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

    @property
    def notice(self) -> str | None:
        if not self.failures:
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
                if chunk.text:
                    self.text_parts.append(chunk.text)
                    yield chunk.text
                chunk = await anext(self._rest, None)
        except ModelError as exc:
            raise ModelInterrupted(str(exc)) from exc

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


class BrainRouter:
    def __init__(self, brains: Sequence[Brain]) -> None:
        self.brains = list(brains)

    def _request_for(self, brain: Brain, request: ChatRequest) -> ChatRequest:
        if isinstance(brain, LocalBrain):
            return replace(request, model=LOCAL_MODEL_NAME)
        return request

    async def open(self, request: ChatRequest) -> Answer:
        failures: list[Failure] = []
        for brain in self.brains:
            attempt = self._request_for(brain, request)
            stream = brain.stream(attempt)
            try:
                first = await anext(stream)
            except (ModelUnavailable, StopAsyncIteration) as exc:
                reason = str(exc).split(": ", 1)[-1] if str(exc) else "no reply"
                failures.append(Failure(brain.name, attempt.model, reason))
                closer = getattr(stream, "aclose", None)
                if closer is not None:
                    await closer()
                continue
            label = brain.label(attempt.model)
            log.info("answering with %s", label)
            return Answer(brain, attempt, label, failures, first, stream)
        raise NoBackend(failures)

    async def aclose(self) -> None:
        for brain in self.brains:
            await brain.aclose()


class NoBackend(ModelUnavailable):
    def __init__(self, failures: list[Failure]) -> None:
        why = "; ".join(f"{f.backend}: {f.reason}" for f in failures) or "no backend configured"
        super().__init__(f"no model could answer ({why})")
        self.failures = failures
