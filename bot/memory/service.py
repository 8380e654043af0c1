"""Long-term memory: durable facts about each user, extracted after replies and recalled into
the prompt. Private to the user they are about.

    engine reply ─ history appended ─→ remember(exchange)        (background, via engine.spawn)
        memory_jobs row → extraction (chat model, Ollama `format` = JSON schema)
        → embed the facts → insert (dedupe by normalised hash, supersede contradicted facts)
        → job row deleted
    next message ─→ recall(user_key, text)                       (concurrently with history)
        embed the message → exact cosine scan of this user's rows of the same embedding model
        → similarity floor → mild recency weight → top k → the prompt's `memories`

A job row is written before extraction and deleted after it, so work cut short by a shutdown is
picked up at the next start (`resume()`). Invalid model output is retried once, then dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
import ollama
from pydantic import BaseModel, Field, ValidationError

from bot.brains.base import CallStats, ChatRequest
from bot.brains.ollama_brain import OLLAMA_ERRORS, call_stats, failure_reason, redact_host
from bot.brains.supervisor import OnFailure
from bot.config import Settings
from bot.core.calls import CallContext, CallLog
from bot.core.personas import Persona
from bot.errors import ModelUnavailable
from bot.memory.embeddings import (
    EmbedCall,
    Embedder,
    Embeddings,
    LocalEmbedder,
    OllamaEmbedder,
    Recorder,
)
from bot.memory.store import Exchange, MemoryRow, MemoryStore, NewFact, Recalled, normalise

log = logging.getLogger(__name__)

Spawn = Callable[[Awaitable[None]], None]

_MAX_FACTS = 8
_MAX_FACT_CHARS = 300
_KNOWN_IN_PROMPT = 40
_LEASE_SECONDS = 300.0
_REEMBED_BATCH = 32
_JOB_DAYS = 7  # a job whose model never answers is dropped after this many days


class _Fact(BaseModel):
    fact: str = Field(description="one durable fact about the user, a short sentence")
    replaces: list[int] = Field(
        default_factory=list, description="ids of known facts this one contradicts or updates"
    )


class _Extraction(BaseModel):
    facts: list[_Fact] = Field(default_factory=list, max_length=_MAX_FACTS)


EXTRACTION_SCHEMA: dict[str, Any] = _Extraction.model_json_schema()

_INSTRUCTIONS = """You keep a private notebook of durable facts about one chat user, {name}.
Read {name}'s latest message and list facts about {name} that will still be true and useful
in later conversations: name, where they live, work, family, pets, likes and dislikes, plans,
things they asked to be remembered. Only what {name} says about themselves: nothing about other
people, the assistant, passing moods, questions, or small talk. Write each fact as a short
sentence in the third person without the name, for example "Lives in Lisbon." or "Has a cat
called Miso.". Do not repeat a known fact. If a new fact contradicts or updates a known fact,
put the known fact's id in "replaces". Answer {{"facts": []}} when there is nothing durable.

Known facts (id: fact):
{known}"""


class InvalidExtraction(Exception):
    """The model's answer was not valid JSON of the schema."""


class Extractor:
    """Asks the persona's chat model for facts, with Ollama structured outputs."""

    def __init__(
        self, host: str, calls: CallLog, *, connect_timeout: float, read_timeout: float
    ) -> None:
        self.backend = f"ollama:{redact_host(host)}"
        self._calls = calls
        timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self._client = ollama.AsyncClient(host=host, timeout=timeout)

    def request(self, exchange: Exchange, known: list[MemoryRow]) -> ChatRequest:
        listed = "\n".join(f"{m.id}: {m.text}" for m in known) or "(none yet)"
        system = _INSTRUCTIONS.format(name=exchange.author_name, known=listed)
        user = (
            f"{exchange.author_name}'s message:\n{exchange.message}\n\n"
            f"The reply they got (context only):\n{exchange.reply}"
        )
        return ChatRequest(
            model=exchange.model,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
            temperature=0.0,
            seed=0,
            max_tokens=400,
            context_window=4096,
            repeat_penalty=1.0,
        )

    async def extract(self, exchange: Exchange, request: ChatRequest) -> list[_Fact]:
        """One model call; raises ModelUnavailable (try later) or InvalidExtraction."""
        context = CallContext(
            exchange.platform, exchange.conversation_id, exchange.user_key, exchange.persona
        )
        stats: CallStats | None = None
        try:
            answer = await self._client.chat(
                model=request.model,
                messages=request.messages,
                format=EXTRACTION_SCHEMA,
                options=request.options(),
                stream=False,
            )
            stats = call_stats(self.backend, request.model, answer)
        except OLLAMA_ERRORS as exc:
            reason = failure_reason(exc)
            await self._record(context, request, None, reason)
            raise ModelUnavailable(f"{self.backend}: {reason}") from exc
        try:
            parsed = _Extraction.model_validate_json(answer.message.content or "")
        except ValidationError as exc:
            await self._record(context, request, stats, "invalid structured output")
            raise InvalidExtraction(f"{exc.error_count()} validation errors") from exc
        await self._record(context, request, stats, None)
        return parsed.facts

    async def _record(
        self, context: CallContext, request: ChatRequest, stats: CallStats | None, error: str | None
    ) -> None:
        await self._calls.record(
            context, request, backend=self.backend, stats=stats, error=error, purpose="memory"
        )

    async def aclose(self) -> None:
        await self._client.close()


