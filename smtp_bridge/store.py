"""SQLite state store: delivery records, client-retry dedup and the spool, off the event loop.

One writer thread owns the only writing connection and commits *groups* of
operations: everything queued while the previous transaction was being made
durable goes into the next one, so a burst of recipients costs one fsync, not
one each. A caller's coroutine returns only after the transaction holding its
write has committed (WAL, ``synchronous=FULL``); if that commit fails, every
caller of the batch gets :class:`StoreError`. Reads go through a second,
read-only connection on its own thread: WAL lets it run beside the writer.

The CLI may open the same file while the daemon runs (DESIGN 6, ``queue``):
both take the write lock with ``BEGIN IMMEDIATE`` and wait up to
``busy_timeout`` for each other.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from .outcomes import RecipientState

__all__ = ["MessageRecord", "RecipientRecord", "Store", "StoreError"]

_T = TypeVar("_T")

#: ``PRAGMA user_version`` of the schema this module writes; ``_MIGRATIONS[i]``
#: takes a database from version ``i`` to ``i + 1``.
SCHEMA_VERSION: Final = 1
#: How long a statement waits for another process (the CLI) to release the lock.
BUSY_TIMEOUT_MS: Final = 5000
#: Upper bound on the operations committed together, to bound one batch's latency.
MAX_BATCH: Final = 1000
#: Recipients in these states will never be attempted again.
FINAL_STATES: Final = frozenset(
    {RecipientState.DELIVERED, RecipientState.FAILED, RecipientState.DEAD, RecipientState.DROPPED}
)
#: States remembered per (message key, recipient) so a client retry does not resend
#: (DESIGN 2, "No duplicates on client retry").
_DEDUP_STATES: Final = frozenset({RecipientState.DELIVERED, RecipientState.UNKNOWN})
#: States a queue worker picks up (given spooled content and a due ``next_attempt``).
_CLAIMABLE_STATES: Final = (RecipientState.RETRYING.value, RecipientState.UNKNOWN.value)
#: Keeps ``IN (...)`` lists below SQLite's bound-parameter limit.
_IN_CHUNK: Final = 500

_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE IF NOT EXISTS messages (
            queue_id TEXT PRIMARY KEY,
            message_key TEXT NOT NULL,
            mail_from TEXT NOT NULL,
            client TEXT NOT NULL,
            user TEXT NOT NULL,
            subject TEXT NOT NULL,
            size INTEGER NOT NULL,
            received_at REAL NOT NULL,
            mode TEXT NOT NULL,
            content BLOB NULL
        )""",
        "CREATE INDEX IF NOT EXISTS messages_received ON messages (received_at)",
        """CREATE TABLE IF NOT EXISTS recipients (
            queue_id TEXT NOT NULL,
            rcpt TEXT NOT NULL,
            state TEXT NOT NULL,
            route TEXT NOT NULL DEFAULT '',
            template_id TEXT NOT NULL DEFAULT '',
            api_code INTEGER NULL,
            reply TEXT NOT NULL DEFAULT '',
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt REAL NULL,
            claimed_until REAL NULL,
            updated_at REAL NOT NULL,
            error TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (queue_id, rcpt)
        )""",
        "CREATE INDEX IF NOT EXISTS recipients_due ON recipients (state, next_attempt)",
        "CREATE INDEX IF NOT EXISTS recipients_updated ON recipients (updated_at)",
        """CREATE TABLE IF NOT EXISTS dedup (
            message_key TEXT NOT NULL,
            rcpt TEXT NOT NULL,
            queue_id TEXT NOT NULL,
            state TEXT NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (message_key, rcpt)
        )""",
        "CREATE INDEX IF NOT EXISTS dedup_updated ON dedup (updated_at)",
        # Small key/value table; also the target of the /readyz write probe.
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)",
    ),
)
assert len(_MIGRATIONS) == SCHEMA_VERSION

_MESSAGE_COLUMNS: Final = (
    "queue_id, message_key, mail_from, client, user, subject, size, received_at, mode, content"
)
_RECIPIENT_COLUMNS: Final = (
    "queue_id, rcpt, state, route, template_id, api_code, reply, attempts, next_attempt, "
    "updated_at, error"
)


class StoreError(Exception):
    """A state-store failure (cannot open, disk full, read-only, locked, closed).

    The message names the database file and the SQLite error, never message content.
    """

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """One accepted message; ``content`` is set only when it is spooled (queue/hybrid)."""

    queue_id: str
    message_key: str
    mail_from: str
    client: str
    user: str
    subject: str
    size: int
    received_at: float
    mode: str
    content: bytes | None = None


