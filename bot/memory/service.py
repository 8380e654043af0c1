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

The learning half (jobs, extraction, storing facts) is bot/memory/learning.py; a job row is
written before extraction and deleted after it, so work cut short by a shutdown is picked up at
the next start (`resume()`). The schema is bounded (`maxLength` on a fact,
`maxItems` on the lists) so constrained decoding ends inside `_EXTRACTION_TOKENS`; the valid facts
of a partly invalid answer are kept, ids that are not among the user's facts shown are ignored,
and an answer that is not JSON of the schema at all is retried once, then dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from bot.brains.base import CallStats, ChatRequest
from bot.brains.supervisor import OnFailure
from bot.config import Settings
from bot.core.calls import CallContext, CallLog
from bot.core.personas import Persona
from bot.core.ports import EarlyEmbedding
from bot.core.together import Together
from bot.memory.embeddings import (
    EmbedCall,
    Embedded,
    Embedder,
    Embeddings,
    LocalEmbedder,
    OllamaEmbedder,
    Recorder,
)
from bot.memory.extract import (
    EXTRACTION_SCHEMA,
    Extractor,
    InvalidExtraction,
)
from bot.memory.known import KnownModels
from bot.memory.learning import Learning, Spawn, Vet
from bot.memory.store import (
    MemoryRow,
    MemoryStore,
    RecallAsk,
    Recalled,
)


class _Early:
    """`Memory.embed_early`'s embedding under way, and its calls, kept to be recorded."""

    def __init__(self, user_key: str, text: str, embeddings: Embeddings) -> None:
        self.user_key = user_key
        self.text = text
        self.calls: list[tuple[EmbedCall, Sequence[str]]] = []
        self.task: asyncio.Future[Embedded] = asyncio.ensure_future(
            embeddings.embed([text], record=self._keep)
        )

    async def _keep(self, call: EmbedCall, texts: Sequence[str]) -> None:
        self.calls.append((call, texts))


__all__ = ["EXTRACTION_SCHEMA", "Extractor", "InvalidExtraction", "Memory", "build_memory"]

log = logging.getLogger(__name__)

_REEMBED_BATCH = 32
_KEPT_QUERIES = 256  # recall's embeddings of messages, kept for their extraction
_ASKED_TOGETHER = 256  # the most users one "which models" query asks about
_RECALLS_TOGETHER = 64  # the most recalls one statement makes
_QUEUED_TOGETHER = 256  # the most memory jobs one statement queues