class Memory:
    def __init__(
        self,
        pool: Any,
        calls: CallLog,
        embeddings: Embeddings,
        extractor: Extractor,
        *,
        enabled: bool = True,
        top_k: int = 5,
        min_similarity: float = 0.45,
        recency_weight: float = 0.05,
        half_life_days: float = 30.0,
        concurrency: int = 2,
    ) -> None:
        self.store = MemoryStore(pool)
        self.embeddings = embeddings
        self.extractor = extractor
        self.enabled = enabled
        self.top_k = top_k
        self.min_similarity = min_similarity
        self.recency_weight = recency_weight
        self.half_life_days = half_life_days
        self._calls = calls
        self._gate = asyncio.Semaphore(concurrency)

    def active(self, persona: Persona) -> bool:
        return self.enabled and persona.memory

    # ------------------------------------------------------------------ recall

    async def recall(
        self, user_key: str, text: str, *, context: CallContext, spawn: Spawn | None = None
    ) -> list[Recalled]:
        """The speaking user's memories most related to `text`; never raises. With `spawn`
        (the engine's), the call record is written in the background, off the reply's path."""
        try:
            models = await self.store.models_of(user_key)
            if not models:
                return []
            record = self._recorder(context, spawn)
            embedded = await self.embeddings.embed([text], record=record)
            if embedded.model not in models:
                return []  # no rows of this model: vectors of other models are not comparable
            found = await self.store.recall(
                user_key,
                embedded.vectors[0],
                embedded.model,
                top_k=self.top_k,
                floor=self.min_similarity,
                recency_weight=self.recency_weight,
                half_life_days=self.half_life_days,
            )
            if found:
                touch = self.store.touch(user_key, [m.id for m in found])
                if spawn is None:
                    await touch
                else:
                    spawn(touch)
            return found
        except Exception as exc:
            log.warning("memory recall for %s failed: %s", user_key, type(exc).__name__)
            return []

    def _recorder(self, context: CallContext, spawn: Spawn | None = None) -> Recorder:
        """Writes an embedding call to model_calls (and the ledger), or hands it to `spawn`."""

        async def record(call: EmbedCall, texts: Sequence[str]) -> None:
            request = ChatRequest(
                model=call.model.split(":", 1)[-1],
                messages=[{"role": "user", "content": text} for text in texts],
                temperature=0.0,
                seed=0,
                max_tokens=0,
                context_window=0,
            )
            stats = None
            if call.error is None:
                stats = CallStats(call.backend, request.model, call.tokens, 0, call.ms)
            work = self._calls.record(
                context,
                request,
                backend=call.backend,
                stats=stats,
                error=call.error,
                purpose="embed",
            )
            if spawn is None:
                await work
            else:
                spawn(work)

        return record

    # ------------------------------------------------------------------ extraction

    async def remember(self, exchange: Exchange) -> None:
        """Queue the exchange in Postgres, then extract from it (call in the background)."""
        job_id = await self.store.enqueue(exchange)
        await self.process(job_id)

    async def resume(self) -> int:
        """Extract from exchanges left pending by an earlier run; returns how many were tried."""
        expired = await self.store.expire(_JOB_DAYS)
        if expired:
            log.error("dropped %d memory jobs pending for over %d days", expired, _JOB_DAYS)
        done = 0
        for job_id in await self.store.pending():
            await self.process(job_id)
            done += 1
        return done

    async def process(self, job_id: int) -> None:
        async with self._gate:
            job = await self.store.claim(job_id, _LEASE_SECONDS)
            if job is None:
                return
            exchange = job.exchange
            known = await self.store.recent(exchange.user_key, _KNOWN_IN_PROMPT)
            request = self.extractor.request(exchange, known)
            for attempt in range(job.attempts, 2):
                try:
                    facts = await self.extractor.extract(exchange, request)
                    await self._store_facts(job.id, exchange, facts, {m.id for m in known})
                except ModelUnavailable as exc:
                    log.warning("memory extraction postponed (%s); job %s kept", exc, job.id)
                    await self.store.release(job.id)
                    return
                except InvalidExtraction as exc:
                    log.warning("memory extraction attempt %d invalid: %s", attempt + 1, exc)
                    await self.store.count_attempt(job.id)
                    continue
                await self.store.finish(job.id)
                return
            log.error("memory extraction for job %s gave invalid output twice; dropped", job.id)
            await self.store.finish(job.id)

    async def _store_facts(
        self, job_id: int, exchange: Exchange, facts: list[_Fact], known: set[int]
    ) -> None:
        cleaned: list[tuple[str, tuple[int, ...]]] = []
        seen: set[str] = set()
        for fact in facts:
            text = " ".join(fact.fact.split())[:_MAX_FACT_CHARS]
            key = normalise(text)
            if not key or key in seen:
                continue
            seen.add(key)
            # only ids the model was shown, which are all this user's
            cleaned.append((text, tuple(i for i in fact.replaces if i in known)))
        if not cleaned:
            return
        context = CallContext(
            exchange.platform, exchange.conversation_id, exchange.user_key, exchange.persona
        )
        embedded = await self.embeddings.embed(
            [text for text, _ in cleaned], record=self._recorder(context)
        )
        new = [
            NewFact(text, vector, replaces)
            for (text, replaces), vector in zip(cleaned, embedded.vectors, strict=True)
        ]
        ids = await self.store.add(
            exchange.user_key, new, model=embedded.model, persona=exchange.persona, job_id=job_id
        )
        log.info("remembered %d new facts about %s", len(ids), exchange.user_key)

    # ------------------------------------------------------------------ user control

    async def current(self, user_key: str) -> list[MemoryRow]:
        return await self.store.current(user_key)

    async def forget(self, user_key: str, memory_id: int | None = None) -> int:
        return await self.store.forget(user_key, memory_id)

    async def export(self, user_key: str) -> list[dict[str, Any]]:
        return [row.as_json() for row in await self.store.all_rows(user_key)]

    async def reembed(self) -> tuple[str, int]:
        """Move every row to the configured (first) embedding model; returns (model, moved)."""
        model, moved = self.embeddings.models[0], 0
        while batch := await self.store.stale(model, _REEMBED_BATCH):
            embedded = await self.embeddings.embed([text for _, text in batch], only=model)
            rows = [(i, v) for (i, _), v in zip(batch, embedded.vectors, strict=True)]
            await self.store.set_embedding(rows, model)
            moved += len(rows)
        return model, moved

    async def aclose(self) -> None:
        await self.embeddings.aclose()
        await self.extractor.aclose()


