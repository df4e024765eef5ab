"""The spool workers' side of the SQLite store (:class:`~..base.Spool`)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from typing import Final

from ...errors import StoreError
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
from ..rules import MESSAGE_COLUMNS, RECIPIENT_COLUMNS, message_from_row, recipient_from_row
from . import ledger
from .core import SQLiteCore
from .owners import dead_owners, register_owner
from .schema import DIALECT

__all__ = ["SpoolOps"]

#: A recipient waiting in the spool, and the spool's depth and age (shared SQL).
_WAITING, _WAITING_PARAMS = spool_sql.waiting(DIALECT)
_SPOOL_STATS: Final = spool_sql.spool_stats_query(DIALECT)


class SpoolOps(SQLiteCore):
    """Claims, their leases, recovery, and housekeeping."""

    async def purge_expired(self, now: float | None = None) -> int:
        """Forget what is older than ``dedup_ttl``; return the number of rows removed.

        Removes dedup rows, and messages (with their recipients) received and last
        updated before the window whose recipients are all delivered, dropped or
        failed — or that have no content (never spooled, or done with), since nothing
        will ever work on those again. Dead letters with content stay until
        ``queue retry`` or ``queue purge``.
        """
        at = self._clock() if now is None else now
        cutoff = at - self._dedup_ttl
        # DEAD is not among them: a dead letter with its content is kept until the
        # operator retries or purges it (`smtp-bridge queue`).
        final = list(CONTENT_DONE_STATES)
        marks = ", ".join("?" * len(final))

        anonymous_cutoff = cutoff + self._dedup_ttl - self._anonymous_ttl

        def write(conn: sqlite3.Connection) -> int:
            removed = conn.execute(
                "DELETE FROM dedup WHERE state IN (?, ?) AND updated_at <="
                " CASE WHEN substr(message_key, 1, ?) = ? THEN ? ELSE ? END",
                (
                    GuardState.DELIVERED.value,
                    GuardState.UNKNOWN.value,
                    len(ANONYMOUS_KEY_PREFIX),
                    ANONYMOUS_KEY_PREFIX,
                    anonymous_cutoff,
                    cutoff,
                ),
            ).rowcount
            # Guards whose holder's row is gone (purged by hand, or expired).
            removed += conn.execute(
                "DELETE FROM dedup WHERE state IN (?, ?) AND NOT EXISTS (SELECT 1 FROM recipients"
                " AS r WHERE r.queue_id = dedup.queue_id AND lower(r.rcpt) = dedup.rcpt)",
                (GuardState.QUEUED.value, GuardState.SENDING.value),
            ).rowcount
            expired = [
                (queue_id,)
                for (queue_id,) in conn.execute(
                    "SELECT m.queue_id FROM messages AS m"
                    " WHERE m.received_at <= ? AND NOT EXISTS ("
                    "  SELECT 1 FROM recipients AS r WHERE r.queue_id = m.queue_id"
                    "  AND (r.updated_at > ?"
                    f"   OR (r.state NOT IN ({marks}) AND m.content IS NOT NULL)))",
                    (cutoff, cutoff, *final),
                ).fetchall()
            ]
            for table in ("recipients", "messages"):
                cursor = conn.executemany(f"DELETE FROM {table} WHERE queue_id = ?", expired)
                removed += cursor.rowcount
            # Quota windows that have ended count nothing any more.
            removed += conn.execute(
                "DELETE FROM quota_counters WHERE window_end <= ?", (at,)
            ).rowcount
            # Recipient rows written without a message row (update_recipient upserts).
            removed += conn.execute(
                "DELETE FROM recipients AS r WHERE r.updated_at <= ?"
                " AND NOT EXISTS (SELECT 1 FROM messages AS m WHERE m.queue_id = r.queue_id)",
                (cutoff,),
            ).rowcount
            return removed

        return await self._write("purge", write)

    async def claim_due(
        self, *, now: float, limit: int, lease: float
    ) -> list[tuple[MessageRecord, RecipientRecord]]:
        """Claim up to ``limit`` spooled recipients due at ``now`` for ``lease`` seconds.

        Due means RETRYING or UNKNOWN, with spooled content, ``next_attempt <= now`` and
        no live claim. Each claimed row gets ``claimed_until = now + lease`` and
        ``attempts + 1`` in the same transaction, before the attempt is made; the
        returned records show the incremented count. :meth:`update_recipient`
        releases the claim.
        """
        if limit <= 0:
            return []

        def write(conn: sqlite3.Connection) -> list[tuple[MessageRecord, RecipientRecord]]:
            keys = conn.execute(
                "SELECT r.queue_id, r.rcpt FROM recipients AS r"
                " JOIN messages AS m ON m.queue_id = r.queue_id"
                " WHERE r.state IN (?, ?) AND r.next_attempt <= ?"
                " AND (r.claimed_until IS NULL OR r.claimed_until < ?)"
                " AND m.content IS NOT NULL"
                " ORDER BY r.next_attempt, r.queue_id, r.rcpt LIMIT ?",
                (*CLAIMABLE_STATES, now, now, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE recipients SET claimed_until = ?, claimed_by = ?,"
                " attempts = attempts + 1 WHERE queue_id = ? AND rcpt = ?",
                [(now + lease, self._owner, queue_id, rcpt) for queue_id, rcpt in keys],
            )
            messages: dict[str, MessageRecord] = {}
            claimed: list[tuple[MessageRecord, RecipientRecord]] = []
            for queue_id, rcpt in keys:
                if queue_id not in messages:
                    row = conn.execute(
                        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE queue_id = ?", (queue_id,)
                    ).fetchone()
                    messages[queue_id] = message_from_row(row)
                key = messages[queue_id].message_key
                prior = ledger.claim(conn, key, rcpt, holder=queue_id, until=now + lease, now=now)
                if prior is GuardState.SENDING:
                    # An attempt that never recorded its end: its call may have gone out.
                    conn.execute(
                        "UPDATE recipients SET state = ?, error = ?"
                        " WHERE queue_id = ? AND rcpt = ?",
                        (RecipientState.UNKNOWN.value, spool_sql.INTERRUPTED, queue_id, rcpt),
                    )
                record = conn.execute(
                    f"SELECT {RECIPIENT_COLUMNS} FROM recipients WHERE queue_id = ? AND rcpt = ?",
                    (queue_id, rcpt),
                ).fetchone()
                claimed.append((messages[queue_id], recipient_from_row(record)))
            return claimed

        return await self._write("claim due recipients", write)

    async def release_claim(self, queue_id: str, rcpt: str, *, next_attempt: float) -> None:
        """Hand a claimed recipient back unattempted (the breaker said no, or shutdown).

        The attempt counted by :meth:`claim_due` is taken back.
        """

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE recipients SET claimed_until = NULL, claimed_by = NULL, next_attempt = ?,"
                " attempts = max(attempts - 1, 0) WHERE queue_id = ? AND rcpt = ?",
                (next_attempt, queue_id, rcpt),
            )
            ledger.requeue(conn, queue_id, rcpt)

        await self._write("release claim", write)

    async def renew_claim(self, queue_id: str, rcpt: str, *, lease: float) -> bool:
        """Extend our claim by ``lease`` seconds from now; False if it is not ours any more."""
        until = self._clock() + lease
        owner = self._owner

        def write(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE recipients SET claimed_until = ? WHERE queue_id = ? AND rcpt = ?"
                " AND claimed_until IS NOT NULL AND claimed_by IS ?",
                (until, queue_id, rcpt, owner),
            )
            if cursor.rowcount != 1:
                return False
            ledger.extend(conn, queue_id, rcpt, until)
            return True

        return await self._write("renew claim", write)

    async def recover_claims(self) -> int:
        """Become one of the spool's claimers; release the claims of claimers that died.

        Every daemon process that claims (:meth:`claim_due`) first registers here: a
        file under ``<database>.owners/`` named by a random token, ``flock``-ed
        until :meth:`close`. Its claims carry the token. The kernel drops a dead
        process's lock (``kill -9`` included), so a token whose file is missing or
        can be locked belongs to a process that stopped mid-attempt: its recipients
        become UNKNOWN (the call may have gone out) and due at once, instead of
        waiting for their leases. Claims of live processes (``serve --workers``)
        are left alone. Returns how many recipients were released.
        """
        owners = self._path.with_name(self._path.name + ".owners")
        if self._owner is None:
            try:
                self._owner, self._owner_fd = await asyncio.to_thread(register_owner, owners)
            except OSError as exc:
                raise StoreError(
                    f"state store {self._path}: cannot register in {owners}: {exc.strerror or exc}",
                    path=self._path,
                ) from exc

        def claimers(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT DISTINCT claimed_by FROM recipients"
                " WHERE claimed_until IS NOT NULL AND claimed_by IS NOT NULL"
                " UNION SELECT DISTINCT owner FROM dedup WHERE state = ? AND owner IS NOT NULL",
                (GuardState.SENDING.value,),
            )
            return [token for (token,) in rows]

        tokens = await self._read("find claimers", claimers)
        dead = await asyncio.to_thread(dead_owners, owners, tokens, self._owner)
        if not dead:
            return 0
        now = self._clock()
        marks = ", ".join("?" * len(dead))

        def write(conn: sqlite3.Connection) -> int:
            # Sessions of the dead processes: their calls may have gone out.
            cut = conn.execute(
                "SELECT message_key, rcpt, queue_id FROM dedup"
                f" WHERE state = ? AND owner IN ({marks})",
                (GuardState.SENDING.value, *dead),
            ).fetchall()
            for key, rcpt, holder in cut:
                self._settle_cut(conn, key, rcpt, holder, now)
            return (
                len(cut)
                + conn.execute(
                    "UPDATE recipients SET claimed_until = NULL, claimed_by = NULL, state = ?,"
                    " error = ?, next_attempt = min(COALESCE(next_attempt, ?), ?), updated_at = ?"
                    f" WHERE claimed_until IS NOT NULL AND claimed_by IN ({marks})"
                    " AND state IN (?, ?)",
                    (
                        RecipientState.UNKNOWN.value,
                        "interrupted: the process stopped during this attempt",
                        now,
                        now,
                        now,
                        *dead,
                        *CLAIMABLE_STATES,
                    ),
                ).rowcount
            )

        return await self._write("recover claims", write)

    async def resolve_stale(self, *, older_than: float) -> int:
        """Settle what sessions that died left behind (see base.Spool); returns rows settled."""
        now = self._clock()

        def write(conn: sqlite3.Connection) -> int:
            cut = conn.execute(*spool_sql.cut_sessions(DIALECT, now)).fetchall()
            for key, rcpt, holder in cut:
                self._settle_cut(conn, key, rcpt, holder, now)
            return len(cut) + conn.execute(*spool_sql.abandoned(DIALECT, now, older_than)).rowcount

        return await self._write("resolve stale", write)

    async def next_due(self) -> float | None:
        """When the next spooled recipient becomes claimable, or None if none waits."""

        def read(conn: sqlite3.Connection) -> float | None:
            (when,) = conn.execute(
                "SELECT MIN(max(r.next_attempt, COALESCE(r.claimed_until, r.next_attempt)))"
                " FROM recipients AS r JOIN messages AS m ON m.queue_id = r.queue_id"
                f" WHERE {_WAITING}",
                _WAITING_PARAMS,
            ).fetchone()
            return None if when is None else float(when)

        return await self._read("find next due", read)

    async def spool_stats(self) -> SpoolStats:
        """Recipients waiting in the spool and the oldest one's ``spooled_at``.

        Dead letters are ``counts()["dead"]``.
        """

        def read(conn: sqlite3.Connection) -> SpoolStats:
            depth, oldest = conn.execute(*_SPOOL_STATS).fetchone()
            return SpoolStats(depth, None if oldest is None else float(oldest))

        return await self._read("read spool stats", read)

    async def dead_letters(self) -> int:
        """How many recipients are dead letters (the ``dead_letters`` gauge)."""

        def read(conn: sqlite3.Connection) -> int:
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM recipients WHERE state = ?", (RecipientState.DEAD.value,)
            ).fetchone()
            return int(count)

        return await self._read("count dead letters", read)

    def on_spooled(self, callback: Callable[[], None]) -> None:
        """Accepted and never called: the process that spools wakes its own workers.

        Another process on the same file (the CLI, ``serve --workers``) is seen
        at the workers' next ``idle_poll``.
        """
