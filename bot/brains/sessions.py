"""GPU time on the books, and who holds a machine: backend sessions and leases.

A session is one wake-to-stop interval of a backend. It is opened when a machine is woken (or
found up) and closed when it is stopped; while it is open there is exactly one per backend,
shared by every process that uses the machine, so an interval is booked once however many
processes (`bot run` beside `bot chat`, replicas) send it requests.

A lease is a request in flight on a backend, counted per process. A machine is stopped only
by a process that first *claims* its open session (`claim`), which succeeds only when no live
process holds a lease on it (and, for the idle check, nobody used it lately). A process renews
its leases while it runs; the leases of a process that died expire after `LEASE_TTL` seconds.

GPU time is booked while the machine is up: `book()` (a scheduled job, every minute) writes
the time since the last increment to the ledger as a settled `gpu_seconds` row, idempotent on
`backend-session:<id>:<start of the increment, epoch ms>`; `close()` books the last one. A crash
loses at most the increment under way, which `push_pending()` books at the next start.

`SessionBook` keeps all this in PostgreSQL (migrations 0005, 0011); `MemorySessions` keeps it in
memory, for one process without a database (the cost simulator).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

log = logging.getLogger(__name__)

LEASE_TTL = 120.0  # seconds: a lease not renewed for this long belongs to a dead process
_MS = Decimal("0.001")


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


def _seconds(start: datetime, end: datetime) -> Decimal:
    return Decimal(max(0.0, (end - start).total_seconds())).quantize(_MS)


class SessionStore(Protocol):
    async def open(self, backend: str, usd_per_second: Decimal, at: datetime) -> None:
        """Open the backend's session at `at`, or join the one already open."""
        ...

    async def state(self, backend: str) -> str:
        """'open', 'stopping' (a process claimed it and is stopping it) or 'closed'."""
        ...

    async def hold(self, backend: str, holder: str, delta: int, at: datetime) -> str:
        """Add `delta` to `holder`'s leases on `backend`; returns the session's state, read
        under the same lock as `claim`, so a machine being stopped is never used."""
        ...

    async def renew(self, holder: str, at: datetime, backends: list[str]) -> None:
        """`holder` is alive and still has requests in flight on `backends`."""
        ...

    async def claim(
        self, backend: str, holder: str, at: datetime, idle_since: datetime | None
    ) -> bool:
        """Claim the open session for stopping: only if no other live process holds a lease
        on it (the caller counts its own) and, with `idle_since`, nobody used it since."""
        ...

    async def unclaim(self, backend: str, holder: str) -> None: ...

    async def close(self, backend: str, at: datetime, reason: str) -> Session | None: ...

    async def book(self, at: datetime) -> int:
        """Book the open sessions' GPU time up to `at`; returns the increments written."""
        ...

    async def forget(self, holder: str) -> None:
        """The process ends: its leases go."""
        ...


@dataclass
class _Open:
    started: datetime
    usd_per_second: Decimal
    last_used: datetime
    stopping_by: str | None = None


