"""``smtp-bridge queue``, the console and quotas on the SQLite store."""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Sequence

from ...outcomes import RecipientState
from ..history import ActivityBucket, HistoryAttempt, HistoryEntry, HistoryMessage
from ..records import (
    CLAIMABLE_STATES,
    GuardState,
    MessageRecord,
    RecipientRecord,
)
from ..rules import (
    MESSAGE_COLUMNS,
    RECIPIENT_COLUMNS,
    message_from_row,
    recipient_from_row,
)
from . import history, ledger
from .core import SQLiteCore

__all__ = ["AdminOps"]


class AdminOps(SQLiteCore):
    """The operator's reads and writes, the console's history, quota counters."""

    async def get_message(
        self, queue_id: str
    ) -> tuple[MessageRecord, list[RecipientRecord]] | None:
        """The message ``queue_id`` with its recipients (by address), or None."""

        def read(conn: sqlite3.Connection) -> tuple[MessageRecord, list[RecipientRecord]] | None:
            row = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE queue_id = ?", (queue_id,)
            ).fetchone()
            if row is None:
                return None
            recipients = conn.execute(
                f"SELECT {RECIPIENT_COLUMNS} FROM recipients WHERE queue_id = ? ORDER BY rcpt",
                (queue_id,),
            ).fetchall()
            return message_from_row(row), [recipient_from_row(r) for r in recipients]

        return await self._read("read message", read)

    async def list_recipients(
        self, *, states: Collection[RecipientState] | None = None, limit: int = 100
    ) -> list[RecipientRecord]:
        """Recipient records, most recently updated first, optionally only in ``states``."""
        if limit <= 0 or (states is not None and not states):
            return []
        where = ""
        params: list[object] = []
        if states is not None:
            values = sorted({RecipientState(state).value for state in states})
            where = f" WHERE state IN ({', '.join('?' * len(values))})"
            params.extend(values)
        params.append(limit)
        sql = (
            f"SELECT {RECIPIENT_COLUMNS} FROM recipients{where}"
            " ORDER BY updated_at DESC, queue_id DESC, rcpt LIMIT ?"
        )

        def read(conn: sqlite3.Connection) -> list[RecipientRecord]:
            return [recipient_from_row(row) for row in conn.execute(sql, params)]

        return await self._read("list recipients", read)

    async def list_queue(
        self, *, dead: bool = False, limit: int = 1000
    ) -> list[tuple[MessageRecord, RecipientRecord]]:
        """Spooled recipients waiting for delivery (or dead letters), oldest first.

        The message records come without content; ``content`` is ``b""`` when the
        message still has it (a dead letter that can be retried), else None.
        """
        if dead:
            where = "r.state = ?"
            params: list[object] = [RecipientState.DEAD.value]
        else:
            where = "r.state IN (?, ?) AND r.next_attempt IS NOT NULL AND m.content IS NOT NULL"
            params = list(CLAIMABLE_STATES)
        # The content itself stays on disk: only whether there is any.
        names = [c.strip() for c in MESSAGE_COLUMNS.split(",")]
        columns = ", ".join("m.content IS NOT NULL" if c == "content" else f"m.{c}" for c in names)
        at = names.index("content")
        recipient_columns = ", ".join(f"r.{c.strip()}" for c in RECIPIENT_COLUMNS.split(","))
        sql = (
            f"SELECT {columns}, {recipient_columns}"
            " FROM recipients AS r JOIN messages AS m ON m.queue_id = r.queue_id"
            f" WHERE {where} ORDER BY m.received_at, r.queue_id, r.rcpt LIMIT ?"
        )
        params.append(limit)
        width = len(MESSAGE_COLUMNS.split(","))

        def read(conn: sqlite3.Connection) -> list[tuple[MessageRecord, RecipientRecord]]:
            found = []
            for row in conn.execute(sql, params):
                head = (*row[:at], b"" if row[at] else None, *row[at + 1 : width])
                found.append((message_from_row(head), recipient_from_row(row[width:])))
            return found

        return await self._read("list queue", read)

    async def retry(self, queue_id: str | None = None) -> tuple[int, int]:
        """``queue retry``: dead letters (of ``queue_id``, or all) back into the spool.

        Recipients of ``queue_id`` that are waiting become due now as well. A dead
        letter whose content was never spooled (direct mode) cannot be resent.
        Returns (recipients put back or hurried, dead letters that cannot be resent).
        """
        now = self._clock()
        scope = "" if queue_id is None else " AND r.queue_id = ?"
        scope_params: tuple[object, ...] = () if queue_id is None else (queue_id,)

        def write(conn: sqlite3.Connection) -> tuple[int, int]:
            spooled = " AND EXISTS (SELECT 1 FROM messages AS m WHERE m.queue_id = r.queue_id"
            spooled += " AND m.content IS NOT NULL)"
            back = conn.execute(
                "SELECT m.message_key, r.rcpt, r.queue_id FROM recipients AS r JOIN messages AS m"
                f" ON m.queue_id = r.queue_id WHERE r.state = ?{scope}{spooled}",
                (RecipientState.DEAD.value, *scope_params),
            ).fetchall()
            for key, rcpt, holder in back:
                # Back in the spool: its guard again, unless another copy has it now.
                ledger.acquire(
                    conn,
                    key,
                    [rcpt],
                    holder=holder,
                    state=GuardState.QUEUED,
                    until=None,
                    now=now,
                    ttl=self._ttl(key),
                )
            revived = conn.execute(
                "UPDATE recipients AS r SET state = ?, next_attempt = ?, spooled_at = ?,"
                " claimed_until = NULL, claimed_by = NULL, error = '', updated_at = ?"
                f" WHERE r.state = ?{scope}{spooled}",
                (
                    RecipientState.RETRYING.value,
                    now,
                    now,
                    now,
                    RecipientState.DEAD.value,
                    *scope_params,
                ),
            ).rowcount
            hurried = 0
            if queue_id is not None:
                hurried = conn.execute(
                    "UPDATE recipients AS r SET next_attempt = ?"
                    f" WHERE r.state IN (?, ?) AND r.next_attempt > ?{scope}{spooled}",
                    (now, *CLAIMABLE_STATES, now, *scope_params),
                ).rowcount
            (stuck,) = conn.execute(
                f"SELECT COUNT(*) FROM recipients AS r WHERE r.state = ?{scope}",
                (RecipientState.DEAD.value, *scope_params),
            ).fetchone()
            return revived + hurried, stuck

        return await self._write("retry", write)

    async def purge(self, queue_id: str | None = None, *, dead: bool = False) -> int:
        """``queue purge``: delete message ``queue_id``, or (``dead``) every dead letter.

        Returns the number of recipient rows deleted. Messages left without
        recipients are deleted with them; the dedup memory is kept.
        """
        if (queue_id is None) == (not dead):
            raise ValueError("give a queue id or dead=True")

        def write(conn: sqlite3.Connection) -> int:
            if queue_id is not None:
                removed = conn.execute(
                    "DELETE FROM recipients WHERE queue_id = ?", (queue_id,)
                ).rowcount
                conn.execute(
                    "DELETE FROM dedup WHERE queue_id = ? AND state IN (?, ?)",
                    (queue_id, GuardState.QUEUED.value, GuardState.SENDING.value),
                )
                conn.execute("DELETE FROM messages WHERE queue_id = ?", (queue_id,))
                return removed
            removed = conn.execute(
                "DELETE FROM recipients WHERE state = ?", (RecipientState.DEAD.value,)
            ).rowcount
            conn.execute(
                "DELETE FROM messages WHERE NOT EXISTS"
                " (SELECT 1 FROM recipients AS r WHERE r.queue_id = messages.queue_id)"
            )
            return removed

        return await self._write("purge", write)

    async def counts(self) -> dict[str, int]:
        """Recipients per state (every state present, zero when none)."""

        def read(conn: sqlite3.Connection) -> dict[str, int]:
            result = {state.value: 0 for state in RecipientState}
            for state, count in conn.execute(
                "SELECT state, COUNT(*) FROM recipients GROUP BY state"
            ):
                result[state] = count
            return result

        return await self._read("count recipients", read)

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
