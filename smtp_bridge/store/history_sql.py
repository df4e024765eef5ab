"""The console history's statements both backends run alike, written once.

The rules are in :mod:`.history`; each backend renders these in its
:class:`~.dialect.Dialect`. The writes (each engine's upsert), each
recipient's latest attempt and the activity slots stay in the backends, whose
SQL differs there.
"""

from __future__ import annotations

from typing import Any

from .dialect import Dialect, Query
from .history import HISTORY_ATTEMPT_COLUMNS, HISTORY_MESSAGE_COLUMNS, like_anywhere

__all__ = ["message_page_queries", "search_query", "trim_queries"]


def search_query(dialect: Dialect, query: str, limit: int, before: float | None) -> Query:
    """Messages newest first (``received_at < before`` when given): exact on queue id
    and Message-ID (with or without its angle brackets), substring on the rest."""
    p = dialect.mark
    where: list[str] = []
    params: list[Any] = []
    query = query.strip()
    if query:
        bare = query.strip("<>")
        like = like_anywhere(query)
        where.append(
            f"(queue_id = {p} OR message_id IN ({p}, {p})"
            f" OR {dialect.contains('mail_from')}"
            f" OR {dialect.contains('rcpts')}"
            f" OR {dialect.contains('subject')})"
        )
        params += [query, bare, f"<{bare}>", like, like, like]
    if before is not None:
        where.append(f"received_at < {p}")
        params.append(before)
    sql = f"SELECT {HISTORY_MESSAGE_COLUMNS} FROM history_messages"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY received_at DESC, queue_id DESC LIMIT {p}"
    return Query(sql, (*params, limit))


def message_page_queries(dialect: Dialect, queue_id: str) -> tuple[Query, Query]:
    """One message's row, then all its attempts, oldest first."""
    p = dialect.mark
    return (
        Query(
            f"SELECT {HISTORY_MESSAGE_COLUMNS} FROM history_messages WHERE queue_id = {p}",
            (queue_id,),
        ),
        Query(
            f"SELECT {HISTORY_ATTEMPT_COLUMNS} FROM history_attempts"
            f" WHERE queue_id = {p} ORDER BY at, id",
            (queue_id,),
        ),
    )


def trim_queries(dialect: Dialect, before: float) -> tuple[Query, Query]:
    """Forget messages received and attempts made before ``before`` (rowcounts: removed)."""
    p = dialect.mark
    return (
        Query(f"DELETE FROM history_messages WHERE received_at < {p}", (before,)),
        Query(f"DELETE FROM history_attempts WHERE at < {p}", (before,)),
    )
