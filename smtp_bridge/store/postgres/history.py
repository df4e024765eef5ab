"""The console's history on the PostgreSQL store (:class:`~...history.History`).

Every instance sharing the database writes here, so each console shows all of
them. The rules are in :mod:`smtp_bridge.store.history`; the search, a
message's page and the trimming are SQLite's statements (:mod:`..history_sql`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Final

from .. import history_sql
from ..history import (
    HISTORY_ATTEMPT_COLUMNS,
    HISTORY_MESSAGE_COLUMNS,
    ActivityBucket,
    HistoryAttempt,
    HistoryEntry,
    HistoryMessage,
    activity_buckets,
    attempt_row,
    history_entries,
    message_from_row,
    message_row,
)
from .db import Conn, Database
from .rows import ROWS_PER_STATEMENT
from .schema import DIALECT

__all__ = ["HistoryMixin"]

_MESSAGE_ROW: Final = "(" + ", ".join(["%s"] * len(HISTORY_MESSAGE_COLUMNS.split(","))) + ")"
_ATTEMPT_ROW: Final = "(" + ", ".join(["%s"] * len(HISTORY_ATTEMPT_COLUMNS.split(","))) + ")"
_ON_CONFLICT_MESSAGE: Final = (
    " ON CONFLICT (queue_id) DO UPDATE SET"
    " received_at = excluded.received_at, mail_from = excluded.mail_from,"
    " rcpts = excluded.rcpts, subject = excluded.subject,"
    " message_id = excluded.message_id, client = excluded.client,"
    ' "user" = excluded."user", size = excluded.size, reply = excluded.reply,'
    " instance = excluded.instance"
)


@functools.lru_cache(maxsize=128)
def _record_sql(messages: int, attempts: int) -> str:
    """Upsert ``messages`` rows and append ``attempts`` rows, in one statement."""
    upsert = (
        f"INSERT INTO history_messages ({HISTORY_MESSAGE_COLUMNS})"
        f" VALUES {', '.join([_MESSAGE_ROW] * messages)}{_ON_CONFLICT_MESSAGE}"
    )
    append = (
        f"INSERT INTO history_attempts ({HISTORY_ATTEMPT_COLUMNS})"
        f" VALUES {', '.join([_ATTEMPT_ROW] * attempts)}"
    )
    if not attempts:
        return upsert
    if not messages:
        return append
    return f"WITH upserted AS ({upsert}) {append}"


#: Each recipient's latest attempt (the later ``at``, then the later row) of some messages.
_LATEST: Final = (
    f"SELECT DISTINCT ON (queue_id, rcpt) {HISTORY_ATTEMPT_COLUMNS} FROM history_attempts"
    " WHERE queue_id = ANY(%s) ORDER BY queue_id, rcpt, at DESC, id DESC"
)


class HistoryMixin:
    """``record_history``, ``search_history``, ``history_message``, ``history_activity``
    and ``trim_history``, each one transaction."""

    _db: Database

    async def record_history(
        self, messages: Sequence[HistoryMessage], attempts: Sequence[HistoryAttempt]
    ) -> None:
        """In one transaction: upsert ``messages`` (the last row wins), append ``attempts``."""
        # The last row of a message wins (an upsert cannot touch one row twice).
        message_rows = list({m.queue_id: message_row(m) for m in messages}.values())
        attempt_rows = [attempt_row(a) for a in attempts]
        if not message_rows and not attempt_rows:
            return
        statements = []
        for start in range(0, max(len(message_rows), len(attempt_rows)), ROWS_PER_STATEMENT):
            some = message_rows[start : start + ROWS_PER_STATEMENT]
            tried = attempt_rows[start : start + ROWS_PER_STATEMENT]
            params = [value for row in (*some, *tried) for value in row]
            statements.append((_record_sql(len(some), len(tried)), params))

        async def write(conn: Conn) -> None:
            for sql, params in statements:
                await conn.execute(sql, params)

        await self._db.run("record history", write, single=len(statements) == 1)

    async def search_history(
        self, query: str = "", *, limit: int = 50, before: float | None = None
    ) -> list[HistoryEntry]:
        """Newest first; exact on queue id and Message-ID, substring on the rest."""
        search = history_sql.search_query(DIALECT, query, limit, before)

        async def read(conn: Conn) -> list[HistoryEntry]:
            cursor = await conn.execute(*search)
            messages = [message_from_row(row) for row in await cursor.fetchall()]
            if not messages:
                return []
            cursor = await conn.execute(_LATEST, ([m.queue_id for m in messages],))
            attempts = [HistoryAttempt(*row) for row in await cursor.fetchall()]
            return history_entries(messages, attempts)

        return await self._db.run("search history", read, snapshot=True)

    async def history_message(
        self, queue_id: str
    ) -> tuple[HistoryMessage | None, list[HistoryAttempt]]:
        """One message's history row (None if unknown) and its attempts, oldest first."""
        message, attempts = history_sql.message_page_queries(DIALECT, queue_id)

        async def read(conn: Conn) -> tuple[HistoryMessage | None, list[HistoryAttempt]]:
            cursor = await conn.execute(*message)
            row = await cursor.fetchone()
            cursor = await conn.execute(*attempts)
            found = [HistoryAttempt(*r) for r in await cursor.fetchall()]
            return (message_from_row(row) if row is not None else None), found

        return await self._db.run("read history", read, snapshot=True)

    async def history_activity(self, since: float, bucket: float) -> list[ActivityBucket]:
        """Messages and API answers per ``bucket`` seconds since ``since``, oldest first."""

        async def read(conn: Conn) -> list[ActivityBucket]:
            cursor = await conn.execute(
                "SELECT floor((received_at - %s) / %s)::bigint AS slot, count(*)"
                " FROM history_messages WHERE received_at >= %s GROUP BY slot",
                (since, bucket, since),
            )
            messages = await cursor.fetchall()
            cursor = await conn.execute(
                "SELECT floor((at - %s) / %s)::bigint AS slot,"
                " count(*) FILTER (WHERE state = 'delivered'), count(*)"
                " FROM history_attempts WHERE at >= %s AND result <> '' GROUP BY slot",
                (since, bucket, since),
            )
            return activity_buckets(messages, await cursor.fetchall(), since, bucket)

        return await self._db.run("read activity", read, snapshot=True)

    async def trim_history(self, before: float) -> int:
        """Forget messages received and attempts made before ``before``; rows removed."""
        queries = history_sql.trim_queries(DIALECT, before)

        async def write(conn: Conn) -> int:
            return sum([(await conn.execute(*query)).rowcount for query in queries])

        return await self._db.run("trim history", write)
