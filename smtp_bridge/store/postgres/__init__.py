"""The PostgreSQL state store: several instances, one bridge (``delivery.store: postgresql://``).

Each call is one transaction on a pooled connection (:mod:`.db`); the schema is
migrated at open under an advisory lock (:mod:`.schema`); writes that spool
content ``NOTIFY`` the other instances (:mod:`.listener`). The rules every
backend keeps are in :mod:`smtp_bridge.store.base`; the SQL mirrors SQLite's.

Claims: :meth:`PostgresStore.claim_due` takes due rows with ``FOR UPDATE SKIP
LOCKED``, so claimers on several hosts never get the same row, and marks them
with this store object's random token; a final write with ``claim=True``
applies only while the row still carries it (fencing). Lease times are on the
database server's clock (hosts' clocks may differ): ``claim_due`` reads it in
its own transaction, and every other "now" of the store (guards' leases,
stamps, the dedup window) is this host's clock corrected by the server's lead
as last measured. An injected ``clock`` (tests) replaces all of that, and
``claim_due`` then honours the ``now`` it is given, as SQLite does. A dead instance's claims are
taken over when their lease runs out (:meth:`PostgresStore.recover_claims` has
no way to tell a dead instance from a slow one and releases nothing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import psycopg

from ...outcomes import RecipientState
from .. import spool_sql
from ..records import (
    CONTENT_DONE_STATES,
    Admission,
    Guard,
    GuardRequest,
    MessageRecord,
    Notice,
    RecipientRecord,
    StoreError,
)
from ..rules import (
    GuardRequests,
    check_recipients,
    message_values,
    opening_rows,
    spooled_copy,
    waits_in_spool,
)
from . import ledger
from .admin import QueueAdminMixin
from .db import DEFAULT_TIMEOUT, Conn, Database
from .history import HistoryMixin
from .listener import SpoolListener
from .quotas import QuotaMixin
from .rows import (
    MESSAGE_INSERT,
    NOTIFY,
    ROWS_PER_STATEMENT,
    insert_message,
    insert_rows,
    one_statement,
    put_recipients,
    recipients_insert,
    recipients_params,
)
from .schema import DIALECT, GUARDS_HELD, migrate
from .spool import SpoolMixin

__all__ = ["PostgresStore"]

_log = logging.getLogger("smtp_bridge.store")

#: An earlier message with this Message-ID and other content (see spool_sql).
_REUSED_MESSAGE_ID: Final = spool_sql.reused_message_id(DIALECT)

#: This host's clock may be this far off the server's before open() warns.
_SKEW_WARNING: Final = 1.0


class PostgresStore(SpoolMixin, QueueAdminMixin, QuotaMixin, HistoryMixin, GuardRequests):
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
        #: On the real clock, leases are the database's (see the module docstring).
        self._db_clock = clock is time.time
        #: The database server's clock minus this host's, as last measured.
        self._offset = 0.0
        self._clock = self._database_time if self._db_clock else clock
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
        max_size: int = 24,
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
        store._offset = -skew
        if abs(skew) > _SKEW_WARNING:
            _log.warning(
                "state store %s: this host's clock is %.1fs off the database server's;"
                " the store keeps time by the server's",
                store.name,
                skew,
            )
        return store

    async def close(self) -> None:
        """Hand back the claims nobody here will settle, let running calls finish,
        then stop listening and close every connection.

        The daemon closes the store after its workers stopped: a claim still
        carrying this store's token is one no attempt of ours will end (claimed as
        the workers stopped). Released, another instance takes it at once instead
        of after its lease; its guard still says SENDING, so that attempt is a
        logged possible duplicate if ours may have been sent.
        """
        if not self._db.closed:
            with contextlib.suppress(StoreError):
                await self._db.run("release claims", self._release_all)
        await self.listener.close()
        await self._db.close()

    async def _release_all(self, conn: Conn) -> None:
        await conn.execute(
            "UPDATE recipients SET claimed_until = NULL, claimed_by = NULL WHERE claimed_by = %s",
            (self.token,),
        )
        await conn.execute(NOTIFY)

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
        """Before the calls of direct and hybrid mode, in one commit (see base.Ledger).

        A new message is one statement, its own transaction (the guards' locks, the
        guards, the message and its rows, the reused Message-ID). When a guard it
        wants has a row (a client's retry, another copy), that statement fails whole
        and the message is opened by the lock-read-decide path instead.
        """
        now = self._clock()
        rows = [self._stamped(r) for r in opening_rows(message, rcpts)]
        check_recipients(message, rows)
        request = self._sending(message.queue_id, message.message_key, now, lease)
        wanted = sorted({rcpt.lower() for rcpt in rcpts})
        if len(wanted) <= ROWS_PER_STATEMENT:
            sql, params = self._new_message_statement(message, rows, wanted, request)

            async def new(conn: Conn) -> str | None:
                try:
                    cursor = await conn.execute(sql, params)
                except psycopg.Error as exc:
                    if exc.sqlstate == GUARDS_HELD:
                        return None  # nothing of it was kept
                    raise
                found = await cursor.fetchone()
                return (found[0] if found else None) or ""

            reused = await self._db.run("open message", new, single=True)
            if reused is not None:
                return Admission({rcpt: Guard(True) for rcpt in wanted}, reused)

        async def write(conn: Conn) -> Admission:
            reused = await self._reused_message_id(conn, message, now)
            await conn.execute(MESSAGE_INSERT, message_values(message))
            await insert_rows(conn, rows)
            guards = await ledger.acquire(conn, message.message_key, rcpts, request)
            return Admission(guards, reused)

        return await self._db.run("open message", write)

    def _new_message_statement(
        self,
        message: MessageRecord,
        rows: Sequence[RecipientRecord],
        wanted: Sequence[str],
        request: GuardRequest,
    ) -> tuple[str, list[object]]:
        """open_message's one statement: all of it, or an error (GUARDS_HELD) and nothing."""
        ctes, params = ledger.take_free(message.message_key, wanted, request)
        sql = (
            f"WITH {ctes}, message AS ({MESSAGE_INSERT}),"
            f" recipient_rows AS ({recipients_insert(len(rows), upsert=False)})"
            " SELECT CASE WHEN (SELECT count(*) FROM taken) = %s"
            f" THEN ({_REUSED_MESSAGE_ID}) ELSE smtp_bridge_guards_held() END"
        )
        params += [*message_values(message), *recipients_params(rows), len(wanted)]
        params += self._reused_params(message, request.now)
        return sql, params

    async def acquire(
        self, message_key: str, rcpts: Sequence[str], *, queue_id: str, lease: float
    ) -> dict[str, Guard]:
        """Ask again for guards another copy held (see base.Ledger)."""
        request = self._sending(queue_id, message_key, self._clock(), lease)

        async def write(conn: Conn) -> dict[str, Guard]:
            return await ledger.acquire(conn, message_key, rcpts, request)

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
        key = message_key

        if spool is None and one_statement(rows):
            # One statement (rows and guards), its own transaction.
            async def put(conn: Conn) -> None:
                await put_recipients(conn, rows, key, self._ttl(key))

            await self._db.run("record outcomes", put, single=True)
            return

        async def write(conn: Conn) -> None:
            # Recipients before their message, the order update_recipient locks them in.
            await put_recipients(conn, rows, key, self._ttl(key))
            if spool is None:
                return
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
        request = self._queued(message.queue_id, message.message_key, now)

        async def write(conn: Conn) -> Admission:
            reused = await self._reused_message_id(conn, message, now)
            spooled = [r.rcpt for r in recipients if waits_in_spool(r)]
            guards = await ledger.acquire(conn, message.message_key, spooled, request)
            kept, rows = spooled_copy(message, recipients, guards)
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
                query = spool_sql.claimer(DIALECT, row.queue_id, row.rcpt, suffix=" FOR UPDATE")
                cursor = await conn.execute(*query)
                found = await cursor.fetchone()
                if found is not None and found[0] != token:
                    return False  # another claimer took it over after our lease
            await put_recipients(conn, [row], message_key, self._ttl(message_key))
            if state.value in CONTENT_DONE_STATES:
                await conn.execute(*spool_sql.drop_done_content(DIALECT, row.queue_id))
            if notice is not None:
                await self._insert_message(conn, notice[0], notice[1])
            return True

        return await self._db.run("update recipient", write)

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
        self,
        conn: Conn,
        message: MessageRecord,
        recipients: Sequence[RecipientRecord],
    ) -> None:
        check_recipients(message, recipients)
        rows = [self._stamped(record) for record in recipients]
        await insert_message(conn, message, rows, self._ttl(message.message_key))
        if message.content is not None:
            await conn.execute(NOTIFY)

    def _guard_owner(self) -> str | None:
        return self.token  # this instance (its claims are fenced by it)

    async def _reused_message_id(self, conn: Conn, message: MessageRecord, now: float) -> str:
        """The queue id of an earlier message with this Message-ID and other content, or ""."""
        if not message.message_id:
            return ""
        cursor = await conn.execute(_REUSED_MESSAGE_ID, self._reused_params(message, now))
        row = await cursor.fetchone()
        return str(row[0]) if row else ""

    def _reused_params(self, message: MessageRecord, now: float) -> list[object]:
        # No Message-ID (None) matches no row.
        return [message.message_id or None, message.message_key, now - self._dedup_ttl]

    def _database_time(self) -> float:
        return time.time() + self._offset

    def _stamped(self, record: RecipientRecord) -> RecipientRecord:
        if record.updated_at:
            return record
        return dataclasses.replace(record, updated_at=self._clock())


async def _clock_skew(conn: Conn) -> float:
    """Seconds this host's clock is ahead of the database server's."""
    cursor = await conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
    row = await cursor.fetchone()
    return time.time() - float(row[0]) if row is not None else 0.0
