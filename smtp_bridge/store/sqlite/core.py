"""The SQLite store's core: the file, its two connections, the writer, the shared row writes."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, Self, TypeVar

from ...errors import StoreError
from .. import spool_sql
from ..records import MessageRecord, RecipientRecord
from ..rules import (
    MESSAGE_COLUMNS,
    RECIPIENT_COLUMNS,
    GuardRequests,
    check_recipients,
    message_values,
    recipient_values,
)
from . import ledger
from .reader import ReadThread
from .schema import DIALECT, MIGRATIONS, SCHEMA_VERSION
from .writer import GroupCommitWriter

__all__ = ["BUSY_TIMEOUT_MS", "SQLiteCore"]

_T = TypeVar("_T")

#: How long a statement waits for another process (the CLI) to release the lock.
BUSY_TIMEOUT_MS: Final = 5000


class SQLiteCore(GuardRequests):
    """What every part of the SQLite store stands on. Open with ``await open(path)``."""

    def __init__(
        self,
        path: Path,
        *,
        dedup_ttl: float,
        anonymous_ttl: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Use SQLiteStore.open(): __init__ only sets fields, it starts nothing.
        self._path = path
        self._dedup_ttl = dedup_ttl
        self._anonymous_ttl = min(anonymous_ttl, dedup_ttl)
        self._clock = clock
        #: The group-commit writer thread; ``writer.commits`` counts its transactions.
        self.writer = GroupCommitWriter(path, self._connect_writer)
        #: The reader thread, with its own read-only connection.
        self._reads = ReadThread(self._connect_reader)
        #: This process's claimer token and its locked file (:meth:`recover_claims`).
        self._owner: str | None = None
        self._owner_fd: int | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        dedup_ttl: float = 86400.0,
        anonymous_ttl: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> Self:
        """Open (creating if needed) the database file ``path`` and its parent directory.

        ``clock`` supplies "now" for records written with ``updated_at`` 0.0 and for
        the dedup window; tests inject one instead of sleeping.
        """
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create state directory {path.parent}: {exc.strerror or exc}", path=path
            ) from exc
        store = cls(path, dedup_ttl=dedup_ttl, anonymous_ttl=anonymous_ttl, clock=clock)
        await store.writer.start()
        try:
            await store._reads.start()
        except BaseException as exc:
            await store.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot open state store {path}: {exc}", path=path) from exc
            raise
        return store

    async def close(self) -> None:
        """Finish the queued writes, then close both connections and their threads."""
        if self._closed:
            return
        self._closed = True
        await self.writer.stop()
        await self._reads.stop()
        if self._owner_fd is not None:
            # A clean stop: every claim is settled, the token is not needed any more.
            owners = self._path.with_name(self._path.name + ".owners")
            with contextlib.suppress(OSError):
                (owners / str(self._owner)).unlink()
            os.close(self._owner_fd)  # releases the flock
            self._owner_fd = None

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def name(self) -> str:
        """The database file, for logs and errors."""
        return str(self._path)

    @property
    def dedup_ttl(self) -> float:
        """Seconds a delivered/unknown (message, recipient) pair is remembered."""
        return self._dedup_ttl

    async def check_writable(self) -> bool:
        """A cheap write probe for /readyz: True when a transaction commits."""
        now = self._clock()

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('writable_probe', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (now,),
            )

        try:
            await self._write("write probe", write)
        except StoreError:
            return False
        return True

    # -- writes --------------------------------------------------------------------------

    async def _write(self, what: str, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        return await self.writer.submit(what, fn)

    # -- reads ----------------------------------------------------------------------------

    async def _read(self, what: str, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed:
            raise StoreError(f"state store {self._path} is closed", path=self._path)
        try:
            return await self._reads.submit(fn)
        except sqlite3.Error as exc:
            raise StoreError(
                f"state store {self._path}: {what} failed: {exc}", path=self._path
            ) from exc

    # -- connections and schema -----------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; BEGIN/COMMIT are explicit.
        conn = sqlite3.connect(self._path, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect_reader(self) -> sqlite3.Connection:
        conn = self._connect()
        try:
            conn.execute("PRAGMA query_only = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect_writer(self) -> sqlite3.Connection:
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot open state store {self._path}: {exc}", path=self._path
            ) from exc
        try:
            self._prepare(conn)
        except BaseException as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(
                    f"cannot open state store {self._path}: {exc}", path=self._path
                ) from exc
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise StoreError(
                f"cannot open state store {self._path}: WAL journal unavailable (got {mode})",
                path=self._path,
            )
        # FULL: each commit fsyncs the WAL, so a committed 250 survives power loss.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("BEGIN IMMEDIATE")
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"cannot open state store {self._path}: schema version {version} is newer"
                f" than this smtp-bridge supports ({SCHEMA_VERSION})",
                path=self._path,
            )
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                conn.execute(statement)
        if version != SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")

    # -- row helpers ---------------------------------------------------------------------

    def _insert_message(
        self,
        conn: sqlite3.Connection,
        message: MessageRecord,
        recipients: Sequence[RecipientRecord],
        *,
        guards: bool = True,
    ) -> None:
        check_recipients(message, recipients)
        conn.execute(
            f"INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            message_values(message),
        )
        for record in recipients:
            self._put_recipient(conn, self._stamped(record), message.message_key, guards=guards)

    def _stamped(self, record: RecipientRecord) -> RecipientRecord:
        if record.updated_at:
            return record
        return dataclasses.replace(record, updated_at=self._clock())

    def _put_recipient(
        self,
        conn: sqlite3.Connection,
        record: RecipientRecord,
        message_key: str,
        *,
        guards: bool = True,
    ) -> None:
        conn.execute(
            f"INSERT INTO recipients ({RECIPIENT_COLUMNS}, claimed_until)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)"
            " ON CONFLICT (queue_id, rcpt) DO UPDATE SET"
            " state = excluded.state, route = excluded.route,"
            " template_id = excluded.template_id, api_code = excluded.api_code,"
            " reply = excluded.reply, attempts = max(attempts, excluded.attempts),"
            " next_attempt = excluded.next_attempt, updated_at = excluded.updated_at,"
            " error = excluded.error, claimed_until = NULL, claimed_by = NULL,"
            " spooled_at = COALESCE(excluded.spooled_at, spooled_at)",
            recipient_values(record),
        )
        if guards:
            ledger.record_outcome(conn, message_key, record, ttl=self._ttl(message_key))

    @staticmethod
    def _settle_cut(conn: sqlite3.Connection, key: str, rcpt: str, holder: str, now: float) -> None:
        """A session's call cut by its process's end: UNKNOWN, guard and row alike."""
        for query in spool_sql.settle_cut(DIALECT, key, rcpt, holder, now):
            conn.execute(*query)

    def _guard_owner(self) -> str | None:
        return self._owner  # this process (its lock file says whether it lives)

    def _reused_message_id(
        self, conn: sqlite3.Connection, message: MessageRecord, now: float
    ) -> str:
        """The queue id of an earlier message with this Message-ID and other content, or ""."""
        if not message.message_id:
            return ""
        row = conn.execute(
            REUSED_MESSAGE_ID, (message.message_id, message.message_key, now - self._dedup_ttl)
        ).fetchone()
        return str(row[0]) if row else ""


#: An earlier message with this Message-ID and other content (see spool_sql).
REUSED_MESSAGE_ID: Final = spool_sql.reused_message_id(DIALECT)
