"""Memory's learning half: exchanges queued in Postgres, facts extracted from them, compared
with what the user's persona already knows, vetted by the input guard, embedded and stored with
their keeper (bot/memory/service.py's `Memory` is this and recall).

A job row is written (already taken by this process) before extraction and deleted with the facts
it gave, so work cut short by a shutdown is picked up at the next start (`resume()`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from bot.core.calls import CallContext
from bot.errors import ModelUnavailable
from bot.memory.extract import MAX_FACT_CHARS, Extracted, Extractor, InvalidExtraction
from bot.memory.store import Exchange, Job, MemoryRow, MemoryStore, NewFact, normalise

if TYPE_CHECKING:
    from bot.memory.embeddings import Embeddings, Recorder

log = logging.getLogger(__name__)

Spawn = Callable[[Awaitable[None]], None]
# Judges a fact as the user's input would be (the guard, for the exchange's persona): True keeps it.
Vet = Callable[[str, Exchange], Awaitable[bool]]

_KNOWN_IN_PROMPT = 12  # the user's stored facts nearest the message, shown to the extractor
_LEASE_SECONDS = 300.0
_JOB_DAYS = 7  # a job whose model never answers is dropped after this many days


class Learning:
    """What `Memory` learns with; its attributes are set by `Memory.__init__`."""

    store: MemoryStore
    embeddings: Embeddings
    extractor: Extractor
    vet: Vet | None
    _gate: asyncio.Semaphore
    _queries: OrderedDict[tuple[str, str], tuple[str, list[float]]]
    _recorder: Callable[[CallContext], Recorder]  # Memory's: how an embedding call is written

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
