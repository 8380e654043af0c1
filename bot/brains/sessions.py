"""GPU time on the books: every wake-to-stop interval of a backend, priced.

Each interval is a row in `backend_sessions` (migration 0005) and, when the spend ledger is
wired, a settled `gpu_seconds` row in it (provider = backend name, idempotent on
`backend-session:<id>`). Rows written before the ledger existed are pushed to it by
`push_pending()`, so nothing is lost while the ledger lands.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Session:
    backend: str
    started: datetime
    stopped: datetime
    seconds: Decimal
    usd_per_second: Decimal
    reason: str = "idle"

    @property
    def cost(self) -> Decimal:
        return self.seconds * self.usd_per_second


class SessionSink(Protocol):
    async def record(self, session: Session) -> None: ...


class MemorySessions:
    """Keeps sessions in a list: for the cost simulator and for pools without a database."""

    def __init__(self) -> None:
        self.sessions: list[Session] = []

    async def record(self, session: Session) -> None:
        self.sessions.append(session)


class SessionBook:
    def __init__(self, db: Any, ledger: Any | None = None) -> None:
        self._db = db
        self.ledger = ledger

    async def record(self, session: Session) -> None:
        row_id = await self._db.fetchval(
            "INSERT INTO backend_sessions (backend, started_at, stopped_at, gpu_seconds,"
            " usd_per_second, cost_usd, reason) VALUES ($1,$2,$3,$4,$5,$6,$7) RETURNING id",
            session.backend,
            session.started,
            session.stopped,
            session.seconds,
            session.usd_per_second,
            session.cost,
            session.reason,
        )
        log.info(
            "%s was up %.1fs (%s): $%s",
            session.backend,
            session.seconds,
            session.reason,
            round(session.cost, 6),
        )
        if self.ledger is not None:
            await self._to_ledger(self.ledger, row_id, session)

    async def _to_ledger(self, ledger: Any, row_id: int, session: Session) -> None:
        await ledger.record(
            kind="gpu_seconds",
            provider=session.backend,
            model=None,
            units=session.seconds,
            unit_price=session.usd_per_second,
            request_id=f"backend-session:{row_id}",
            at=session.stopped,
        )
        await self._db.execute("UPDATE backend_sessions SET ledgered = true WHERE id = $1", row_id)

    async def push_pending(self) -> None:
        """Send sessions the ledger has not got yet (it was missing, or a write failed)."""
        if self.ledger is None:
            return
        rows = await self._db.fetch("SELECT * FROM backend_sessions WHERE NOT ledgered ORDER BY id")
        for row in rows:
            session = Session(
                row["backend"],
                row["started_at"],
                row["stopped_at"],
                row["gpu_seconds"],
                row["usd_per_second"],
                row["reason"],
            )
            await self._to_ledger(self.ledger, row["id"], session)
        if rows:
            log.warning("booked %d earlier backend sessions in the ledger", len(rows))