def build_memory(
    settings: Settings,
    pool: Any,
    calls: CallLog | None = None,
    *,
    on_worker_failure: OnFailure | None = None,
) -> Memory:
    """Memory wired from the settings: Ollama embeddings, then the shipped local model.
    Its model calls are recorded (and charged, when `calls` has the ledger) through `calls`;
    a lost local model worker is counted through `on_worker_failure` (/metrics)."""
    calls = calls or CallLog(pool, keep_prompts=settings.log_prompts)
    embedders: list[Embedder] = [
        OllamaEmbedder(
            settings.ollama_host,
            settings.memory_embed_model,
            connect_timeout=settings.ollama_connect_timeout,
            read_timeout=settings.ollama_read_timeout,
        )
    ]
    if settings.memory_local_embeddings:
        embedders.append(
            LocalEmbedder(
                threads=settings.local_model_threads,
                worker_command=settings.local_model_worker_command,
                worker_timeout=settings.local_model_worker_timeout,
                on_failure=on_worker_failure,
            )
        )
    extractor = Extractor(
        settings.ollama_host,
        calls,
        connect_timeout=settings.ollama_connect_timeout,
        read_timeout=settings.ollama_read_timeout,
    )
    return Memory(
        pool,
        calls,
        Embeddings(embedders),
        extractor,
        enabled=settings.memory_enabled,
        top_k=settings.memory_top_k,
        min_similarity=settings.memory_min_similarity,
        recency_weight=settings.memory_recency_weight,
        half_life_days=settings.memory_recency_half_life_days,
    )
