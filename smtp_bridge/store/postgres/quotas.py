"""The ``quotas:`` counters of the PostgreSQL store (:class:`~..base.Quotas`), shared by
every instance on the database."""

from __future__ import annotations

from collections.abc import Callable

from .db import Conn, Database

__all__ = ["QuotaMixin"]

#: One statement, atomic under concurrency: a new or ended window restarts at 1;
#: within a window the count rises only below the limit (no row back: refused).
_TAKE = (
    "INSERT INTO quota_counters AS q (name, key, window_start, window_end, count)"
    " VALUES (%(name)s, %(key)s, %(now)s, %(now)s + %(window)s, 1)"
    " ON CONFLICT (name, key) DO UPDATE SET"
    " window_start = CASE WHEN %(now)s >= q.window_end OR %(now)s < q.window_end - %(window)s"
    "  THEN %(now)s ELSE q.window_start END,"
    " window_end = CASE WHEN %(now)s >= q.window_end OR %(now)s < q.window_end - %(window)s"
    "  THEN %(now)s + %(window)s ELSE q.window_end END,"
    " count = CASE WHEN %(now)s >= q.window_end OR %(now)s < q.window_end - %(window)s"
    "  THEN 1 ELSE q.count + 1 END"
    " WHERE %(now)s >= q.window_end OR %(now)s < q.window_end - %(window)s"
    " OR q.count < %(limit)s"
    " RETURNING 1"
)


class QuotaMixin:
    """``take_quota`` in one statement (the rules: :class:`smtp_bridge.store.base.Quotas`)."""

    _db: Database
    _clock: Callable[[], float]

    async def take_quota(
        self, name: str, key: str, *, window: float, limit: int, now: float | None = None
    ) -> bool:
        """Count one recipient against quota ``name`` for ``key``; False when over it."""
        if limit < 1:
            return False
        at = self._clock() if now is None else now
        params = {"name": name, "key": key, "now": at, "window": window, "limit": limit}

        async def write(conn: Conn) -> bool:
            cursor = await conn.execute(_TAKE, params)
            return await cursor.fetchone() is not None

        return await self._db.run("take quota", write)
