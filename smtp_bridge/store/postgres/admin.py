"""The queue command's side of the PostgreSQL store (:class:`~..base.QueueAdmin`).

The statements are shared with SQLite (:mod:`..admin_sql`); this module runs
them, each operation in one transaction on a pooled connection.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from ...outcomes import RecipientState
from .. import admin_sql
from ..records import GuardRequest, MessageRecord, RecipientRecord
from . import ledger
from .db import Conn, Database
from .rows import NOTIFY, message_row, recipient_row
from .schema import DIALECT

__all__ = ["QueueAdminMixin"]


class QueueAdminMixin:
    """``smtp-bridge queue``: list, retry, purge, count."""

    _db: Database
    _clock: Callable[[], float]
    _ttl: Callable[[str], float]
    _queued: Callable[[str, str, float], GuardRequest]

    async def get_message(
        self, queue_id: str
    ) -> tuple[MessageRecord, list[RecipientRecord]] | None:
        """The message ``queue_id`` with its recipients (by address), or None."""
        message, recipients = admin_sql.message_queries(DIALECT, queue_id)

        async def read(conn: Conn) -> tuple[MessageRecord, list[RecipientRecord]] | None:
            cursor = await conn.execute(*message)
            row = await cursor.fetchone()
            if row is None:
                return None
            cursor = await conn.execute(*recipients)
            return message_row(row), [recipient_row(r) for r in await cursor.fetchall()]

        return await self._db.run("read message", read, snapshot=True)

    async def list_recipients(
        self, *, states: Collection[RecipientState] | None = None, limit: int = 100
    ) -> list[RecipientRecord]:
        """Recipient records, most recently updated first (see base.QueueAdmin)."""
        query = admin_sql.recipients_query(DIALECT, states, limit)
        if query is None:
            return []

        async def read(conn: Conn) -> list[RecipientRecord]:
            cursor = await conn.execute(*query)
            return [recipient_row(row) for row in await cursor.fetchall()]

        return await self._db.run("list recipients", read)

    async def list_queue(
        self, *, dead: bool = False, limit: int = 1000
    ) -> list[tuple[MessageRecord, RecipientRecord]]:
        """Spooled recipients, or dead letters, oldest first (see base.QueueAdmin)."""
        query = admin_sql.queue_query(DIALECT, dead=dead, limit=limit)

        async def read(conn: Conn) -> list[tuple[MessageRecord, RecipientRecord]]:
            cursor = await conn.execute(*query)
            return admin_sql.queue_entries(await cursor.fetchall())

        return await self._db.run("list queue", read)

    async def retry(self, queue_id: str | None = None) -> tuple[int, int]:
        """``queue retry``: dead letters back into the spool (see base.QueueAdmin).

        Wakes every instance's workers when it put any recipient back or hurried it.
        """
        now = self._clock()
        plan = admin_sql.retry_statements(DIALECT, queue_id, now)

        async def write(conn: Conn) -> tuple[int, int]:
            cursor = await conn.execute(*plan.resendable)
            for key, rcpt, holder in await cursor.fetchall():
                # Back in the spool: its guard again, unless another copy has it now.
                await ledger.acquire(conn, key, [rcpt], self._queued(holder, key, now))
            revived = (await conn.execute(*plan.revive)).rowcount
            hurried = 0 if plan.hurry is None else (await conn.execute(*plan.hurry)).rowcount
            cursor = await conn.execute(*plan.stuck)
            row = await cursor.fetchone()
            if revived + hurried:
                await conn.execute(NOTIFY)
            return revived + hurried, int(row[0]) if row is not None else 0

        return await self._db.run("retry", write)

    async def purge(self, queue_id: str | None = None, *, dead: bool = False) -> int:
        """``queue purge``: message ``queue_id``, or every dead letter (see base.QueueAdmin)."""
        first, *rest = admin_sql.purge_statements(DIALECT, queue_id, dead=dead)

        async def write(conn: Conn) -> int:
            removed = (await conn.execute(*first)).rowcount
            for query in rest:
                await conn.execute(*query)
            return int(removed)

        return await self._db.run("purge", write)

    async def counts(self) -> dict[str, int]:
        """Recipients per state (every state present, zero when none)."""

        async def read(conn: Conn) -> dict[str, int]:
            cursor = await conn.execute(*admin_sql.COUNT_STATES)
            return admin_sql.state_counts(await cursor.fetchall())

        return await self._db.run("count recipients", read)
