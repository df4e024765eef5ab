"""The spool workers' side of the PostgreSQL store (:class:`~..base.Spool`).

Claims take due rows with ``FOR UPDATE SKIP LOCKED`` (claimers on several hosts
never get the same row) and mark them with the store's token; the guards of a
batch are locked in one sorted order. Lease times are the caller's (see the
package docstring).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from ...outcomes import RecipientState
from .. import spool_sql
from ..records import (
    ANONYMOUS_KEY_PREFIX,
    CLAIMABLE_STATES,
    CONTENT_DONE_STATES,
    GuardState,
    MessageRecord,
    RecipientRecord,
    SpoolStats,
)
from ..rules import MESSAGE_COLUMNS, RECIPIENT_COLUMNS
from . import ledger
from .db import Conn, Database
from .rows import message_row, recipient_row
from .schema import DIALECT

__all__ = ["PURGE_BATCH", "SpoolMixin"]

#: Rows one DELETE of :meth:`SpoolMixin.purge_expired` removes at most.
PURGE_BATCH: Final = 1000
#: resolve_stale locks the guards it settles (in one order): two instances
#: settling at once take different ones.
_LOCK_CUT: Final = " ORDER BY d.message_key, d.rcpt FOR UPDATE OF d SKIP LOCKED"
#: A recipient waiting in the spool, and the spool's depth and age (shared SQL).
_WAITING, _WAITING_PARAMS = spool_sql.waiting(DIALECT)
_SPOOL_STATS: Final = spool_sql.spool_stats_query(DIALECT)


class SpoolMixin:
    """Claims, their leases, and housekeeping (the SQL mirrors SQLite's)."""

    _db: Database
    _clock: Callable[[], float]
    _dedup_ttl: float
    _anonymous_ttl: float
    _db_clock: bool
    _offset: float
    token: str

    async def _database_now(self, conn: Conn) -> float:
        """The database server's clock; also keeps :attr:`_offset` (its lead on ours) fresh."""
        cursor = await conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
        row = await cursor.fetchone()
        at = float(row[0]) if row is not None else time.time() + self._offset
        self._offset = at - time.time()
        return at

    async def claim_due(
        self, *, now: float, limit: int, lease: float
    ) -> list[tuple[MessageRecord, RecipientRecord]]:
        """Claim up to ``limit`` spooled recipients due at ``now`` for ``lease`` seconds.

        One statement locks the due rows with ``SKIP LOCKED`` (rows another
        claimer is taking right now are left to it), counts the attempt and sets
        ``claimed_until = now + lease`` and ``claimed_by`` to this store's token.
        On the real clock, ``now`` is the database server's (read in this
        transaction), not the caller's: every instance's leases on one clock.
        """
        if limit <= 0:
            return []
        columns = ", ".join(f"r.{c.strip()}" for c in RECIPIENT_COLUMNS.split(","))
        sql = (
            "WITH due AS ("
            " SELECT r.queue_id, r.rcpt FROM recipients AS r"
            " JOIN messages AS m ON m.queue_id = r.queue_id"
            " WHERE r.state = ANY(%(claimable)s) AND r.next_attempt <= %(now)s"
            " AND (r.claimed_until IS NULL OR r.claimed_until < %(now)s)"
            " AND m.content IS NOT NULL"
            " ORDER BY r.next_attempt, r.queue_id, r.rcpt LIMIT %(limit)s"
            " FOR UPDATE OF r SKIP LOCKED)"
            " UPDATE recipients AS r SET claimed_until = %(until)s, claimed_by = %(token)s,"
            " attempts = r.attempts + 1"
            " FROM due WHERE r.queue_id = due.queue_id AND r.rcpt = due.rcpt"
            f" RETURNING {columns}"
        )

        async def write(conn: Conn) -> list[tuple[MessageRecord, RecipientRecord]]:
            at = await self._database_now(conn) if self._db_clock else now
            params = {
                "claimable": list(CLAIMABLE_STATES),
                "now": at,
                "limit": limit,
                "until": at + lease,
                "token": self.token,
            }
            cursor = await conn.execute(sql, params)
            records = [recipient_row(row) for row in await cursor.fetchall()]
            if not records:
                return []
            records.sort(key=lambda r: (r.next_attempt, r.queue_id, r.rcpt))
            cursor = await conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE queue_id = ANY(%s)",
                (sorted({r.queue_id for r in records}),),
            )
            messages = {m.queue_id: m for m in map(message_row, await cursor.fetchall())}
            # Every guard of the batch locked at once, in one order (no lock cycles).
            await ledger.lock_all(
                conn, [(messages[r.queue_id].message_key, r.rcpt) for r in records]
            )
            claimed = []
            for record in records:
                key = messages[record.queue_id].message_key
                prior = await ledger.claim(
                    conn, key, record.rcpt, holder=record.queue_id, until=at + lease, now=at
                )
                if prior is GuardState.SENDING:
                    # An attempt that never recorded its end: its call may have gone out.
                    await conn.execute(
                        "UPDATE recipients SET state = %s, error = %s"
                        " WHERE queue_id = %s AND rcpt = %s",
                        (
                            RecipientState.UNKNOWN.value,
                            spool_sql.INTERRUPTED,
                            record.queue_id,
                            record.rcpt,
                        ),
                    )
                    record = dataclasses.replace(
                        record, state=RecipientState.UNKNOWN, error=spool_sql.INTERRUPTED
                    )
                claimed.append((messages[record.queue_id], record))
            return claimed

        return await self._db.run("claim due recipients", write)

    async def release_claim(self, queue_id: str, rcpt: str, *, next_attempt: float) -> None:
        """Hand a claimed recipient back unattempted; the counted attempt is taken back."""

        async def write(conn: Conn) -> None:
            await conn.execute(
                "UPDATE recipients SET claimed_until = NULL, claimed_by = NULL,"
                " next_attempt = %s, attempts = GREATEST(attempts - 1, 0)"
                " WHERE queue_id = %s AND rcpt = %s",
                (next_attempt, queue_id, rcpt),
            )
            await ledger.requeue(conn, queue_id, rcpt)

        await self._db.run("release claim", write)

    async def renew_claim(self, queue_id: str, rcpt: str, *, lease: float) -> bool:
        """Extend our claim by ``lease`` seconds from now; False if it is not ours any more."""
        until = self._clock() + lease

        async def write(conn: Conn) -> bool:
            cursor = await conn.execute(
                "UPDATE recipients SET claimed_until = %s WHERE queue_id = %s AND rcpt = %s"
                " AND claimed_until IS NOT NULL AND claimed_by = %s",
                (until, queue_id, rcpt, self.token),
            )
            if cursor.rowcount != 1:
                return False
            await ledger.extend(conn, queue_id, rcpt, until)
            return True

        return await self._db.run("renew claim", write)

    async def recover_claims(self) -> int:
        """Nothing to do: a dead instance's claims are taken over when their lease ends.

        A claimer on another host cannot be told dead from slow, so its claims are
        left to the lease (``delivery.claim_lease``). Returns 0.
        """
        return 0

    async def resolve_stale(self, *, older_than: float) -> int:
        """Settle what sessions that died left behind (see base.Spool); returns rows settled.

        A SENDING guard of a session (its message has no spooled content) whose
        lease ran out, on any instance, is a call cut short: UNKNOWN.
        """
        now = self._clock()

        async def write(conn: Conn) -> int:
            cursor = await conn.execute(*spool_sql.cut_sessions(DIALECT, now, suffix=_LOCK_CUT))
            cut = await cursor.fetchall()
            for key, rcpt, holder in cut:
                for query in spool_sql.settle_cut(DIALECT, key, rcpt, holder, now):
                    await conn.execute(*query)
            cursor = await conn.execute(*spool_sql.abandoned(DIALECT, now, older_than))
            return len(cut) + int(cursor.rowcount)

        return await self._db.run("resolve stale", write)

    async def next_due(self) -> float | None:
        """When the next spooled recipient becomes claimable, or None if none waits."""

        async def read(conn: Conn) -> float | None:
            cursor = await conn.execute(
                "SELECT MIN(GREATEST(r.next_attempt, COALESCE(r.claimed_until, r.next_attempt)))"
                " FROM recipients AS r JOIN messages AS m ON m.queue_id = r.queue_id"
                f" WHERE {_WAITING}",
                _WAITING_PARAMS,
            )
            row = await cursor.fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._db.run("find next due", read)

    async def purge_expired(self, now: float | None = None) -> int:
        """Forget what is older than ``dedup_ttl`` (as SQLite), in batches of PURGE_BATCH rows.

        Dead letters with content stay until ``queue retry`` or ``queue purge``.
        """
        cutoff = (self._clock() if now is None else now) - self._dedup_ttl
        anonymous_cutoff = cutoff + self._dedup_ttl - self._anonymous_ttl
        final = list(CONTENT_DONE_STATES)
        remembered = [GuardState.DELIVERED.value, GuardState.UNKNOWN.value]
        guards = [GuardState.QUEUED.value, GuardState.SENDING.value]

        async def write(conn: Conn) -> int:
            removed = await _in_batches(
                conn,
                "DELETE FROM dedup WHERE ctid = ANY(ARRAY("
                " SELECT ctid FROM dedup WHERE state = ANY(%s) AND updated_at <="
                " CASE WHEN starts_with(message_key, %s) THEN %s ELSE %s END LIMIT %s))",
                (remembered, ANONYMOUS_KEY_PREFIX, anonymous_cutoff, cutoff, PURGE_BATCH),
            )
            # Guards whose holder's row is gone (purged by hand, or expired).
            removed += await _in_batches(
                conn,
                "DELETE FROM dedup WHERE ctid = ANY(ARRAY("
                " SELECT d.ctid FROM dedup AS d WHERE d.state = ANY(%s) AND NOT EXISTS"
                " (SELECT 1 FROM recipients AS r WHERE r.queue_id = d.queue_id"
                " AND lower(r.rcpt) = d.rcpt) LIMIT %s))",
                (guards, PURGE_BATCH),
            )
            while True:
                cursor = await conn.execute(
                    "SELECT m.queue_id FROM messages AS m"
                    " WHERE m.received_at <= %s AND NOT EXISTS ("
                    "  SELECT 1 FROM recipients AS r WHERE r.queue_id = m.queue_id"
                    "  AND (r.updated_at > %s"
                    "   OR (r.state <> ALL(%s) AND m.content IS NOT NULL)))"
                    " LIMIT %s",
                    (cutoff, cutoff, final, PURGE_BATCH),
                )
                expired = [queue_id for (queue_id,) in await cursor.fetchall()]
                for table in ("recipients", "messages"):
                    cursor = await conn.execute(
                        f"DELETE FROM {table} WHERE queue_id = ANY(%s)", (expired,)
                    )
                    removed += cursor.rowcount
                if len(expired) < PURGE_BATCH:
                    break
            # Recipient rows written without a message row (update_recipient upserts).
            removed += await _in_batches(
                conn,
                "DELETE FROM recipients WHERE ctid = ANY(ARRAY("
                " SELECT r.ctid FROM recipients AS r WHERE r.updated_at <= %s"
                " AND NOT EXISTS (SELECT 1 FROM messages AS m WHERE m.queue_id = r.queue_id)"
                " LIMIT %s))",
                (cutoff, PURGE_BATCH),
            )
            return removed

        return await self._db.run("purge", write)

    async def spool_stats(self) -> SpoolStats:
        """Recipients waiting in the spool and the oldest one's ``spooled_at``."""

        async def read(conn: Conn) -> SpoolStats:
            cursor = await conn.execute(*_SPOOL_STATS)
            row = await cursor.fetchone()
            assert row is not None
            depth, oldest = row
            return SpoolStats(int(depth), None if oldest is None else float(oldest))

        return await self._db.run("read spool stats", read)

    async def dead_letters(self) -> int:
        """How many recipients are dead letters (the ``dead_letters`` gauge)."""

        async def read(conn: Conn) -> int:
            cursor = await conn.execute(
                "SELECT COUNT(*) FROM recipients WHERE state = %s", (RecipientState.DEAD.value,)
            )
            row = await cursor.fetchone()
            return int(row[0]) if row is not None else 0

        return await self._db.run("count dead letters", read)


async def _in_batches(conn: Conn, sql: str, params: Sequence[Any]) -> int:
    """Run ``sql``, a DELETE of at most PURGE_BATCH rows, until a run removes fewer;
    the rows removed in all."""
    removed = 0
    while True:
        cursor = await conn.execute(sql, params)
        removed += cursor.rowcount
        if cursor.rowcount < PURGE_BATCH:
            return removed
