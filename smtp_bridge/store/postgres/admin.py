"""The queue command's side of the PostgreSQL store (:class:`~..base.QueueAdmin`)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from ...outcomes import RecipientState
from ..records import CLAIMABLE_STATES, GuardState, MessageRecord, RecipientRecord
from ..rules import MESSAGE_COLUMNS, RECIPIENT_COLUMNS
from . import ledger
from .db import Conn, Database
from .rows import NOTIFY, message_row, recipient_row

__all__ = ["QueueAdminMixin"]


class QueueAdminMixin:
    """``smtp-bridge queue``: list, retry, purge, count (the SQL mirrors SQLite's)."""

    _db: Database
    _clock: Callable[[], float]
    _ttl: Callable[[str], float]

    async def get_message(
        self, queue_id: str
    ) -> tuple[MessageRecord, list[RecipientRecord]] | None:
        """The message ``queue_id`` with its recipients (by address), or None."""

        async def read(conn: Conn) -> tuple[MessageRecord, list[RecipientRecord]] | None:
            cursor = await conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE queue_id = %s", (queue_id,)
            )
            row = await cursor.fetchone()
            if row is None:
                return None
            cursor = await conn.execute(
                f"SELECT {RECIPIENT_COLUMNS} FROM recipients WHERE queue_id = %s ORDER BY rcpt",
                (queue_id,),
            )
            return message_row(row), [recipient_row(r) for r in await cursor.fetchall()]

        return await self._db.run("read message", read, snapshot=True)

    async def list_recipients(
        self, *, states: Collection[RecipientState] | None = None, limit: int = 100
    ) -> list[RecipientRecord]:
        """Recipient records, most recently updated first, optionally only in ``states``."""
        if limit <= 0 or (states is not None and not states):
            return []
        where = ""
        params: list[Any] = []
        if states is not None:
            where = " WHERE state = ANY(%s)"
            params.append(sorted({RecipientState(state).value for state in states}))
        params.append(limit)
        sql = (
            f"SELECT {RECIPIENT_COLUMNS} FROM recipients{where}"
            " ORDER BY updated_at DESC, queue_id DESC, rcpt LIMIT %s"
        )

        async def read(conn: Conn) -> list[RecipientRecord]:
            cursor = await conn.execute(sql, params)
            return [recipient_row(row) for row in await cursor.fetchall()]

        return await self._db.run("list recipients", read)

    async def list_queue(
        self, *, dead: bool = False, limit: int = 1000
    ) -> list[tuple[MessageRecord, RecipientRecord]]:
        """Spooled recipients waiting for delivery (or dead letters), oldest first.

        The message records come without content; ``content`` is ``b""`` when the
        message still has it (a dead letter that can be retried), else None.
        """
        if dead:
            where = "r.state = %s"
            params: list[Any] = [RecipientState.DEAD.value]
        else:
            where = "r.state = ANY(%s) AND r.next_attempt IS NOT NULL AND m.content IS NOT NULL"
            params = [list(CLAIMABLE_STATES)]
        # The content itself stays in the database: only whether there is any.
        names = [c.strip() for c in MESSAGE_COLUMNS.split(",")]
        columns = ", ".join("m.content IS NOT NULL" if c == "content" else f"m.{c}" for c in names)
        at = names.index("content")
        recipient_columns = ", ".join(f"r.{c.strip()}" for c in RECIPIENT_COLUMNS.split(","))
        sql = (
            f"SELECT {columns}, {recipient_columns}"
            " FROM recipients AS r JOIN messages AS m ON m.queue_id = r.queue_id"
            f" WHERE {where} ORDER BY m.received_at, r.queue_id, r.rcpt LIMIT %s"
        )
        params.append(limit)
        width = len(names)

        async def read(conn: Conn) -> list[tuple[MessageRecord, RecipientRecord]]:
            cursor = await conn.execute(sql, params)
            found = []
            for row in await cursor.fetchall():
                head = (*row[:at], b"" if row[at] else None, *row[at + 1 : width])
                found.append((message_row(head), recipient_row(row[width:])))
            return found

        return await self._db.run("list queue", read)

    async def retry(self, queue_id: str | None = None) -> tuple[int, int]:
        """``queue retry``: dead letters (of ``queue_id``, or all) back into the spool.

        Waiting recipients of ``queue_id`` become due now as well. Returns
        (recipients put back or hurried, dead letters that cannot be resent).
        """
        now = self._clock()
        scope = "" if queue_id is None else " AND r.queue_id = %s"
        scope_params: tuple[Any, ...] = () if queue_id is None else (queue_id,)
        spooled = (
            " AND EXISTS (SELECT 1 FROM messages AS m WHERE m.queue_id = r.queue_id"
            " AND m.content IS NOT NULL)"
        )

        async def write(conn: Conn) -> tuple[int, int]:
            cursor = await conn.execute(
                "SELECT m.message_key, r.rcpt, r.queue_id FROM recipients AS r JOIN messages AS m"
                f" ON m.queue_id = r.queue_id WHERE r.state = %s{scope}{spooled}",
                (RecipientState.DEAD.value, *scope_params),
            )
            for key, rcpt, holder in await cursor.fetchall():
                # Back in the spool: its guard again, unless another copy has it now.
                await ledger.acquire(
                    conn,
                    key,
                    [rcpt],
                    holder=holder,
                    state=GuardState.QUEUED,
                    until=None,
                    now=now,
                    ttl=self._ttl(key),
                )
            cursor = await conn.execute(
                "UPDATE recipients AS r SET state = %s, next_attempt = %s, spooled_at = %s,"
                " claimed_until = NULL, claimed_by = NULL, error = '', updated_at = %s"
                f" WHERE r.state = %s{scope}{spooled}",
                (
                    RecipientState.RETRYING.value,
                    now,
                    now,
                    now,
                    RecipientState.DEAD.value,
                    *scope_params,
                ),
            )
            revived = cursor.rowcount
            hurried = 0
            if queue_id is not None:
                cursor = await conn.execute(
                    "UPDATE recipients AS r SET next_attempt = %s"
                    f" WHERE r.state = ANY(%s) AND r.next_attempt > %s{scope}{spooled}",
                    (now, list(CLAIMABLE_STATES), now, *scope_params),
                )
                hurried = cursor.rowcount
            cursor = await conn.execute(
                f"SELECT COUNT(*) FROM recipients AS r WHERE r.state = %s{scope}",
                (RecipientState.DEAD.value, *scope_params),
            )
            row = await cursor.fetchone()
            if revived + hurried:
                await conn.execute(NOTIFY)
            return revived + hurried, int(row[0]) if row is not None else 0

        return await self._db.run("retry", write)

    async def purge(self, queue_id: str | None = None, *, dead: bool = False) -> int:
        """``queue purge``: delete message ``queue_id``, or (``dead``) every dead letter.

        Returns the number of recipient rows deleted; the dedup memory is kept.
        """
        if (queue_id is None) == (not dead):
            raise ValueError("give a queue id or dead=True")

        async def write(conn: Conn) -> int:
            if queue_id is not None:
                cursor = await conn.execute(
                    "DELETE FROM recipients WHERE queue_id = %s", (queue_id,)
                )
                removed = cursor.rowcount
                await conn.execute(
                    "DELETE FROM dedup WHERE queue_id = %s AND state = ANY(%s)",
                    (queue_id, [GuardState.QUEUED.value, GuardState.SENDING.value]),
                )
                await conn.execute("DELETE FROM messages WHERE queue_id = %s", (queue_id,))
                return int(removed)
            cursor = await conn.execute(
                "DELETE FROM recipients WHERE state = %s", (RecipientState.DEAD.value,)
            )
            removed = cursor.rowcount
            await conn.execute(
                "DELETE FROM messages WHERE NOT EXISTS"
                " (SELECT 1 FROM recipients AS r WHERE r.queue_id = messages.queue_id)"
            )
            return int(removed)

        return await self._db.run("purge", write)

    async def counts(self) -> dict[str, int]:
        """Recipients per state (every state present, zero when none)."""

        async def read(conn: Conn) -> dict[str, int]:
            result = {state.value: 0 for state in RecipientState}
            cursor = await conn.execute("SELECT state, COUNT(*) FROM recipients GROUP BY state")
            for state, count in await cursor.fetchall():
                result[state] = int(count)
            return result

        return await self._db.run("count recipients", read)
