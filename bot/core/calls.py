"""Every model call, recorded in `model_calls`, so the ledger and benchmarks can build on it.

A call and its ledger row are written in one statement. A call waits `linger` seconds (50 ms)
for others before it is written, and the calls finished while a write is under way wait for
the next linger instead of going alone; then all of them go in together, still in one statement
(`Ledger.record_many_with`). A reply's calls (the embedding its recall made, then the model's
answer), and those of the replies answered in the same 50 ms, are then one round trip and one
commit, and with hundreds of replies in flight a few dozen round trips replace one per call.
Nobody waits on them: the engine records a reply's calls, and memory extraction its own, in
the engine's background; its `drain()` (shutdown, tests) enters `flushing`, which cuts the
linger to a few milliseconds. A crash loses at most the calls of that last moment, as it loses
a reply being written.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from bot.brains.base import CallStats, ChatRequest

if TYPE_CHECKING:
    from bot.spend.ledger import Ledger

log = logging.getLogger(__name__)

# seconds a call waits for others: a reply's embedding and answer, and the replies answered
# meanwhile, one statement (5 ms, one reply's calls, before the ninth session)
LINGER = 0.05
FLUSHING_LINGER = 0.005  # while draining: one reply's or one extraction's calls together


@dataclass(frozen=True)
class Charge:
    """A call's settled ledger row at the price in force (`Ledger.record_many_with`)."""

    kind: str
    provider: str
    model: str | None
    units: Decimal
    at: datetime.datetime
    user_key: str | None = None
    platform: str | None = None
    persona: str | None = None


@dataclass(frozen=True)
class CallContext:
    platform: str
    conversation_id: int | None
    user_key: str
    persona: str


