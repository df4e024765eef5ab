"""The PostgreSQL state store: several instances, one bridge (``delivery.store: postgresql://``).

Each call is one transaction on a pooled connection (:mod:`.db`); the schema is
migrated at open under an advisory lock (:mod:`.schema`); writes that spool
content ``NOTIFY`` the other instances (:mod:`.listener`). The rules every
backend keeps are in :mod:`smtp_bridge.store.base`; the SQL mirrors SQLite's.

Claims: :meth:`PostgresStore.claim_due` takes due rows with ``FOR UPDATE SKIP
LOCKED``, so claimers on several hosts never get the same row, and marks them
with this store object's random token; a final write with ``claim=True``
applies only while the row still carries it (fencing). Lease times are on the
caller's clock, as in SQLite: ``claim_due`` compares and sets ``claimed_until``
with the ``now`` it is given, ``renew_claim`` with the store's ``clock``. The
instances' clocks must therefore agree to well within ``delivery.claim_lease``
(NTP does); :meth:`PostgresStore.open` logs a warning when this host's clock is
more than a second off the database server's. A dead instance's claims are
taken over when their lease runs out (:meth:`PostgresStore.recover_claims` has
no way to tell a dead instance from a slow one and releases nothing).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import psycopg

from ...outcomes import RecipientState
from ..records import (
    ANONYMOUS_KEY_PREFIX,
    CLAIMABLE_STATES,
    CONTENT_DONE_STATES,
    Admission,
    Guard,
    GuardState,
    MessageRecord,
    Notice,
    RecipientRecord,
    SpoolStats,
    StoreError,
)
from . import ledger
from .admin import QueueAdminMixin
from .db import DEFAULT_TIMEOUT, Conn, Database
from .listener import SpoolListener
from .rows import (
    NOTIFY,
    check_recipients,
    insert_message,
    message_row,
    put_recipients,
    recipient_row,
)
from .schema import MESSAGE_COLUMNS, RECIPIENT_COLUMNS, migrate

__all__ = ["PostgresStore"]

_log = logging.getLogger("smtp_bridge.store")

#: Rows one DELETE of :meth:`PostgresStore.purge_expired` removes at most.
PURGE_BATCH: Final = 1000
#: This host's clock may be this far off the server's before open() warns.
_SKEW_WARNING: Final = 1.0
#: A session's call cut by a crash, settled by resolve_stale.
_CUT: Final = "interrupted: the session ended during the call; it may have been sent"
#: A session that ended before it sent anything or answered its client.
_ABANDONED: Final = "interrupted: the session ended before its reply; this copy sent nothing"
#: The error text of a recipient whose last attempt never recorded its end.
_INTERRUPTED: Final = "interrupted: the attempt stopped before its answer was recorded"


class PostgresStore(QueueAdminMixin):
    """The PostgreSQL state store. Create with ``await PostgresStore.open(url)``."""

    def __init__(
        self,
        url: str,
        *,
        dedup_ttl: float,
        anonymous_ttl: float,
        claim_lease: float,
        clock: Callable[[], float],
        timeout: float,
        min_size: int,
        max_size: int,
    ) -> None:
        # Use PostgresStore.open(): __init__ only sets fields, it connects nothing.
        self._db = Database(url, timeout=timeout, min_size=min_size, max_size=max_size)
        self._dedup_ttl = dedup_ttl
        self._anonymous_ttl = min(anonymous_ttl, dedup_ttl)
        self._clock = clock
        #: The lease ``delivery.claim_lease`` asks for (callers pass it per claim).
        self.claim_lease = claim_lease
        #: This store object's claimer token: ``claimed_by`` of the rows it claims.
        self.token = secrets.token_hex(8)
        #: The LISTEN connection behind :meth:`on_spooled`.
        self.listener = SpoolListener(
            url, name=self._db.name, connect_kwargs=self._db.connect_kwargs, scrub=self._db.scrub
        )

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        dedup_ttl: float = 86400.0,
        anonymous_ttl: float = 3600.0,
        claim_lease: float = 60.0,
        clock: Callable[[], float] = time.time,
        timeout: float = DEFAULT_TIMEOUT,
        min_size: int = 1,
        max_size: int = 10,
    ) -> PostgresStore:
        """Connect to ``url`` (a libpq URL) and migrate its schema.

        ``clock`` supplies "now" for records written with ``updated_at`` 0.0 and for
        the dedup window, as in SQLite. ``timeout``: seconds to connect or to wait
        for a pooled connection before a call fails with StoreError.
        """
        store = cls(
            url,
            dedup_ttl=dedup_ttl,
            anonymous_ttl=anonymous_ttl,
            claim_lease=claim_lease,
            clock=clock,
            timeout=timeout,
            min_size=min_size,
            max_size=max_size,
        )
        # The schema first, on a connection of its own: its error says why
        # (refused, authentication, no such database), the pool's only "timeout".
        async with await store._db.connect() as conn:
            try:
                await migrate(conn, store.name)
                skew = await _clock_skew(conn)
            except psycopg.Error as exc:
                raise store._db.error("migrate schema", exc) from exc
        await store._db.open()
        if abs(skew) > _SKEW_WARNING:
            _log.warning(
                "state store %s: this host's clock is %.1fs off the database server's;"
                " spool claims need the instances' clocks in agreement",
                store.name,
                skew,
            )
        return store

    async def close(self) -> None:
        """Let running calls finish, then stop listening and close every connection."""
        await self.listener.close()
        await self._db.close()

    @property
    def name(self) -> str:
        """The database URL without its password, for logs and errors."""
        return self._db.name

    @property
    def dedup_ttl(self) -> float:
        """Seconds a delivered/unknown (message, recipient) pair is remembered."""
        return self._dedup_ttl

    def on_spooled(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the event loop whenever any instance spools work."""
        self.listener.add(callback)

    # -- the ledger -----------------------------------------------------------------------

    async def previous_outcomes(
        self, message_key: str, rcpts: Iterable[str]
    ) -> dict[str, RecipientState]:
        """For a client retry: lower-cased rcpt -> DELIVERED or UNKNOWN (see base.Ledger)."""
        wanted = sorted({rcpt.lower() for rcpt in rcpts})
        if not wanted:
            return {}
        now = self._clock()
        ttl = self._ttl(message_key)

        async def read(conn: Conn) -> dict[str, RecipientState]:
            return await ledger.remembered(conn, message_key, wanted, now, ttl)

        return await self._db.run("read previous outcomes", read)

    async def open_message(
        self, message: MessageRecord, rcpts: Sequence[str], *, lease: float
    ) -> Admission:
        """Before the calls of direct and hybrid mode, in one commit (see base.Ledger)."""
        now = self._clock()
        rows = [
            RecipientRecord(
                queue_id=message.queue_id,
                rcpt=rcpt,
                state=RecipientState.RETRYING,
                updated_at=message.received_at,
            )
            for rcpt in rcpts
        ]

        async def write(conn: Conn) -> Admission:
            reused = await self._reused_message_id(conn, message, now)
            await self._insert_message(conn, message, rows)
            guards = await ledger.acquire(
                conn,
                message.message_key,
                rcpts,
                holder=message.queue_id,
                state=GuardState.SENDING,
                until=now + lease,
                now=now,
                ttl=self._ttl(message.message_key),
                owner=self.token,
            )
            return Admission(guards, reused)

        return await self._db.run("open message", write)

    async def acquire(
        self, message_key: str, rcpts: Sequence[str], *, queue_id: str, lease: float
    ) -> dict[str, Guard]:
        """Ask again for guards another copy held (see base.Ledger)."""
        now = self._clock()

        async def write(conn: Conn) -> dict[str, Guard]:
            return await ledger.acquire(
                conn,
                message_key,
                rcpts,
                holder=queue_id,
                state=GuardState.SENDING,
                until=now + lease,
                now=now,
                ttl=self._ttl(message_key),
                owner=self.token,
            )

        return await self._db.run("acquire", write)

    async def record_outcomes(
        self,
        queue_id: str,
        recipients: Sequence[RecipientRecord],
        *,
        message_key: str,
        spool: bytes | None = None,
        mode: str = "hybrid",
    ) -> None:
        """After the calls: every recipient's row, and ``spool`` content, in one commit."""
        rows = [self._stamped(record) for record in recipients]

        async def write(conn: Conn) -> None:
            # Recipients before their message, the order update_recipient locks them in.
            await put_recipients(conn, rows, message_key, self._ttl(message_key))
            if spool is not None:
                cursor = await conn.execute(
                    "UPDATE messages SET content = %s, mode = %s WHERE queue_id = %s",
                    (spool, mode, queue_id),
                )
                if cursor.rowcount != 1:
                    raise StoreError(
                        f"state store {self.name}: record outcomes failed: no message {queue_id}"
                    )
                await conn.execute(NOTIFY)

        await self._db.run("record outcomes", write)

    async def add_message(
        self, message: MessageRecord, recipients: Sequence[RecipientRecord]
    ) -> Admission:
        """Queue mode's spool: a message and its recipients in one transaction (see base.Ledger)."""
        check_recipients(message, recipients)
        now = self._clock()
        ttl = self._ttl(message.message_key)

        async def write(conn: Conn) -> Admission:
            reused = await self._reused_message_id(conn, message, now)
            spooled = [r.rcpt for r in recipients if _waits_in_spool(r)]
            guards = await ledger.acquire(
                conn,
                message.message_key,
                spooled,
                holder=message.queue_id,
                state=GuardState.QUEUED,
                until=None,
                now=now,
                ttl=ttl,
            )
            rows = [_as_duplicate(r, guards.get(r.rcpt.lower())) for r in recipients]
            kept = message
            copies = any(r.state is RecipientState.DUPLICATE for r in rows)
            if copies and not any(_waits_in_spool(r) for r in rows):
                kept = dataclasses.replace(message, content=None)  # another copy sends it
            await self._insert_message(conn, kept, rows)
            return Admission(guards, reused)

        return await self._db.run("add message", write)

    async def update_recipient(
        self,
        record: RecipientRecord,
        *,
        message_key: str,
        notice: Notice | None = None,
        claim: bool = False,
    ) -> bool:
        """Set one recipient row and release its claim (rules: :class:`~..base.Ledger`)."""
        row = self._stamped(record)
        state = RecipientState(row.state)
        if notice is not None:
            check_recipients(notice[0], notice[1])
        token = self.token

        async def write(conn: Conn) -> bool:
            if claim:
                # FOR UPDATE: no claimer can take the row between this check and the write.
                cursor = await conn.execute(
                    "SELECT claimed_by FROM recipients WHERE queue_id = %s AND rcpt = %s"
                    " FOR UPDATE",
                    (row.queue_id, row.rcpt),
                )
                found = await cursor.fetchone()
                if found is not None and found[0] != token:
                    return False  # another claimer took it over after our lease
            await put_recipients(conn, [row], message_key, self._ttl(message_key))
            if state.value in CONTENT_DONE_STATES:
                await conn.execute(
                    "UPDATE messages SET content = NULL WHERE queue_id = %s"
                    " AND content IS NOT NULL AND NOT EXISTS ("
                    "  SELECT 1 FROM recipients WHERE queue_id = messages.queue_id"
                    "  AND state <> ALL(%s))",
                    (row.queue_id, list(CONTENT_DONE_STATES)),
                )
            if notice is not None:
                await self._insert_message(conn, notice[0], notice[1])
            return True

        return await self._db.run("update recipient", write)

    # -- the spool ------------------------------------------------------------------------

    async def claim_due(
        self, *, now: float, limit: int, lease: float
    ) -> list[tuple[MessageRecord, RecipientRecord]]:
        """Claim up to ``limit`` spooled recipients due at ``now`` for ``lease`` seconds.

        One statement locks the due rows with ``SKIP LOCKED`` (rows another
        claimer is taking right now are left to it), counts the attempt and sets
        ``claimed_until = now + lease`` and ``claimed_by`` to this store's token.
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
        params = {
            "claimable": list(CLAIMABLE_STATES),
            "now": now,
            "limit": limit,
            "until": now + lease,
            "token": self.token,
        }

        async def write(conn: Conn) -> list[tuple[MessageRecord, RecipientRecord]]:
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
                    conn, key, record.rcpt, holder=record.queue_id, until=now + lease, now=now
                )
                if prior is GuardState.SENDING:
                    # An attempt that never recorded its end: its call may have gone out.
                    await conn.execute(
                        "UPDATE recipients SET state = %s, error = %s"
                        " WHERE queue_id = %s AND rcpt = %s",
                        (RecipientState.UNKNOWN.value, _INTERRUPTED, record.queue_id, record.rcpt),
                    )
                    record = dataclasses.replace(
                        record, state=RecipientState.UNKNOWN, error=_INTERRUPTED
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
            cursor = await conn.execute(
                "SELECT d.message_key, d.rcpt, d.queue_id FROM dedup AS d"
                " WHERE d.state = %s AND d.lease_until < %s AND EXISTS (SELECT 1 FROM messages"
                " AS m WHERE m.queue_id = d.queue_id AND m.content IS NULL)"
                " ORDER BY d.message_key, d.rcpt FOR UPDATE OF d SKIP LOCKED",
                (GuardState.SENDING.value, now),
            )
            cut = await cursor.fetchall()
            for key, rcpt, holder in cut:
                await conn.execute(
                    "UPDATE dedup SET state = %s, lease_until = NULL, owner = NULL,"
                    " updated_at = %s WHERE message_key = %s AND rcpt = %s",
                    (GuardState.UNKNOWN.value, now, key, rcpt),
                )
                await conn.execute(
                    "UPDATE recipients SET state = %s, error = %s, next_attempt = NULL,"
                    " updated_at = %s WHERE queue_id = %s AND lower(rcpt) = %s AND state = %s",
                    (
                        RecipientState.UNKNOWN.value,
                        _CUT,
                        now,
                        holder,
                        rcpt,
                        RecipientState.RETRYING.value,
                    ),
                )
            # Copies that never got to send (waiting for another copy, or cut before).
            cursor = await conn.execute(
                "UPDATE recipients AS r SET state = %s, error = %s, updated_at = %s"
                " WHERE r.state = %s AND r.next_attempt IS NULL AND r.updated_at < %s"
                " AND EXISTS (SELECT 1 FROM messages AS m WHERE m.queue_id = r.queue_id"
                " AND m.content IS NULL)",
                (
                    RecipientState.FAILED.value,
                    _ABANDONED,
                    now,
                    RecipientState.RETRYING.value,
                    now - older_than,
                ),
            )
            return len(cut) + int(cursor.rowcount)

        return await self._db.run("resolve stale", write)

    async def next_due(self) -> float | None:
        """When the next spooled recipient becomes claimable, or None if none waits."""

        async def read(conn: Conn) -> float | None:
            cursor = await conn.execute(
                "SELECT MIN(GREATEST(r.next_attempt, COALESCE(r.claimed_until, r.next_attempt)))"
                " FROM recipients AS r JOIN messages AS m ON m.queue_id = r.queue_id"
                " WHERE r.state = ANY(%s) AND r.next_attempt IS NOT NULL"
                " AND m.content IS NOT NULL",
                (list(CLAIMABLE_STATES),),
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
            removed = 0
            while True:
                cursor = await conn.execute(
                    "DELETE FROM dedup WHERE ctid = ANY(ARRAY("
                    " SELECT ctid FROM dedup WHERE state = ANY(%s) AND updated_at <="
                    " CASE WHEN starts_with(message_key, %s) THEN %s ELSE %s END LIMIT %s))",
                    (remembered, ANONYMOUS_KEY_PREFIX, anonymous_cutoff, cutoff, PURGE_BATCH),
                )
                removed += cursor.rowcount
                if cursor.rowcount < PURGE_BATCH:
                    break
            # Guards whose holder's row is gone (purged by hand, or expired).
            while True:
                cursor = await conn.execute(
                    "DELETE FROM dedup WHERE ctid = ANY(ARRAY("
                    " SELECT d.ctid FROM dedup AS d WHERE d.state = ANY(%s) AND NOT EXISTS"
                    " (SELECT 1 FROM recipients AS r WHERE r.queue_id = d.queue_id"
                    " AND lower(r.rcpt) = d.rcpt) LIMIT %s))",
                    (guards, PURGE_BATCH),
                )
                removed += cursor.rowcount
                if cursor.rowcount < PURGE_BATCH:
                    break
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
            while True:
                cursor = await conn.execute(
                    "DELETE FROM recipients WHERE ctid = ANY(ARRAY("
                    " SELECT r.ctid FROM recipients AS r WHERE r.updated_at <= %s"
                    " AND NOT EXISTS (SELECT 1 FROM messages AS m WHERE m.queue_id = r.queue_id)"
                    " LIMIT %s))",
                    (cutoff, PURGE_BATCH),
                )
                removed += cursor.rowcount
                if cursor.rowcount < PURGE_BATCH:
                    break
            return removed

        return await self._db.run("purge", write)

    async def spool_stats(self) -> SpoolStats:
        """Recipients waiting in the spool and the oldest one's ``spooled_at``."""

        async def read(conn: Conn) -> SpoolStats:
            cursor = await conn.execute(
                "SELECT COUNT(*), MIN(COALESCE(r.spooled_at, m.received_at))"
                " FROM recipients AS r JOIN messages AS m ON m.queue_id = r.queue_id"
                " WHERE r.state = ANY(%s) AND r.next_attempt IS NOT NULL"
                " AND m.content IS NOT NULL",
                (list(CLAIMABLE_STATES),),
            )
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

    async def check_writable(self) -> bool:
        """A cheap write probe for /readyz: True when a transaction commits."""
        now = self._clock()

        async def write(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES ('writable_probe', %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (repr(now),),
            )

        try:
            await self._db.run("write probe", write)
        except StoreError:
            return False
        return True

    # -- helpers ------------------------------------------------------------------------

    async def _insert_message(
        self, conn: Conn, message: MessageRecord, recipients: Sequence[RecipientRecord]
    ) -> None:
        check_recipients(message, recipients)
        rows = [self._stamped(record) for record in recipients]
        await insert_message(conn, message, rows, self._ttl(message.message_key))
        if message.content is not None:
            await conn.execute(NOTIFY)

    def _ttl(self, message_key: str) -> float:
        """How long the outcome of a message with this key is remembered."""
        if message_key.startswith(ANONYMOUS_KEY_PREFIX):
            return self._anonymous_ttl
        return self._dedup_ttl

    async def _reused_message_id(self, conn: Conn, message: MessageRecord, now: float) -> str:
        """The queue id of an earlier message with this Message-ID and other content, or ""."""
        if not message.message_id:
            return ""
        cursor = await conn.execute(
            "SELECT queue_id FROM messages WHERE message_id = %s AND message_key <> %s"
            " AND received_at > %s ORDER BY received_at DESC LIMIT 1",
            (message.message_id, message.message_key, now - self._dedup_ttl),
        )
        row = await cursor.fetchone()
        return str(row[0]) if row else ""

    def _stamped(self, record: RecipientRecord) -> RecipientRecord:
        if record.updated_at:
            return record
        return dataclasses.replace(record, updated_at=self._clock())


async def _clock_skew(conn: Conn) -> float:
    """Seconds this host's clock is ahead of the database server's."""
    cursor = await conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
    row = await cursor.fetchone()
    return time.time() - float(row[0]) if row is not None else 0.0


def _waits_in_spool(record: RecipientRecord) -> bool:
    return record.next_attempt is not None and record.state in (
        RecipientState.RETRYING,
        RecipientState.UNKNOWN,
    )


def _as_duplicate(record: RecipientRecord, guard: Guard | None) -> RecipientRecord:
    """A spooled recipient whose guard another copy holds: this copy will not send it."""
    if guard is None or guard.acquired or not _waits_in_spool(record):
        return record
    state = guard.state.value if guard.state else "held"
    return dataclasses.replace(
        record,
        state=RecipientState.DUPLICATE,
        next_attempt=None,
        spooled_at=None,
        error=f"same message as {guard.holder} ({state})",
    )
