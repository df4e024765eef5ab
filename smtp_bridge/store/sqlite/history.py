"""The history role's SQL for SQLite: plain functions of a connection.

:class:`~smtp_bridge.store.sqlite.SQLiteStore` runs the writes on its group-commit
writer (so a history write joins the batch that is being formed anyway) and the
reads on its reader thread. The rules are in :mod:`smtp_bridge.store.history`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, Final

from ..history import (
    HISTORY_ATTEMPT_COLUMNS,
    HISTORY_MESSAGE_COLUMNS,
    ActivityBucket,
    HistoryAttempt,
    HistoryEntry,
    HistoryMessage,
    attempt_row,
    buckets,
    like_anywhere,
    message_from_row,
    message_row,
)

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
    where: list[str] = []
    params: list[Any] = []
    query = query.strip()
    if query:
        bare = query.strip("<>")
        like = like_anywhere(query)
        # LIKE is case-insensitive for ASCII in SQLite; lower() covers the rest.
        where.append(
            "(queue_id = ? OR message_id IN (?, ?)"
            " OR lower(mail_from) LIKE lower(?) ESCAPE '\\'"
            " OR lower(rcpts) LIKE lower(?) ESCAPE '\\'"
            " OR lower(subject) LIKE lower(?) ESCAPE '\\')"
        )
        params += [query, bare, f"<{bare}>", like, like, like]
    if before is not None:
        where.append("received_at < ?")
        params.append(before)
    sql = f"SELECT {HISTORY_MESSAGE_COLUMNS} FROM history_messages"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY received_at DESC, queue_id DESC LIMIT ?"
    params.append(limit)
    messages = [message_from_row(row) for row in conn.execute(sql, params)]
    latest: dict[str, dict[str, HistoryAttempt]] = {m.queue_id: {} for m in messages}
    ids = list(latest)
    for i in range(0, len(ids), _IN_CHUNK):
        chunk = ids[i : i + _IN_CHUNK]
        marks = ", ".join("?" * len(chunk))
        rows = conn.execute(
            f"SELECT {HISTORY_ATTEMPT_COLUMNS} FROM history_attempts"
            f" WHERE queue_id IN ({marks}) ORDER BY at, id",
            chunk,
        )
        for row in rows:
            attempt = _attempt(row)
            latest[attempt.queue_id][attempt.rcpt] = attempt  # later rows win
    return [HistoryEntry(m, latest[m.queue_id]) for m in messages]


def message_page(
    conn: sqlite3.Connection, queue_id: str
) -> tuple[HistoryMessage | None, list[HistoryAttempt]]:
    """One message and every attempt for it, oldest first."""
    row = conn.execute(
        f"SELECT {HISTORY_MESSAGE_COLUMNS} FROM history_messages WHERE queue_id = ?",
        (queue_id,),
    ).fetchone()
    attempts = [
        _attempt(r)
        for r in conn.execute(
            f"SELECT {HISTORY_ATTEMPT_COLUMNS} FROM history_attempts"
            " WHERE queue_id = ? ORDER BY at, id",
            (queue_id,),
        )
    ]
    return (message_from_row(row) if row is not None else None), attempts


def activity(conn: sqlite3.Connection, since: float, bucket: float) -> list[ActivityBucket]:
    """Messages and attempts per ``bucket`` seconds since ``since``."""
    found: dict[int, list[int]] = {}
    for slot, count in conn.execute(
        "SELECT CAST((received_at - ?) / ? AS INTEGER) AS slot, count(*)"
        " FROM history_messages WHERE received_at >= ? GROUP BY slot",
        (since, bucket, since),
    ):
        found.setdefault(slot, [0, 0, 0])[0] = count
    for slot, delivered, total in conn.execute(
        "SELECT CAST((at - ?) / ? AS INTEGER) AS slot,"
        " sum(state = 'delivered'), count(*)"
        " FROM history_attempts WHERE at >= ? AND result != '' GROUP BY slot",
        (since, bucket, since),
    ):
        counts = found.setdefault(slot, [0, 0, 0])
        counts[1] = delivered
        counts[2] = total - delivered
    return buckets(found, since, bucket)


def trim(conn: sqlite3.Connection, before: float) -> int:
    """Delete what is older than ``before``; rows removed."""
    removed = conn.execute("DELETE FROM history_messages WHERE received_at < ?", (before,))
    count = removed.rowcount
    removed = conn.execute("DELETE FROM history_attempts WHERE at < ?", (before,))
    return count + removed.rowcount


def _attempt(row: tuple[Any, ...]) -> HistoryAttempt:
    return HistoryAttempt(*row)
