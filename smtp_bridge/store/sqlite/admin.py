"""``smtp-bridge queue``, the console and quotas on the SQLite store.

The queue's and the history's statements are shared with PostgreSQL
(:mod:`..admin_sql`, :mod:`..history_sql`); this module runs them on the
writer (writes) or the reader thread (reads).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Sequence

from ...outcomes import RecipientState
from .. import admin_sql
from ..history import ActivityBucket, HistoryAttempt, HistoryEntry, HistoryMessage
from ..records import MessageRecord, RecipientRecord
from ..rules import message_from_row, recipient_from_row
from . import history, ledger
from .core import SQLiteCore
from .schema import DIALECT

__all__ = ["AdminOps"]


class AdminOps(SQLiteCore):
    """The operator's reads and writes, the console's history, quota counters."""

    async def get_message(
        self, queue_id: str
    ) -> tuple[MessageRecord, list[RecipientRecord]] | None:
        """The message ``queue_id`` with its recipients (by address), or None."""
        message, recipients = admin_sql.message_queries(DIALECT, queue_id)

        def read(conn: sqlite3.Connection) -> tuple[MessageRecord, list[RecipientRecord]] | None:
            row = conn.execute(*message).fetchone()
            if row is None:
                return None
            return message_from_row(row), [recipient_from_row(r) for r in conn.execute(*recipients)]

        return await self._read("read message", read)

    async def list_recipients(
        self, *, states: Collection[RecipientState] | None = None, limit: int = 100
    ) -> list[RecipientRecord]:
        """Recipient records, most recently updated first (see base.QueueAdmin)."""
        query = admin_sql.recipients_query(DIALECT, states, limit)
        if query is None:
            return []

        def read(conn: sqlite3.Connection) -> list[RecipientRecord]:
            return [recipient_from_row(row) for row in conn.execute(*query)]

        return await self._read("list recipients", read)

    async def list_queue(
        self, *, dead: bool = False, limit: int = 1000
    ) -> list[tuple[MessageRecord, RecipientRecord]]:
        """Spooled recipients, or dead letters, oldest first (see base.QueueAdmin)."""
        query = admin_sql.queue_query(DIALECT, dead=dead, limit=limit)
        return await self._read(
            "list queue", lambda conn: admin_sql.queue_entries(conn.execute(*query))
        )

    async def retry(self, queue_id: str | None = None) -> tuple[int, int]:
        """``queue retry``: dead letters back into the spool (see base.QueueAdmin).

        A dead letter whose content was never spooled (direct mode) cannot be resent.
        """
        now = self._clock()
        plan = admin_sql.retry_statements(DIALECT, queue_id, now)

        def write(conn: sqlite3.Connection) -> tuple[int, int]:
            for key, rcpt, holder in conn.execute(*plan.resendable).fetchall():
                # Back in the spool: its guard again, unless another copy has it now.
                ledger.acquire(conn, key, [rcpt], self._queued(holder, key, now))
            revived = conn.execute(*plan.revive).rowcount
            hurried = 0 if plan.hurry is None else conn.execute(*plan.hurry).rowcount
            (stuck,) = conn.execute(*plan.stuck).fetchone()
            return revived + hurried, stuck

        return await self._write("retry", write)

    async def purge(self, queue_id: str | None = None, *, dead: bool = False) -> int:
        """``queue purge``: message ``queue_id``, or every dead letter (see base.QueueAdmin)."""
        first, *rest = admin_sql.purge_statements(DIALECT, queue_id, dead=dead)

        def write(conn: sqlite3.Connection) -> int:
            removed = conn.execute(*first).rowcount
            for query in rest:
                conn.execute(*query)
            return removed

        return await self._write("purge", write)

    async def counts(self) -> dict[str, int]:
        """Recipients per state (every state present, zero when none)."""
        return await self._read(
            "count recipients",
            lambda conn: admin_sql.state_counts(conn.execute(*admin_sql.COUNT_STATES)),
        )

    # -- the console's history (store/history.py) ------------------------------------------

    async def record_history(
        self, messages: Sequence[HistoryMessage], attempts: Sequence[HistoryAttempt]
    ) -> None:
        """Upsert ``messages`` and append ``attempts``, in the writer's next batch."""
        await self._write("record history", lambda conn: history.record(conn, messages, attempts))

    async def search_history(
        self, query: str = "", *, limit: int = 50, before: float | None = None
    ) -> list[HistoryEntry]:
        """Messages newest first matching ``query``, with each recipient's latest attempt."""
        return await self._read(
            "search history", lambda conn: history.search(conn, query, limit, before)
        )

    async def history_message(
        self, queue_id: str
    ) -> tuple[HistoryMessage | None, list[HistoryAttempt]]:
        """One message's history row and its attempts, oldest first."""
        return await self._read("read history", lambda conn: history.message_page(conn, queue_id))

    async def history_activity(self, since: float, bucket: float) -> list[ActivityBucket]:
        """Messages and attempts per ``bucket`` seconds since ``since``."""
        return await self._read("read activity", lambda conn: history.activity(conn, since, bucket))

    async def trim_history(self, before: float) -> int:
        """Forget history older than ``before``."""
        return await self._write("trim history", lambda conn: history.trim(conn, before))

    async def take_quota(
        self, name: str, key: str, *, window: float, limit: int, now: float | None = None
    ) -> bool:
        """Count one recipient against quota ``name`` for ``key`` (see :class:`Quotas`)."""
        at = self._clock() if now is None else now

        def write(conn: sqlite3.Connection) -> bool:
            # The writer thread runs one function at a time: read-then-write is atomic.
            row = conn.execute(
                "SELECT window_end, count FROM quota_counters WHERE name = ? AND key = ?",
                (name, key),
            ).fetchone()
            if row is None or at >= row[0] or at < row[0] - window:
                # No window yet, or it has ended (or the clock went back past it).
                conn.execute(
                    "INSERT INTO quota_counters (name, key, window_start, window_end, count)"
                    " VALUES (?, ?, ?, ?, 1) ON CONFLICT (name, key) DO UPDATE SET"
                    " window_start = excluded.window_start, window_end = excluded.window_end,"
                    " count = 1",
                    (name, key, at, at + window),
                )
                return limit >= 1
            if row[1] >= limit:
                return False
            conn.execute(
                "UPDATE quota_counters SET count = count + 1 WHERE name = ? AND key = ?",
                (name, key),
            )
            return True

        return await self._write("take quota", write)