class MemorySessions:
    """Sessions and leases in memory: one process, no database (the cost simulator)."""

    def __init__(self) -> None:
        self.sessions: list[Session] = []  # closed sessions, in order
        self._open: dict[str, _Open] = {}
        self._leases: dict[tuple[str, str], int] = {}

    async def open(self, backend: str, usd_per_second: Decimal, at: datetime) -> None:
        self._open.setdefault(backend, _Open(at, usd_per_second, at))

    async def state(self, backend: str) -> str:
        session = self._open.get(backend)
        if session is None:
            return "closed"
        return "stopping" if session.stopping_by else "open"

    async def hold(self, backend: str, holder: str, delta: int, at: datetime) -> str:
        key = (backend, holder)
        self._leases[key] = max(0, self._leases.get(key, 0) + delta)
        session = self._open.get(backend)
        if session is not None:
            session.last_used = max(session.last_used, at)
        return await self.state(backend)

    async def renew(self, holder: str, at: datetime, backends: list[str]) -> None:
        return None

    async def claim(
        self, backend: str, holder: str, at: datetime, idle_since: datetime | None
    ) -> bool:
        session = self._open.get(backend)
        if session is None or session.stopping_by is not None:
            return False
        if idle_since is not None and session.last_used > idle_since:
            return False
        if any(n and b == backend and h != holder for (b, h), n in self._leases.items()):
            return False
        session.stopping_by = holder
        return True

    async def unclaim(self, backend: str, holder: str) -> None:
        session = self._open.get(backend)
        if session is not None and session.stopping_by == holder:
            session.stopping_by = None

    async def close(self, backend: str, at: datetime, reason: str) -> Session | None:
        session = self._open.pop(backend, None)
        if session is None:
            return None
        seconds = _seconds(session.started, at)
        closed = Session(backend, session.started, at, seconds, session.usd_per_second, reason)
        self.sessions.append(closed)
        return closed

    async def book(self, at: datetime) -> int:
        return 0

    async def forget(self, holder: str) -> None:
        for key in [k for k in self._leases if k[1] == holder]:
            del self._leases[key]


_LOCK = "SELECT pg_advisory_xact_lock(7311016, hashtext($1))"  # one backend's leases and stop
_STATE = (
    "SELECT CASE WHEN stopping_by IS NULL THEN 'open' ELSE 'stopping' END"
    " FROM backend_sessions WHERE backend = $1 AND stopped_at IS NULL"
)


