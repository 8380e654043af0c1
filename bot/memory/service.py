"""Long-term memory: durable facts about each user, extracted after replies and recalled into
the prompt. Private to the user they are about.

    engine reply ─ history appended ─→ remember(exchange)        (background, via engine.spawn)
        memory_jobs row → the user's stored facts nearest the message, by embedding (as mem0
        compares by meaning) → extraction (chat model, Ollama `format` = a bounded JSON schema:
        add, update (`replaces`), delete (`drops`) or nothing) → each new fact through the
        input guard → embed → insert (dedupe by normalised hash, supersede) → job row deleted
    next message ─→ recall(user_key, text)                       (concurrently with history)
        embed the message → exact cosine scan of this user's rows of the same embedding model
        → similarity floor → mild recency weight → top k → the prompt's `memories`

A job row is written before extraction and deleted after it, so work cut short by a shutdown is
picked up at the next start (`resume()`). The schema is bounded (`maxLength` on a fact,
`maxItems` on the lists) so constrained decoding ends inside `_EXTRACTION_TOKENS`; the valid facts
of a partly invalid answer are kept, ids that are not among the user's facts shown are ignored,
and an answer that is not JSON of the schema at all is retried once, then dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from bot.brains.base import CallStats, ChatRequest
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
from bot.memory.extract import (
    EXTRACTION_SCHEMA,
    MAX_FACT_CHARS,
    Extracted,
    Extractor,
    InvalidExtraction,
)
from bot.memory.store import (
    Exchange,
    Job,
    MemoryRow,
    MemoryStore,
    NewFact,
    Recalled,
    normalise,
)

__all__ = ["EXTRACTION_SCHEMA", "Extractor", "InvalidExtraction", "Memory", "build_memory"]

log = logging.getLogger(__name__)

Spawn = Callable[[Awaitable[None]], None]
# Judges a fact as the user's input would be (the guard, for the exchange's persona): True keeps it.
Vet = Callable[[str, Exchange], Awaitable[bool]]

_KNOWN_IN_PROMPT = 12  # the user's stored facts nearest the message, shown to the extractor
_LEASE_SECONDS = 300.0
_REEMBED_BATCH = 32
_JOB_DAYS = 7  # a job whose model never answers is dropped after this many days
_KEPT_QUERIES = 256  # recall's embeddings of messages, kept for their extraction


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
        vet: Vet | None = None,
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
        self.vet = vet  # the input guard for new facts (set by the app when the guard is on)
        # (user key, message) -> (model, vector): the message recall embedded, which its
        # extraction compares the user's facts with, so it is embedded once (issue 22)
        self._queries: OrderedDict[tuple[str, str], tuple[str, list[float]]] = OrderedDict()

    def active(self, persona: Persona) -> bool:
        return self.enabled and persona.memory

    # ------------------------------------------------------------------ recall

    async def recall(
        self,
        user_key: str,
        text: str,
        *,
        context: CallContext,
        spawn: Spawn | None = None,
        scope: str | None = None,
        persona: str | None = None,
    ) -> list[Recalled]:
        """The speaking user's memories most related to `text`, learned in `scope` (None: in
        any), the shared ones and those private to `persona` (None: all); never raises. With
        `spawn` (the engine's), the call record is written in the background, off the reply's
        path."""
        try:
            models = await self.store.models_of(user_key, scope)
            if not models:
                return []
            record = self._recorder(context, spawn)
            embedded = await self.embeddings.embed([text], record=record)
            if embedded.model not in models:
                return []  # no rows of this model: vectors of other models are not comparable
            self._queries[(user_key, text)] = (embedded.model, embedded.vectors[0])
            if len(self._queries) > _KEPT_QUERIES:
                self._queries.popitem(last=False)
            found = await self.store.recall(
                user_key,
                embedded.vectors[0],
                embedded.model,
                top_k=self.top_k,
                floor=self.min_similarity,
                recency_weight=self.recency_weight,
                half_life_days=self.half_life_days,
                scope=scope,
                persona=persona,
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

    async def message_deleted(self, message_rows: list[int]) -> int:
        """Messages deleted on their platform: their pending extraction stops and the facts
        drawn only from them are deleted; returns how many facts went."""
        return await self.store.message_deleted(message_rows)

    async def message_edited(self, message_rows: list[int], text: str) -> None:
        """Messages edited on their platform: a pending extraction reads the new text."""
        await self.store.message_edited(message_rows, text)

    async def remember(self, exchange: Exchange) -> None:
        """Queue the exchange in Postgres, taken by this process in the same statement, then
        extract from it (call in the background)."""
        queued = time.monotonic()
        job: Job | None = await self.store.enqueue_held(exchange, _LEASE_SECONDS)
        async with self._gate:
            if job is not None and time.monotonic() - queued > _LEASE_SECONDS / 2:
                await self.store.release(job.id)  # long in the queue: take it anew
                job = await self.store.claim(job.id, _LEASE_SECONDS)
            if job is not None:
                await self._extract(job)

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
            if job is not None:
                await self._extract(job)

    async def _extract(self, job: Job) -> None:
        """Extract from a job this process holds; finished, or given back for later."""
        exchange = job.exchange
        try:
            known = await self._nearest(exchange)
        except ModelUnavailable as exc:
            log.warning("memory extraction postponed (%s); job %s kept", exc, job.id)
            await self.store.release(job.id)
            return
        request = self.extractor.request(exchange, known)
        keepers = {m.id: m.private_to for m in known}
        for attempt in range(job.attempts, 2):
            try:
                extracted = await self.extractor.extract(exchange, request)
                finished = await self._store_facts(job.id, exchange, extracted, keepers)
            except ModelUnavailable as exc:
                log.warning("memory extraction postponed (%s); job %s kept", exc, job.id)
                await self.store.release(job.id)
                return
            except InvalidExtraction as exc:
                log.warning("memory extraction attempt %d invalid: %s", attempt + 1, exc)
                await self.store.count_attempt(job.id)
                continue
            if not finished:
                await self.store.finish(job.id)
            return
        log.error("memory extraction for job %s gave invalid output twice; dropped", job.id)
        await self.store.finish(job.id)

    async def _nearest(self, exchange: Exchange) -> list[MemoryRow]:
        """The user's current facts the exchange's persona sees, nearest the message by meaning
        (their stored embeddings), to compare the new facts with; the newest ones when the
        message cannot be embedded with a model the facts were embedded with. The vector recall
        made of the message is used when this process still has it (one embedding call a
        message, not two)."""
        # recall embedded the message only if the user had facts of that model
        kept = self._queries.pop((exchange.user_key, exchange.message), None)
        if kept is None:
            models = await self.store.models_of(exchange.user_key)
            if not models:
                return []
            context = CallContext(
                exchange.platform, exchange.conversation_id, exchange.user_key, exchange.persona
            )
            embedded = await self.embeddings.embed(
                [exchange.message], record=self._recorder(context)
            )
            if embedded.model not in models:
                return await self.store.recent(
                    exchange.user_key, _KNOWN_IN_PROMPT, exchange.persona
                )
            kept = (embedded.model, embedded.vectors[0])
        model, vector = kept
        return await self.store.nearest(
            exchange.user_key,
            vector,
            model,
            _KNOWN_IN_PROMPT,
            exchange.scope,
            persona=exchange.persona,
        )

    async def _store_facts(
        self,
        job_id: int,
        exchange: Exchange,
        extracted: Extracted,
        known: dict[int, str | None],
    ) -> bool:
        """Store what was extracted; `known` holds the facts shown (id → the persona that
        keeps it, None: shared), the only ones it may replace or drop. True when the job was
        finished (deleted) with the facts, in their transaction."""
        cleaned: list[tuple[str, tuple[int, ...]]] = []
        seen: set[str] = set()
        for fact in extracted.facts:
            text = " ".join(fact.fact.split())[:MAX_FACT_CHARS]
            key = normalise(text)
            if not key or key in seen:
                continue
            seen.add(key)
            if self.vet is not None and not await self.vet(text, exchange):
                log.warning(
                    "an extracted fact about %s was refused by the guard", exchange.user_key
                )
                continue
            # only ids the model was shown, which are all this user's
            cleaned.append((text, tuple(i for i in fact.replaces if i in known)))
        drops = [i for i in extracted.drops if i in known]
        if drops:
            await self.store.drop(exchange.user_key, drops, job_id=job_id)
        if not cleaned:
            return False
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
        ids = await self._add(job_id, exchange, embedded.model, new, known)
        log.info("remembered %d new facts about %s", len(ids), exchange.user_key)
        return True

    async def _add(
        self,
        job_id: int,
        exchange: Exchange,
        model: str,
        new: list[NewFact],
        known: dict[int, str | None],
    ) -> list[int]:
        """Store new facts with their keeper: an update of a shared fact stays shared (it
        replaces what every persona recalled); the rest as the exchange says (its persona's
        own, or shared)."""
        groups: dict[str | None, list[NewFact]] = {}
        for item in new:
            shared = any(known[i] is None for i in item.replaces)
            groups.setdefault(None if shared else exchange.private_to, []).append(item)
        ids: list[int] = []
        for n, (keeper, facts) in enumerate(groups.items(), 1):
            ids += await self.store.add(
                exchange.user_key,
                facts,
                model=model,
                persona=exchange.persona,
                job_id=job_id,
                scope=exchange.scope,
                source_message_id=exchange.message_id,
                private_to=keeper,
                finish=n == len(groups),  # the job ends with the last group's transaction
            )
        return ids

    # ------------------------------------------------------------------ user control

    async def current(
        self, user_key: str, scope: str | None = None, persona: str | None = None
    ) -> list[MemoryRow]:
        """The user's current memories, those learned in `scope` when it is given, those
        `persona` recalls (the shared ones and its own) when it is given."""
        return await self.store.current(user_key, scope=scope, persona=persona)

    async def count(self, user_key: str) -> int:
        return await self.store.count(user_key)

    async def forget(self, user_key: str, memory_id: int | None = None) -> int:
        return await self.store.forget(user_key, memory_id)

    async def export(self, user_key: str, persona: str | None = None) -> list[dict[str, Any]]:
        """Everything kept about the user (superseded rows too); with `persona`, what that
        persona recalls: the shared facts and its own."""
        rows = await self.store.all_rows(user_key)
        return [r.as_json() for r in rows if persona is None or r.private_to in (None, persona)]

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
