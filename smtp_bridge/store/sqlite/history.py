"""The history role's SQL for SQLite: plain functions of a connection.

:class:`~smtp_bridge.store.sqlite.SQLiteStore` runs the writes on its group-commit
writer (so a history write joins the batch that is being formed anyway) and the
reads on its reader thread. The rules are in :mod:`smtp_bridge.store.history`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
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
from .schema import DIALECT

__all__ = ["activity", "message_page", "record", "search", "trim"]

#: Keeps ``IN (...)`` lists below SQLite's bound-parameter limit.
_IN_CHUNK: Final = 500


def record(
    conn: sqlite3.Connection,
    messages: Sequence[HistoryMessage],
    attempts: Sequence[HistoryAttempt],
) -> None:
    """Upsert ``messages`` (the last row wins) and append ``attempts``."""
    if messages:
        conn.executemany(
            f"INSERT OR REPLACE INTO history_messages ({HISTORY_MESSAGE_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [message_row(m) for m in messages],
        )
    if attempts:
        conn.executemany(
            f"INSERT INTO history_attempts ({HISTORY_ATTEMPT_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [attempt_row(a) for a in attempts],
        )


def search(
    conn: sqlite3.Connection, query: str, limit: int, before: float | None
) -> list[HistoryEntry]:
    """Newest first; exact on queue id and Message-ID, substring on the rest."""
    found = conn.execute(*history_sql.search_query(DIALECT, query, limit, before))
    messages = [message_from_row(row) for row in found]
    return history_entries(messages, _attempts_of(conn, [m.queue_id for m in messages]))


def message_page(
    conn: sqlite3.Connection, queue_id: str
) -> tuple[HistoryMessage | None, list[HistoryAttempt]]:
    """One message and every attempt for it, oldest first."""
    message, attempts = history_sql.message_page_queries(DIALECT, queue_id)
    row = conn.execute(*message).fetchone()
    found = [HistoryAttempt(*r) for r in conn.execute(*attempts)]
    return (message_from_row(row) if row is not None else None), found


def activity(conn: sqlite3.Connection, since: float, bucket: float) -> list[ActivityBucket]:
    """Messages and attempts per ``bucket`` seconds since ``since``."""
    messages = conn.execute(
        "SELECT CAST((received_at - ?) / ? AS INTEGER) AS slot, count(*)"
        " FROM history_messages WHERE received_at >= ? GROUP BY slot",
        (since, bucket, since),
    ).fetchall()
    attempts = conn.execute(
        "SELECT CAST((at - ?) / ? AS INTEGER) AS slot,"
        " sum(state = 'delivered'), count(*)"
        " FROM history_attempts WHERE at >= ? AND result != '' GROUP BY slot",
        (since, bucket, since),
    ).fetchall()
    return activity_buckets(messages, attempts, since, bucket)


def trim(conn: sqlite3.Connection, before: float) -> int:
    """Delete what is older than ``before``; rows removed."""
    return sum(conn.execute(*query).rowcount for query in history_sql.trim_queries(DIALECT, before))


def _attempts_of(conn: sqlite3.Connection, queue_ids: Sequence[str]) -> Iterator[HistoryAttempt]:
    """Every attempt of the messages ``queue_ids``, oldest first per message."""
    for i in range(0, len(queue_ids), _IN_CHUNK):
        where, params = DIALECT.one_of("queue_id", queue_ids[i : i + _IN_CHUNK])
        rows = conn.execute(
            f"SELECT {HISTORY_ATTEMPT_COLUMNS} FROM history_attempts WHERE {where} ORDER BY at, id",
            params,
        )
        for row in rows:
            yield HistoryAttempt(*row)