class SessionBook:
    """Sessions and leases in PostgreSQL, GPU time in the spend ledger."""

    def __init__(self, db: Any, ledger: Any | None = None) -> None:
        self._db = db
        self.ledger = ledger

    async def open(self, backend: str, usd_per_second: Decimal, at: datetime) -> None:
        await self._db.execute(
            "INSERT INTO backend_sessions (backend, started_at, usd_per_second, last_used)"
            " VALUES ($1, $2, $3, $2) ON CONFLICT (backend) WHERE stopped_at IS NULL DO NOTHING",
            backend,
            at,
            usd_per_second,
        )

    async def state(self, backend: str) -> str:
        return str(await self._db.fetchval(_STATE, backend) or "closed")

    async def hold(self, backend: str, holder: str, delta: int, at: datetime) -> str:
        async with self._db.acquire() as conn, conn.transaction():
            await conn.execute(_LOCK, backend)
            await conn.execute(
                "INSERT INTO backend_leases AS l (backend, holder, in_flight, renewed_at)"
                " VALUES ($1, $2, GREATEST($3, 0), $4) ON CONFLICT (backend, holder) DO UPDATE"
                " SET in_flight = GREATEST(l.in_flight + $3, 0), renewed_at = $4",
                backend,
                holder,
                delta,
                at,
            )
            await conn.execute(
                "UPDATE backend_sessions SET last_used = GREATEST(last_used, $2)"
                " WHERE backend = $1 AND stopped_at IS NULL",
                backend,
                at,
            )
            return str(await conn.fetchval(_STATE, backend) or "closed")

    async def renew(self, holder: str, at: datetime, backends: list[str]) -> None:
        await self._db.execute(
            "UPDATE backend_leases SET renewed_at = $2"
            " WHERE holder = $1 AND in_flight > 0 AND backend = ANY($3::text[])",
            holder,
            at,
            backends,
        )

    async def claim(
        self, backend: str, holder: str, at: datetime, idle_since: datetime | None
    ) -> bool:
        live = at - timedelta(seconds=LEASE_TTL)
        async with self._db.acquire() as conn, conn.transaction():
            await conn.execute(_LOCK, backend)
            claimed = await conn.fetchval(
                "UPDATE backend_sessions s SET stopping_by = $2"
                " WHERE backend = $1 AND stopped_at IS NULL AND stopping_by IS NULL"
                " AND ($4::timestamptz IS NULL OR last_used <= $4)"
                " AND NOT EXISTS (SELECT 1 FROM backend_leases l WHERE l.backend = $1"
                "   AND l.holder <> $2 AND l.in_flight > 0 AND l.renewed_at > $3)"
                " RETURNING id",
                backend,
                holder,
                live,
                idle_since,
            )
        return claimed is not None

    async def unclaim(self, backend: str, holder: str) -> None:
        await self._db.execute(
            "UPDATE backend_sessions SET stopping_by = NULL"
            " WHERE backend = $1 AND stopped_at IS NULL AND stopping_by = $2",
            backend,
            holder,
        )

    async def close(self, backend: str, at: datetime, reason: str) -> Session | None:
        row = await self._db.fetchrow(
            "UPDATE backend_sessions SET stopped_at = GREATEST($2, started_at), reason = $3,"
            " gpu_seconds = round(extract(epoch FROM GREATEST($2, started_at) - started_at), 3),"
            " cost_usd = round(extract(epoch FROM GREATEST($2, started_at) - started_at), 3)"
            "   * usd_per_second"
            " WHERE backend = $1 AND stopped_at IS NULL RETURNING *",
            backend,
            at,
            reason,
        )
        if row is None:
            return None
        session = Session(
            backend,
            row["started_at"],
            row["stopped_at"],
            row["gpu_seconds"],
            row["usd_per_second"],
            reason,
        )
        log.info(
            "%s was up %.1fs (%s): $%s", backend, session.seconds, reason, round(session.cost, 6)
        )
        if self.ledger is not None:
            try:
                await self._book_row(row, row["stopped_at"], final=True)
            except Exception:  # push_pending() books it at the next start
                log.exception("could not book %s's last %s GPU time", backend, reason)
        return session

    async def book(self, at: datetime) -> int:
        if self.ledger is None:
            return 0
        rows = await self._db.fetch("SELECT * FROM backend_sessions WHERE stopped_at IS NULL")
        written = 0
        for row in rows:
            written += await self._book_row(row, at, final=False)
        return written

    async def _book_row(self, row: Any, until: datetime, *, final: bool) -> int:
        start = row["booked_until"] or row["started_at"]
        seconds = _seconds(start, until)
        written = 0
        if seconds > 0 and self.ledger is not None:
            await self.ledger.record(
                kind="gpu_seconds",
                provider=row["backend"],
                model=None,
                units=seconds,
                unit_price=row["usd_per_second"],
                request_id=f"backend-session:{row['id']}:{int(start.timestamp() * 1000)}",
                at=until,
            )
            written = 1
        await self._db.execute(
            "UPDATE backend_sessions SET booked_until = GREATEST(booked_until, $2),"
            " ledgered = ledgered OR $3 WHERE id = $1",
            row["id"],
            until,
            final,
        )
        return written

    async def forget(self, holder: str) -> None:
        await self._db.execute("DELETE FROM backend_leases WHERE holder = $1", holder)

    async def record(self, session: Session) -> None:
        """A whole interval at once (kept for sessions measured elsewhere)."""
        row = await self._db.fetchrow(
            "INSERT INTO backend_sessions (backend, started_at, stopped_at, gpu_seconds,"
            " usd_per_second, cost_usd, reason) VALUES ($1,$2,$3,$4,$5,$6,$7) RETURNING *",
            session.backend,
            session.started,
            session.stopped,
            session.seconds,
            session.usd_per_second,
            session.cost,
            session.reason,
        )
        if self.ledger is not None:
            await self._book_row(row, session.stopped, final=True)

    async def push_pending(self) -> None:
        """Book what a crash or a failed ledger write left unbooked of closed sessions."""
        if self.ledger is None:
            return
        rows = await self._db.fetch(
            "SELECT * FROM backend_sessions WHERE NOT ledgered AND stopped_at IS NOT NULL"
            " ORDER BY id"
        )
        for row in rows:
            await self._book_row(row, row["stopped_at"], final=True)
        if rows:
            log.warning("booked %d earlier backend sessions in the ledger", len(rows))


SessionSink = SessionStore  # the name before leases (issue 16)
