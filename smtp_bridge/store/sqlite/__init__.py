"""The SQLite state store, the embedded default: one file under ``delivery.state_dir``.

Writes go through the group-commit writer thread (:mod:`.writer`); reads through a
second, read-only connection on its own thread: WAL lets it run beside the writer.
The CLI may open the same file while the daemon runs (``smtp-bridge queue``): both
take the write lock with ``BEGIN IMMEDIATE`` and wait up to ``busy_timeout`` for
each other. The rules every backend keeps are in :mod:`smtp_bridge.store.base`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence

from ...outcomes import RecipientState
from .. import spool_sql
from ..records import (
    CONTENT_DONE_STATES,
    Admission,
    Guard,
    MessageRecord,
    Notice,
    RecipientRecord,
)
from ..rules import check_recipients, opening_rows, spooled_copy, waits_in_spool
from . import ledger
from .admin import AdminOps
from .core import BUSY_TIMEOUT_MS
from .schema import DIALECT
from .spool import SpoolOps

__all__ = ["BUSY_TIMEOUT_MS", "SQLiteStore"]


class SQLiteStore(SpoolOps, AdminOps):
    """The SQLite state store. Create with ``await SQLiteStore.open(path)``; ``await close()``.

    Its parts: :mod:`.core` (the file, connections, writer), :mod:`.spool`
    (the workers' side), :mod:`.admin` (queue, console, quotas); the ledger's
    operations are here.
    """

    # -- the public operations ----------------------------------------------------------

    async def previous_outcomes(
        self, message_key: str, rcpts: Iterable[str]
    ) -> dict[str, RecipientState]:
        """For a client retry: lower-cased rcpt -> DELIVERED or UNKNOWN (see base.Ledger)."""
        wanted = sorted({rcpt.lower() for rcpt in rcpts})
        if not wanted:
            return {}
        now = self._clock()
        ttl = self._ttl(message_key)
        return await self._read(
            "read previous outcomes",
            lambda conn: ledger.remembered(conn, message_key, wanted, now, ttl),
        )

    async def open_message(
        self, message: MessageRecord, rcpts: Sequence[str], *, lease: float
    ) -> Admission:
        """Before the calls of direct and hybrid mode, in one commit (see base.Ledger)."""
        now = self._clock()
        rows = opening_rows(message, rcpts)
        request = self._sending(message.queue_id, message.message_key, now, lease)

        def write(conn: sqlite3.Connection) -> Admission:
            reused = self._reused_message_id(conn, message, now)
            # Rows only: their guards are taken just below (nothing to release).
            self._insert_message(conn, message, rows, guards=False)
            guards = ledger.acquire(conn, message.message_key, rcpts, request)
            return Admission(guards, reused)

        return await self._write("open message", write)

    async def acquire(
        self, message_key: str, rcpts: Sequence[str], *, queue_id: str, lease: float
    ) -> dict[str, Guard]:
        """Ask again for guards another copy held (see base.Ledger)."""
        request = self._sending(queue_id, message_key, self._clock(), lease)

        def write(conn: sqlite3.Connection) -> dict[str, Guard]:
            return ledger.acquire(conn, message_key, rcpts, request)

        return await self._write("acquire", write)

    async def record_outcomes(
        self,
        queue_id: str,
        recipients: Sequence[RecipientRecord],
        *,
        message_key: str,
        spool: bytes | None = None,
        mode: str = "hybrid",
    ) -> None:
        """After the calls: every recipient's row in one commit, as :meth:`update_recipient`.

        ``spool``: the message's content, put in the spool in the same commit
        (hybrid mode's transient recipients, due at their ``next_attempt``), before
        the ``250``. A message that does not exist is a StoreError.
        """
        rows = [self._stamped(record) for record in recipients]

        def write(conn: sqlite3.Connection) -> None:
            if spool is not None:
                cursor = conn.execute(
                    "UPDATE messages SET content = ?, mode = ? WHERE queue_id = ?",
                    (spool, mode, queue_id),
                )
                if cursor.rowcount != 1:
                    raise sqlite3.IntegrityError(f"no message {queue_id}")
            for record in rows:
                self._put_recipient(conn, record, message_key)

        await self._write("record outcomes", write)

    async def add_message(
        self, message: MessageRecord, recipients: Sequence[RecipientRecord]
    ) -> Admission:
        """Queue mode's spool: a message and its recipients in one transaction (see base.Ledger)."""
        check_recipients(message, recipients)  # before the writer: the caller's error
        now = self._clock()
        request = self._queued(message.queue_id, message.message_key, now)

        def write(conn: sqlite3.Connection) -> Admission:
            reused = self._reused_message_id(conn, message, now)
            spooled = [r.rcpt for r in recipients if waits_in_spool(r)]
            guards = ledger.acquire(conn, message.message_key, spooled, request)
            kept, rows = spooled_copy(message, recipients, guards)
            self._insert_message(conn, kept, rows)
            return Admission(guards, reused)

        return await self._write("add message", write)

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
        owner = self._owner

        def write(conn: sqlite3.Connection) -> bool:
            if claim:
                found = conn.execute(*spool_sql.claimer(DIALECT, row.queue_id, row.rcpt)).fetchone()
                if found is not None and found[0] != owner:
                    return False  # another claimer took it over after our lease
            self._put_recipient(conn, row, message_key)
            if RecipientState(row.state).value in CONTENT_DONE_STATES:
                conn.execute(*spool_sql.drop_done_content(DIALECT, row.queue_id))
            if notice is not None:
                self._insert_message(conn, notice[0], notice[1])
            return True

        return await self._write("update recipient", write)