class CallLog:
    def __init__(
        self,
        pool: Any,
        *,
        keep_prompts: bool = False,
        ledger: Ledger | None = None,
        linger: float = LINGER,
    ) -> None:
        self._pool = pool
        self._keep_prompts = keep_prompts
        self._ledger = ledger  # every call's tokens become a ledger row (issue 7)
        self.linger = linger  # seconds a call waits for others to be written with
        self._waiting: list[_Waiting] = []  # calls to write once the write under way ends
        self._writer: asyncio.Task[None] | None = None
        self._flushing = 0  # while above 0, calls linger a few ms only
        self._hurry: asyncio.Event | None = None  # set: the lingering writer writes now

    @contextlib.contextmanager
    def flushing(self) -> Iterator[None]:
        """While it lasts, calls wait a few ms for others instead of `linger`, and the ones
        lingering now are written within those few ms."""
        self._flushing += 1
        if self._hurry is not None:
            self._hurry.set()
        try:
            yield
        finally:
            self._flushing -= 1

    async def record(
        self,
        context: CallContext,
        request: ChatRequest,
        *,
        backend: str,
        stats: CallStats | None,
        error: str | None = None,
        purpose: str = "chat",
    ) -> None:
        prompt = json.dumps(request.messages) if self._keep_prompts else None
        if self._keep_prompts:
            log.debug("prompt for %s/%s: %s", context.persona, context.user_key, prompt)
        values = (
            purpose,
            backend,
            stats.model if stats else request.model,
            context.platform,
            context.conversation_id,
            context.user_key,
            context.persona,
            json.dumps(request.options()),
            stats.prompt_tokens if stats else None,
            stats.completion_tokens if stats else None,
            stats.total_ms if stats else None,
            stats.load_ms if stats else None,
            stats.prompt_eval_ms if stats else None,
            stats.eval_ms if stats else None,
            error is None,
            error,
            prompt,
        )
        if self._ledger is None or stats is None:
            await self._pool.execute(_INSERT, *values)
        elif stats.priced:
            call_id = await self._pool.fetchval(_INSERT + " RETURNING id", *values)
            await self._charge_priced(self._ledger, context, stats, purpose, call_id)
        else:  # the call and its ledger row in one statement, with others written meanwhile
            units = Decimal((stats.prompt_tokens or 0) + (stats.completion_tokens or 0))
            charge = Charge(
                at=self._ledger.now(),  # the ledger's clock, as its other rows
                kind=_kind(purpose),
                provider=stats.backend,
                model=stats.model,
                units=units,
                user_key=context.user_key,
                platform=context.platform,
                persona=context.persona,
            )
            await self._charged(self._ledger, values, charge)

    async def _charged(self, ledger: Ledger, values: tuple[Any, ...], charge: Charge) -> None:
        """Written after the linger with the calls that came meanwhile; returns when this
        call's rows are in (raises what their write raised)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(values, charge, done))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(ledger))
        await done

    async def _write(self, ledger: Ledger) -> None:
        """Linger, then write all that waits (`_BATCH` a statement); the calls that came
        during the writes linger in their turn."""
        batch: list[_Waiting] = []
        taken: list[_Waiting] = []
        try:
            while self._waiting:
                if self.linger > 0:
                    await self._linger()
                taken, self._waiting = self._waiting, []
                while taken:
                    batch, taken = taken[:_BATCH], taken[_BATCH:]
                    await self._write_batch(ledger, batch)
        finally:
            self._writer = None
            for left in [*batch, *taken, *self._waiting]:  # cancelled: nobody waits forever
                if not left.done.done():
                    left.done.cancel()
            self._waiting = []

    async def _linger(self) -> None:
        """`linger` seconds, or a few ms once `flushing` begins."""
        self._hurry = asyncio.Event()
        try:
            if not self._flushing:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.linger):
                        await self._hurry.wait()
            if self._flushing:
                await asyncio.sleep(min(self.linger, FLUSHING_LINGER))
        finally:
            self._hurry = None

    async def _write_batch(self, ledger: Ledger, batch: list[_Waiting]) -> None:
        if len(batch) > 1:
            try:
                await ledger.record_many_with(
                    _ROWS, _INSERT_ROWS, _columns(batch), [w.charge for w in batch],
                    request_prefix="model_call:",
                )  # fmt: skip
            except Exception:
                log.warning("%d model calls written together failed; one by one", len(batch))
            else:
                for waiting in batch:
                    waiting.settle(None)
                return
        for waiting in batch:  # alone, or each of a batch that failed (one bad row)
            try:
                await ledger.record_with(
                    _INSERT + " RETURNING id",
                    waiting.values,
                    kind=waiting.charge.kind,
                    provider=waiting.charge.provider,
                    model=waiting.charge.model,
                    units=waiting.charge.units,
                    request_prefix="model_call:",
                    user_key=waiting.charge.user_key,
                    platform=waiting.charge.platform,
                    persona=waiting.charge.persona,
                )
            except Exception as exc:
                waiting.settle(exc)
            else:
                waiting.settle(None)

    @staticmethod
    async def _charge_priced(
        ledger: Ledger, context: CallContext, stats: CallStats, purpose: str, call_id: int
    ) -> None:
        """A call a backend billed per token: input and output at their own prices."""
        for part, units, price in (
            ("input", stats.prompt_tokens, stats.usd_per_input_token),
            ("output", stats.completion_tokens, stats.usd_per_output_token),
        ):
            await ledger.record(
                kind=_kind(purpose),
                provider=stats.backend,
                model=stats.model,
                units=Decimal(units or 0),
                unit_price=price or Decimal(0),
                request_id=f"model_call:{call_id}:{part}",
                user_key=context.user_key,
                platform=context.platform,
                persona=context.persona,
            )


_INSERT = (
    "INSERT INTO model_calls (purpose, backend, model, platform, conversation_id,"
    " user_key, persona, options, prompt_tokens, completion_tokens, total_ms, load_ms,"
    " prompt_eval_ms, eval_ms, ok, error, prompt)"
    " VALUES ($1,$2,$3,$4,$5,$6,$7,$8::jsonb,$9,$10,$11,$12,$13,$14,$15,$16,$17::jsonb)"
)


_BATCH = 500  # calls in one statement at most
_COLUMNS = (
    "purpose, backend, model, platform, conversation_id, user_key, persona, options,"
    " prompt_tokens, completion_tokens, total_ms, load_ms, prompt_eval_ms, eval_ms, ok, error,"
    " prompt"
)
# the calls of a batch, an id each (taken before the INSERT, so each ledger row finds its call)
_ROWS = (
    "SELECT nextval(pg_get_serial_sequence('model_calls', 'id')) AS id, t.*"
    " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[],"
    " $7::text[], $8::jsonb[], $9::int[], $10::int[], $11::float8[], $12::float8[],"
    " $13::float8[], $14::float8[], $15::bool[], $16::text[], $17::jsonb[]) WITH ORDINALITY"
    f" AS t({_COLUMNS}, n)"
)
_INSERT_ROWS = f"INSERT INTO model_calls (id, {_COLUMNS}) SELECT id, {_COLUMNS} FROM input"


@dataclass(frozen=True)
class _Waiting:
    values: tuple[Any, ...]  # the model_calls row, as `_INSERT` takes it
    charge: Charge
    done: asyncio.Future[None]

    def settle(self, error: BaseException | None) -> None:
        if self.done.done():  # its caller was cancelled: the row is written all the same
            return
        if error is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(error)


def _columns(batch: list[_Waiting]) -> list[list[Any]]:
    """The batch's model_calls rows as one array per column, for `_ROWS`."""
    return [list(column) for column in zip(*(w.values for w in batch), strict=True)]


def _kind(purpose: str) -> str:
    """The ledger kind of a call's tokens: unit price from the price table, 0 for our own."""
    if "embed" in purpose:
        return "embed_tokens"
    if "guard" in purpose or "moderat" in purpose:
        return "moderation_tokens"
    return "chat_tokens"