@dataclass(frozen=True, slots=True)
class RecipientRecord:
    """The recorded outcome of one envelope recipient of one message.

    ``updated_at`` 0.0 means "now" (the store's clock) when written.
    """

    queue_id: str
    rcpt: str
    state: RecipientState
    route: str = ""
    template_id: str = ""
    api_code: int | None = None
    reply: str = ""
    attempts: int = 0
    next_attempt: float | None = None
    updated_at: float = 0.0
    error: str = ""


@dataclass(slots=True)
class _Op:
    """One queued write: ``fn`` runs on the writer thread inside the batch transaction.

    ``alone`` ops run by themselves outside any transaction, before the batch: for
    statements SQLite refuses inside one (checkpoints, connection PRAGMAs).
    """

    what: str
    fn: Callable[[sqlite3.Connection], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    alone: bool = False


_STOP: Final = object()


class Store:
    """The SQLite state store. Create with ``await Store.open(path)``; ``await close()``."""

    def __init__(
        self, path: Path, *, dedup_ttl: float, clock: Callable[[], float] = time.time
    ) -> None:
        # Use Store.open(): __init__ only sets fields, it starts nothing.
        self._path = path
        self._dedup_ttl = dedup_ttl
        self._clock = clock
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._writer_done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._writer: threading.Thread | None = None
        self._reader = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="smtp-bridge-store-reader"
        )
        self._rconn: sqlite3.Connection | None = None
        self._closed = False
        #: Transactions committed by the writer (group commit: fewer than writes).
        self.commits = 0

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        dedup_ttl: float = 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> Store:
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
        store = cls(path, dedup_ttl=dedup_ttl, clock=clock)
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        store._writer = threading.Thread(
            target=store._writer_main,
            args=(ready,),
            name="smtp-bridge-store-writer",
            daemon=True,
        )
        store._writer.start()
        try:
            await asyncio.wrap_future(ready)
        except BaseException:
            store._queue.put(_STOP)  # if the writer did start (we were cancelled), stop it
            await asyncio.wrap_future(store._writer_done)
            store._reader.shutdown(wait=True)
            raise
        try:
            loop = asyncio.get_running_loop()
            store._rconn = await loop.run_in_executor(store._reader, store._connect_reader)
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
        if self._writer is not None:
            self._queue.put(_STOP)
            await asyncio.wrap_future(self._writer_done)
            self._writer.join()  # it has finished; this returns at once
        if self._rconn is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._reader, self._rconn.close)
            self._rconn = None
        self._reader.shutdown(wait=True)

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def dedup_ttl(self) -> float:
        """Seconds a delivered/unknown (message, recipient) pair is remembered."""
        return self._dedup_ttl

    # -- the public operations ----------------------------------------------------------

    async def previous_outcomes(
        self, message_key: str, rcpts: Iterable[str]
    ) -> dict[str, RecipientState]:
        """For a client retry: lower-cased rcpt -> DELIVERED or UNKNOWN, within ``dedup_ttl``.

        Recipients with nothing remembered are absent from the answer.
        """
        wanted = sorted({rcpt.lower() for rcpt in rcpts})
        if not wanted:
            return {}
        cutoff = self._clock() - self._dedup_ttl

        def read(conn: sqlite3.Connection) -> dict[str, RecipientState]:
            found: dict[str, RecipientState] = {}
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[start : start + _IN_CHUNK]
                marks = ", ".join("?" * len(chunk))
                rows = conn.execute(
                    "SELECT rcpt, state FROM dedup"
                    f" WHERE message_key = ? AND updated_at > ? AND rcpt IN ({marks})",
                    (message_key, cutoff, *chunk),
                )
                for rcpt, state in rows:
                    found[rcpt] = RecipientState(state)
            return found

        return await self._read("read previous outcomes", read)

    async def add_message(
        self, message: MessageRecord, recipients: Sequence[RecipientRecord]
    ) -> None:
        """Record a message and its recipients in one transaction.

        Recipients already DELIVERED or UNKNOWN are remembered for client retries, as by
        :meth:`update_recipient`. A ``queue_id`` that exists already is a StoreError.
        """
        for record in recipients:
            if record.queue_id != message.queue_id:
                raise ValueError(
                    f"recipient queue_id {record.queue_id!r} is not {message.queue_id!r}"
                )
        rows = [self._stamped(record) for record in recipients]

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    message.queue_id,
                    message.message_key,
                    message.mail_from,
                    message.client,
                    message.user,
                    message.subject,
                    message.size,
                    message.received_at,
                    message.mode,
                    message.content,
                ),
            )
            for record in rows:
                self._put_recipient(conn, record, message.message_key)

        await self._write("add message", write)

    async def update_recipient(self, record: RecipientRecord, *, message_key: str) -> None:
        """Set one recipient row (inserting it if missing) and release its claim.

        When the state is DELIVERED or UNKNOWN the dedup row for ``(message_key,
        rcpt)`` is written in the same transaction; a remembered DELIVERED is never
        downgraded to UNKNOWN within ``dedup_ttl``. ``attempts`` never goes down: the
        larger of the stored and the given count is kept, because the counter is
        written before each attempt (:meth:`claim_due`).
        """
        row = self._stamped(record)

        def write(conn: sqlite3.Connection) -> None:
            self._put_recipient(conn, row, message_key)

        await self._write("update recipient", write)

    async def get_message(
        self, queue_id: str
    ) -> tuple[MessageRecord, list[RecipientRecord]] | None:
        """The message ``queue_id`` with its recipients (by address), or None."""

        def read(conn: sqlite3.Connection) -> tuple[MessageRecord, list[RecipientRecord]] | None:
            row = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE queue_id = ?", (queue_id,)
            ).fetchone()
            if row is None:
                return None
            recipients = conn.execute(
                f"SELECT {_RECIPIENT_COLUMNS} FROM recipients WHERE queue_id = ? ORDER BY rcpt",
                (queue_id,),
            ).fetchall()
            return _message(row), [_recipient(r) for r in recipients]

        return await self._read("read message", read)

    async def list_recipients(
        self, *, states: Collection[RecipientState] | None = None, limit: int = 100
    ) -> list[RecipientRecord]:
        """Recipient records, most recently updated first, optionally only in ``states``."""
        if limit <= 0 or (states is not None and not states):
            return []
        where = ""
        params: list[object] = []
        if states is not None:
            values = sorted({RecipientState(state).value for state in states})
            where = f" WHERE state IN ({', '.join('?' * len(values))})"
            params.extend(values)
        params.append(limit)
        sql = (
            f"SELECT {_RECIPIENT_COLUMNS} FROM recipients{where}"
            " ORDER BY updated_at DESC, queue_id DESC, rcpt LIMIT ?"
        )

        def read(conn: sqlite3.Connection) -> list[RecipientRecord]:
            return [_recipient(row) for row in conn.execute(sql, params)]

        return await self._read("list recipients", read)

    async def purge_expired(self, now: float | None = None) -> int:
        """Forget what is older than ``dedup_ttl``; return the number of rows removed.

        Removes dedup rows, and messages (with their recipients) received and last
        updated before the window whose recipients are all final — or that were never
        spooled (no content), since nothing will ever work on those again.
        """
        cutoff = (self._clock() if now is None else now) - self._dedup_ttl
        final = sorted(state.value for state in FINAL_STATES)
        marks = ", ".join("?" * len(final))

        def write(conn: sqlite3.Connection) -> int:
            removed = conn.execute("DELETE FROM dedup WHERE updated_at <= ?", (cutoff,)).rowcount
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
                (*_CLAIMABLE_STATES, now, now, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE recipients SET claimed_until = ?, attempts = attempts + 1"
                " WHERE queue_id = ? AND rcpt = ?",
                [(now + lease, queue_id, rcpt) for queue_id, rcpt in keys],
            )
            messages: dict[str, MessageRecord] = {}
            claimed: list[tuple[MessageRecord, RecipientRecord]] = []
            for queue_id, rcpt in keys:
                if queue_id not in messages:
                    row = conn.execute(
                        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE queue_id = ?", (queue_id,)
                    ).fetchone()
                    messages[queue_id] = _message(row)
                record = conn.execute(
                    f"SELECT {_RECIPIENT_COLUMNS} FROM recipients WHERE queue_id = ? AND rcpt = ?",
                    (queue_id, rcpt),
                ).fetchone()
                claimed.append((messages[queue_id], _recipient(record)))
            return claimed

        return await self._write("claim due recipients", write)

    async def counts(self) -> dict[str, int]:
        """Recipients per state (every state present, zero when none)."""

        def read(conn: sqlite3.Connection) -> dict[str, int]:
            result = {state.value: 0 for state in RecipientState}
            for state, count in conn.execute(
                "SELECT state, COUNT(*) FROM recipients GROUP BY state"
            ):
                result[state] = count
            return result

        return await self._read("count recipients", read)

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

    # -- writes: the group-commit writer thread -----------------------------------------

    def _submit(
        self, what: str, fn: Callable[[sqlite3.Connection], _T], *, alone: bool = False
    ) -> asyncio.Future[_T]:
        """Queue ``fn`` for the next batch; the future resolves after its commit.

        Cancelling the future does not withdraw the write: it is committed anyway.
        """
        if self._closed or self._writer_done.done():
            raise StoreError(f"state store {self._path} is closed", path=self._path)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._queue.put(_Op(what, fn, loop, future, alone))
        return future

    async def _write(self, what: str, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        return await self._submit(what, fn)

    def _writer_main(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            # InvalidStateError: open() was cancelled and gave up waiting for us.
            try:
                conn = self._connect_writer()
            except BaseException as exc:
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    ready.set_exception(exc)
                return
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                ready.set_result(None)
            try:
                while True:
                    batch = [self._queue.get()]
                    while len(batch) < MAX_BATCH:
                        try:
                            batch.append(self._queue.get_nowait())
                        except queue.Empty:
                            break
                    ops = [item for item in batch if isinstance(item, _Op)]
                    if ops:
                        self._run_batch(conn, ops)
                    if any(item is _STOP for item in batch):
                        return
            finally:
                self._rollback(conn)
                conn.close()
        finally:
            self._writer_done.set_result(None)
            # Only if the loop above died of a bug: nobody may wait forever.
            stopped = StoreError(f"state store {self._path}: writer stopped", path=self._path)
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Op):
                    _settle(item, None, stopped)

    def _run_batch(self, conn: sqlite3.Connection, ops: list[_Op]) -> None:
        """Run ``ops`` in one transaction, commit, then settle every caller."""
        self._rollback(conn)  # a transaction left open by an earlier failure, if any
        for op in [op for op in ops if op.alone]:
            try:
                _settle(op, op.fn(conn), None)
            except Exception as exc:
                self._rollback(conn)
                _settle(op, None, self._error(op.what, exc))
        ops = [op for op in ops if not op.alone]
        if not ops:
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            for op in ops:
                _settle(op, None, self._error(op.what, exc))
            return
        done: list[tuple[_Op, Any]] = []
        failed: list[tuple[_Op, BaseException]] = []
        for op in ops:
            try:
                conn.execute("SAVEPOINT op")
                result = op.fn(conn)
                conn.execute("RELEASE op")
            except Exception as exc:
                # A failed statement normally undoes only itself; then only this op
                # fails. SQLITE_FULL, IOERR and the like may roll back the whole
                # transaction, taking every write of the batch with it.
                if conn.in_transaction and self._rollback_to_savepoint(conn):
                    failed.append((op, self._error(op.what, exc)))
                    continue
                self._rollback(conn)
                for other in ops:
                    reason = exc if other is op else _BatchLost(exc)
                    _settle(other, None, self._error(other.what, reason))
                return
            done.append((op, result))
        try:
            self._commit(conn)
        except sqlite3.Error as exc:
            # A commit that did not happen is never reported as success.
            self._rollback(conn)
            for op, _ in done:
                _settle(op, None, self._error(op.what, exc))
            for op, error in failed:
                _settle(op, None, error)
            return
        self.commits += 1
        for op, result in done:
            _settle(op, result, None)
        for op, error in failed:
            _settle(op, None, error)

    def _commit(self, conn: sqlite3.Connection) -> None:
        # A method of its own so a test can make the commit fail.
        conn.execute("COMMIT")

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            # If even ROLLBACK fails there is nothing left to undo: the next BEGIN starts clean.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    @staticmethod
    def _rollback_to_savepoint(conn: sqlite3.Connection) -> bool:
        try:
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
        except sqlite3.Error:
            return False
        return True

    def _error(self, what: str, exc: BaseException) -> BaseException:
        """SQLite errors become StoreError naming the file; other exceptions pass as is."""
        if isinstance(exc, _BatchLost):
            error = StoreError(
                f"state store {self._path}: {what} failed: batch rolled back: {exc.cause}",
                path=self._path,
            )
            error.__cause__ = exc.cause
            return error
        if isinstance(exc, sqlite3.Error):
            error = StoreError(f"state store {self._path}: {what} failed: {exc}", path=self._path)
            error.__cause__ = exc
            return error
        return exc

    # -- reads ----------------------------------------------------------------------------

    async def _read(self, what: str, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed or self._rconn is None:
            raise StoreError(f"state store {self._path} is closed", path=self._path)
        conn = self._rconn
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._reader, _in_read_transaction, conn, fn)
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
            self._rollback(conn)
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
        for statements in _MIGRATIONS[version:]:
            for statement in statements:
                conn.execute(statement)
        if version != SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")

    # -- row helpers ---------------------------------------------------------------------

    def _stamped(self, record: RecipientRecord) -> RecipientRecord:
        if record.updated_at:
            return record
        return dataclasses.replace(record, updated_at=self._clock())

    def _put_recipient(
        self, conn: sqlite3.Connection, record: RecipientRecord, message_key: str
    ) -> None:
        state = RecipientState(record.state)
        conn.execute(
            f"INSERT INTO recipients ({_RECIPIENT_COLUMNS}, claimed_until)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)"
            " ON CONFLICT (queue_id, rcpt) DO UPDATE SET"
            " state = excluded.state, route = excluded.route,"
            " template_id = excluded.template_id, api_code = excluded.api_code,"
            " reply = excluded.reply, attempts = max(attempts, excluded.attempts),"
            " next_attempt = excluded.next_attempt, updated_at = excluded.updated_at,"
            " error = excluded.error, claimed_until = NULL",
            (
                record.queue_id,
                record.rcpt,
                state.value,
                record.route,
                record.template_id,
                record.api_code,
                record.reply,
                record.attempts,
                record.next_attempt,
                record.updated_at,
                record.error,
            ),
        )
        if state in _DEDUP_STATES:
            conn.execute(
                "INSERT INTO dedup (message_key, rcpt, queue_id, state, updated_at)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (message_key, rcpt) DO UPDATE SET"
                " queue_id = excluded.queue_id, state = excluded.state,"
                " updated_at = excluded.updated_at"
                # Once delivered, stay delivered while remembered: an UNKNOWN from a
                # later duplicate send must not make the next retry send again.
                " WHERE excluded.state = ? OR dedup.state != ?"
                " OR dedup.updated_at <= excluded.updated_at - ?",
                (
                    message_key,
                    record.rcpt.lower(),
                    record.queue_id,
                    state.value,
                    record.updated_at,
                    RecipientState.DELIVERED.value,
                    RecipientState.DELIVERED.value,
                    self._dedup_ttl,
                ),
            )


class _BatchLost(Exception):
    """Another operation's failure rolled back the whole batch transaction."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _settle(op: _Op, result: object, error: BaseException | None) -> None:
    """Resolve ``op``'s future from the writer thread, on the caller's loop."""

    def settle() -> None:
        if op.future.cancelled():
            return
        if error is not None:
            op.future.set_exception(error)
        else:
            op.future.set_result(result)

    # RuntimeError: the caller's loop is closed, nobody is waiting any more.
    with contextlib.suppress(RuntimeError):
        op.loop.call_soon_threadsafe(settle)


def _in_read_transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], _T]) -> _T:
    # One read transaction: every SELECT of ``fn`` sees the same committed snapshot.
    conn.execute("BEGIN")
    try:
        return fn(conn)
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def _message(row: tuple[Any, ...]) -> MessageRecord:
    queue_id, key, mail_from, client, user, subject, size, received_at, mode, content = row
    return MessageRecord(
        queue_id=queue_id,
        message_key=key,
        mail_from=mail_from,
        client=client,
        user=user,
        subject=subject,
        size=size,
        received_at=received_at,
        mode=mode,
        content=None if content is None else bytes(content),
    )


def _recipient(row: tuple[Any, ...]) -> RecipientRecord:
    (queue_id, rcpt, state, route, template_id, api_code, reply, attempts, next_attempt) = row[:9]
    updated_at, error = row[9:]
    return RecipientRecord(
        queue_id=queue_id,
        rcpt=rcpt,
        state=RecipientState(state),
        route=route,
        template_id=template_id,
        api_code=api_code,
        reply=reply,
        attempts=attempts,
        next_attempt=next_attempt,
        updated_at=updated_at,
        error=error,
    )