class Memory(Learning):
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
        defer: float = 0.0,
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
        self.quiet = None  # the engine's wait for a moment without replies (set by the app)
        self.spawn = None  # where extraction's call records are written (the engine's, by the app)
        self.defer = defer
        self._waiting = {}
        # (user key, message) -> (model, vector): the message recall embedded, which its
        # extraction compares the user's facts with, so it is embedded once (issue 22)
        self._queries: OrderedDict[tuple[str, str], tuple[str, list[float]]] = OrderedDict()
        self.known = KnownModels()  # which models users' memories have, between messages
        self._asking: Together[tuple[str, str | None], list[str]] = Together(
            self.store.models_of_many,
            most=_ASKED_TOGETHER,
            alone=lambda asked: self.store.models_of(*asked),
        )
        # the recall queries of replies made while one is out, in one statement
        self._recalls: Together[RecallAsk, list[Recalled]] = Together(
            self._recall_many, most=_RECALLS_TOGETHER, alone=self._recall_one
        )
        # the jobs of exchanges answered while one is being queued, in one statement (each
        # alone when that fails: one bad row must not lose the others)
        self._queueing = Together(
            self._enqueue_many,
            most=_QUEUED_TOGETHER,
            alone=self._enqueue_one,
            retry_alone="memory jobs",
        )
        # memory id -> (user key, when): recall stamps waiting to be written together
        self._stamps: dict[int, tuple[str, datetime]] = {}
        self._stamping = False  # a write of them is waiting for a quiet moment

    async def _recall_one(self, ask: RecallAsk) -> list[Recalled]:
        return await self.store.recall(
            ask.user_key,
            ask.vector,
            ask.model,
            top_k=self.top_k,
            floor=self.min_similarity,
            recency_weight=self.recency_weight,
            half_life_days=self.half_life_days,
            scope=ask.scope,
            persona=ask.persona,
        )

    async def _recall_many(self, asked: list[RecallAsk]) -> list[list[Recalled]]:
        return await self.store.recall_many(
            asked,
            top_k=self.top_k,
            floor=self.min_similarity,
            recency_weight=self.recency_weight,
            half_life_days=self.half_life_days,
        )

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
        early: EarlyEmbedding | None = None,
    ) -> list[Recalled]:
        """The speaking user's memories most related to `text`, learned in `scope` (None: in
        any), the shared ones and those private to `persona` (None: all); never raises. With
        `spawn` (the engine's), the call record is written in the background, off the reply's
        path. With `early` (`embed_early` of the same user and text), its embedding is used
        instead of asking again; its calls are recorded by `settle_early`."""
        try:
            kept = self.known.get(user_key, scope)
            models = kept if kept is not None else await self._models_of(user_key, scope)
            if not models:
                return []
            if isinstance(early, _Early) and (early.user_key, early.text) == (user_key, text):
                embedded = await early.task
            else:
                record = self._recorder(context, spawn)
                embedded = await self.embeddings.embed([text], record=record)
            if embedded.model not in models and kept is not None:
                # another model answered (Ollama down: the local one), or the memories moved
                # to another model in another process: what was kept may be out of date
                models = await self._models_of(user_key, scope)
            if embedded.model not in models:
                return []  # no rows of this model: vectors of other models are not comparable
            self._queries[(user_key, text)] = (embedded.model, embedded.vectors[0])
            if len(self._queries) > _KEPT_QUERIES:
                self._queries.popitem(last=False)
            found = await self._recalls(
                RecallAsk(user_key, embedded.vectors[0], embedded.model, scope, persona)
            )
            if found:
                await self._recalled(user_key, found, spawn)
            return found
        except Exception as exc:
            log.warning("memory recall for %s failed: %s", user_key, type(exc).__name__)
            return []

    def embed_early(self, user_key: str, text: str, scope: str | None) -> _Early | None:
        """Start embedding a message before its reply has read its conversation (and so knows
        its persona), when recall will want it: the speaker is known here to have memories in
        the place. Recall then waits only for what is left of it. Its calls are recorded, with
        the reply's context, by `settle_early`, used or not (a persona without memory)."""
        if not self.enabled or not self.known.get(user_key, scope):
            return None
        return _Early(user_key, text, self.embeddings)

    def settle_early(self, early: EarlyEmbedding, context: CallContext, spawn: Spawn) -> None:
        """Record an early embedding's calls under the reply's context, in the background once
        it has ended (its failure is recall's to report, or nobody's when nothing used it)."""
        if isinstance(early, _Early):
            spawn(self._settle(early, context))

    async def _settle(self, early: _Early, context: CallContext) -> None:
        await asyncio.wait([early.task])
        if not early.task.cancelled():
            early.task.exception()  # retrieved, not raised
        record = self._recorder(context)
        calls, early.calls = early.calls, []
        for call, texts in calls:
            await record(call, texts)

    async def _recalled(self, user_key: str, found: list[Recalled], spawn: Spawn | None) -> None:
        """Stamp what recall found (`last_recalled_at`). With `spawn` (the engine's), the
        stamps wait, like extraction, for a moment without replies (`defer` seconds at most)
        and go in together, one statement for all the recalls made meanwhile."""
        at = datetime.now(UTC)
        for memory in found:
            self._stamps[memory.id] = (user_key, at)
        if spawn is None:
            await self.stamp()
        elif not self._stamping:
            self._stamping = True
            spawn(self._stamp_when_quiet())

    async def _stamp_when_quiet(self) -> None:
        try:
            await self._quiet_moment()
        finally:  # stamps made from here on start another wait
            self._stamping = False
        await self.stamp()

    async def stamp(self) -> None:
        """Write the recall stamps waiting (a failed write loses only those)."""
        stamps, self._stamps = self._stamps, {}
        if stamps:
            await self.store.touch(stamps)

    async def _models_of(self, user_key: str, scope: str | None) -> list[str]:
        """Asked of the database: recalls made while another's question is out go together
        (`Together`: one query for a burst's users)."""
        version = self.known.version()  # read before the query: a write after it is seen
        models = await self._asking((user_key, scope))
        self.known.put(user_key, scope, models, version)
        return models

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
        try:
            return await self.store.forget(user_key, memory_id)
        finally:
            self.known.forget(user_key)

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
            self.known.forget()
            moved += len(rows)
        return model, moved

    async def aclose(self) -> None:
        await self._asking.aclose()
        await self._recalls.aclose()
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
        defer=settings.memory_defer_seconds,
    )
