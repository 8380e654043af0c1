"""Memory's learning half: exchanges queued in Postgres, facts extracted from them, compared
with what the user's persona already knows, vetted by the input guard, embedded and stored with
their keeper (bot/memory/service.py's `Memory` is this and recall).

A job row is written (already taken by this process) before extraction and deleted with the facts
it gave, so work cut short by a shutdown is picked up at the next start (`resume()`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from bot.core.calls import CallContext
from bot.core.together import Together
from bot.errors import ModelUnavailable
from bot.memory.extract import MAX_BATCH, MAX_FACT_CHARS, Extracted, Extractor, InvalidExtraction
from bot.memory.known import KnownModels
from bot.memory.store import Exchange, Job, MemoryRow, MemoryStore, NewFact, normalise

if TYPE_CHECKING:
    from bot.memory.embeddings import Embeddings, Recorder

log = logging.getLogger(__name__)

Spawn = Callable[[Awaitable[None]], None]
# Judges a fact as the user's input would be (the guard, for the exchange's persona): True keeps it.
Vet = Callable[[str, Exchange], Awaitable[bool]]

# One user's exchanges with one persona in one place, kept by the same persona (or shared),
# with the same model: what can be extracted in one call.
_BatchKey = tuple[str, str, str | None, str | None, str]

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
    # Waits for a moment without replies, at most the seconds given (the engine's Quiet.wait,
    # set by the app); None: extraction starts at once.
    quiet: Callable[[float], Awaitable[None]] | None
    # Writes extraction's call records in the background (the engine's spawn, set by the app);
    # None: each is awaited (the call log's linger with it)
    spawn: Spawn | None
    defer: float  # the most seconds an exchange waits for that moment
    _waiting: dict[_BatchKey, list[int]]  # jobs waiting to be extracted together
    _queries: OrderedDict[tuple[str, str], tuple[str, list[float]]]
    known: KnownModels  # which models users' memories have (forgotten here on each write)
    # the jobs of exchanges answered at once, queued together (`Memory.__init__`)
    _queueing: Together[Exchange, Job]
    # Memory's: how an embedding call is written (in the background with a spawn)
    _recorder: Callable[[CallContext, Spawn | None], Recorder]

    async def message_deleted(self, message_rows: list[int]) -> int:
        """Messages deleted on their platform: their pending extraction stops and the facts
        drawn only from them are deleted; returns how many facts went."""
        try:
            return await self.store.message_deleted(message_rows)
        finally:
            self.known.forget()

    async def message_edited(
        self,
        message_rows: list[int],
        text: str,
        model_of: Callable[[str], str | None] | None = None,
    ) -> None:
        """Messages edited on their platform: a pending extraction reads the new text; the
        facts already drawn from the old text are drawn again from the new one (in the
        background, as after a reply, read as they are then; `MemoryStore.message_edited`)."""
        try:
            jobs = await self.store.message_edited(message_rows, text, model_of, _LEASE_SECONDS)
        finally:
            self.known.forget()
        for job in jobs:
            work = self._run([job.id])
            if self.spawn is not None:
                self.spawn(work)
            else:
                await work

    async def remember(self, exchange: Exchange) -> None:
        """Queue the exchange in Postgres, taken by this process in the same statement, then
        extract from it (call in the background). With `quiet` (the engine's), extraction waits
        for a moment without replies, `defer` seconds at most, and the user's next messages to
        the same persona in the same place join the same call (MAX_BATCH at most): one model
        call for a burst of messages instead of one each, made when it slows no one's reply."""
        job = await self._queueing(exchange)
        key = _batch_key(exchange)
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.append(job.id)  # the first message of the batch extracts it
            return
        self._waiting[key] = waiting = [job.id]
        try:
            await self._quiet_moment()
        finally:  # cancelled (shutdown): the jobs stay queued for the next start
            del self._waiting[key]
        for start in range(0, len(waiting), MAX_BATCH):
            await self._run(waiting[start : start + MAX_BATCH])

    async def _enqueue_one(self, exchange: Exchange) -> Job:
        return await self.store.enqueue_held(exchange, _LEASE_SECONDS)

    async def _enqueue_many(self, exchanges: list[Exchange]) -> list[Job]:
        return await self.store.enqueue_held_many(exchanges, _LEASE_SECONDS)

    async def _quiet_moment(self) -> None:
        """Until a moment without replies, `defer` seconds at most; without `quiet`, or with
        `defer` 0, at once (nothing else runs meanwhile, so nothing joins a batch)."""
        if self.quiet is not None and self.defer > 0:
            await self.quiet(self.defer)

    async def _run(self, job_ids: list[int]) -> None:
        """Extract from jobs this process queued, as they are now (edited, or gone)."""
        async with self._gate:
            jobs = await self.store.retake(job_ids, _LEASE_SECONDS)
            if jobs:
                await self._extract(jobs)

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
                await self._extract([job])

    async def _extract(self, jobs: list[Job]) -> None:
        """Extract from jobs this process holds, one user's with one persona in one place, in
        one call; finished, or given back for later."""
        exchanges = [job.exchange for job in jobs]
        ids = [job.id for job in jobs]
        try:
            known = await self._nearest(exchanges)
        except ModelUnavailable as exc:
            log.warning("memory extraction postponed (%s); jobs %s kept", exc, ids)
            await self.store.release(ids)
            return
        request = self.extractor.request(exchanges, known)
        keepers = {m.id: m.private_to for m in known}
        for attempt in range(max(job.attempts for job in jobs), 2):
            try:
                extracted = await self.extractor.extract(exchanges, request)
                finished = await self._store_facts(jobs, extracted, keepers)
            except ModelUnavailable as exc:
                log.warning("memory extraction postponed (%s); jobs %s kept", exc, ids)
                await self.store.release(ids)
                return
            except InvalidExtraction as exc:
                log.warning("memory extraction attempt %d invalid: %s", attempt + 1, exc)
                await self.store.count_attempt(ids)
                continue
            left = [i for i in ids if i not in finished]
            if left:
                await self.store.finish(left)
            return
        log.error("memory extraction for jobs %s gave invalid output twice; dropped", ids)
        await self.store.finish(ids)

    async def _nearest(self, exchanges: list[Exchange]) -> list[MemoryRow]:
        """The user's current facts the persona sees, nearest the messages by meaning (their
        stored embeddings; for several messages, nearest their mean), to compare the new facts
        with; the newest ones when the messages cannot be embedded with a model the facts were
        embedded with. The vectors recall made of the messages are used when this process still
        has them (one embedding call a message, not two)."""
        last = exchanges[-1]
        # recall embedded a message only if the user had facts of that model
        kept = [self._queries.pop((e.user_key, e.message), None) for e in exchanges]
        found = [k for k in kept if k is not None]
        if found:
            model = found[-1][0]
            vectors = [vector for of, vector in found if of == model]
        else:
            models = await self.store.models_of(last.user_key)
            if not models:
                return []
            context = CallContext(last.platform, last.conversation_id, last.user_key, last.persona)
            embedded = await self.embeddings.embed(
                [e.message for e in exchanges], record=self._recorder(context, self.spawn)
            )
            if embedded.model not in models:
                return await self.store.recent(last.user_key, _KNOWN_IN_PROMPT, last.persona)
            model, vectors = embedded.model, embedded.vectors
        return await self.store.nearest(
            last.user_key,
            _mean(vectors),
            model,
            _KNOWN_IN_PROMPT,
            last.scope,
            persona=last.persona,
        )

    async def _store_facts(
        self,
        jobs: list[Job],
        extracted: Extracted,
        known: dict[int, str | None],
    ) -> set[int]:
        """Store what was extracted, each fact with the job of the message it comes from;
        `known` holds the facts shown (id → the persona that keeps it, None: shared), the only
        ones it may replace or drop. Returns the jobs finished (deleted) with their facts, in
        their transaction."""
        last = jobs[-1].exchange
        cleaned: list[tuple[str, tuple[int, ...], Job]] = []
        seen: set[str] = set()
        for fact, source in zip(extracted.facts, extracted.sources, strict=True):
            text = " ".join(fact.fact.split())[:MAX_FACT_CHARS]
            key = normalise(text)
            if not key or key in seen:
                continue
            seen.add(key)
            job = jobs[source - 1]
            if self.vet is not None and not await self.vet(text, job.exchange):
                log.warning("an extracted fact about %s was refused by the guard", last.user_key)
                continue
            # only ids the model was shown, which are all this user's
            cleaned.append((text, tuple(i for i in fact.replaces if i in known), job))
        drops = [i for i in extracted.drops if i in known]
        if drops:
            await self.store.drop(last.user_key, drops, job_id=jobs[-1].id)
            self.known.forget(last.user_key)
        if not cleaned:
            return set()
        context = CallContext(last.platform, last.conversation_id, last.user_key, last.persona)
        embedded = await self.embeddings.embed(
            [text for text, _, _ in cleaned], record=self._recorder(context, self.spawn)
        )
        by_job: dict[int, tuple[Job, list[NewFact]]] = {}
        for (text, replaces, job), vector in zip(cleaned, embedded.vectors, strict=True):
            by_job.setdefault(job.id, (job, []))[1].append(NewFact(text, vector, replaces))
        stored = 0
        for job, new in by_job.values():
            stored += len(await self._add(job.id, job.exchange, embedded.model, new, known))
        log.info("remembered %d new facts about %s", stored, last.user_key)
        return set(by_job)

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
        try:
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
        finally:  # after the write: an answer read before it is not kept
            self.known.forget(exchange.user_key)
        return ids


def _batch_key(exchange: Exchange) -> _BatchKey:
    """Exchanges extracted together: never two users' (a fact must not land on the wrong
    person), never two personas' or places' (each keeps its own)."""
    return (
        exchange.user_key,
        exchange.persona,
        exchange.scope,
        exchange.private_to,
        exchange.model,
    )


def _mean(vectors: list[list[float]]) -> list[float]:
    if len(vectors) == 1:
        return vectors[0]
    return [sum(column) / len(vectors) for column in zip(*vectors, strict=True)]
