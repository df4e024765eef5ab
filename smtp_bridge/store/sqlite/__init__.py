"""The SQLite state store, the embedded default: one file under ``delivery.state_dir``.

Writes go through the group-commit writer thread (:mod:`.writer`); reads through a
second, read-only connection on its own thread: WAL lets it run beside the writer.
The CLI may open the same file while the daemon runs (``smtp-bridge queue``): both
take the write lock with ``BEGIN IMMEDIATE`` and wait up to ``busy_timeout`` for
each other. The rules every backend keeps are in :mod:`smtp_bridge.store.base`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Final, TypeVar

from ...errors import StoreError
from ...outcomes import RecipientState
from ..history import ActivityBucket, HistoryAttempt, HistoryEntry, HistoryMessage
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
)
from ..rules import (
    message_from_row,
    recipient_from_row,
    spooled_copy,
    ttl_for,
    waits_in_spool,
)
from . import history, ledger
from .owners import dead_owners, register_owner
from .schema import MESSAGE_COLUMNS, MIGRATIONS, RECIPIENT_COLUMNS, SCHEMA_VERSION
from .writer import GroupCommitWriter

__all__ = ["BUSY_TIMEOUT_MS", "SQLiteStore"]

#: A session's call cut by a crash, settled by resolve_stale.
_CUT: Final = "interrupted: the session ended during the call; it may have been sent"
#: A session that ended before it sent anything or answered its client.
_ABANDONED: Final = "interrupted: the session ended before its reply; this copy sent nothing"
#: The error text of a recipient whose last attempt never recorded its end.
_INTERRUPTED: Final = "interrupted: the attempt stopped before its answer was recorded"

_T = TypeVar("_T")

#: How long a statement waits for another process (the CLI) to release the lock.
BUSY_TIMEOUT_MS: Final = 5000


class SQLiteStore:
    """The SQLite state store. Create with ``await Store.open(path)``; ``await close()``."""

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
        self._reader = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="smtp-bridge-store-reader"
        )
        self._rconn: sqlite3.Connection | None = None
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
    ) -> SQLiteStore:
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
        try:
            await store.writer.start()
        except BaseException:
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
        await self.writer.stop()
        if self._rconn is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._reader, self._rconn.close)
            self._rconn = None
        self._reader.shutdown(wait=True)
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
        rows = [
            RecipientRecord(
                queue_id=message.queue_id,
                rcpt=rcpt,
                state=RecipientState.RETRYING,
                updated_at=message.received_at,
            )
            for rcpt in rcpts
        ]

        def write(conn: sqlite3.Connection) -> Admission:
            reused = self._reused_message_id(conn, message, now)
            # Rows only: their guards are taken just below (nothing to release).
            self._insert_message(conn, message, rows, guards=False)
            guards = ledger.acquire(
                conn,
                message.message_key,
                rcpts,
                holder=message.queue_id,
                state=GuardState.SENDING,
                until=now + lease,
                now=now,
                ttl=self._ttl(message.message_key),
                owner=self._owner,
            )
            return Admission(guards, reused)

        return await self._write("open message", write)

    async def acquire(
        self, message_key: str, rcpts: Sequence[str], *, queue_id: str, lease: float
    ) -> dict[str, Guard]:
        """Ask again for guards another copy held (see base.Ledger)."""
        now = self._clock()

        def write(conn: sqlite3.Connection) -> dict[str, Guard]:
            return ledger.acquire(
                conn,
                message_key,
                rcpts,
                holder=queue_id,
                state=GuardState.SENDING,
                until=now + lease,
                now=now,
                ttl=self._ttl(message_key),
                owner=self._owner,
            )

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
        for record in recipients:
            if record.queue_id != message.queue_id:
                raise ValueError(
                    f"recipient queue_id {record.queue_id!r} is not {message.queue_id!r}"
                )
        now = self._clock()
        ttl = self._ttl(message.message_key)

        def write(conn: sqlite3.Connection) -> Admission:
            reused = self._reused_message_id(conn, message, now)
            spooled = [r.rcpt for r in recipients if waits_in_spool(r)]
            guards = ledger.acquire(
                conn,
                message.message_key,
                spooled,
                holder=message.queue_id,
                state=GuardState.QUEUED,
                until=None,
                now=now,
                ttl=ttl,
            )
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
                found = conn.execute(
                    "SELECT claimed_by FROM recipients WHERE queue_id = ? AND rcpt = ?",
                    (row.queue_id, row.rcpt),
                ).fetchone()
                if found is not None and found[0] != owner:
                    return False  # another claimer took it over after our lease
            self._put_recipient(conn, row, message_key)
            if RecipientState(row.state).value in CONTENT_DONE_STATES:
                marks = ", ".join("?" * len(CONTENT_DONE_STATES))
                conn.execute(
                    "UPDATE messages SET content = NULL WHERE queue_id = ?"
                    " AND content IS NOT NULL AND NOT EXISTS ("
                    "  SELECT 1 FROM recipients WHERE queue_id = messages.queue_id"
                    f"  AND state NOT IN ({marks}))",
                    (row.queue_id, *CONTENT_DONE_STATES),
                )
            if notice is not None:
                self._insert_message(conn, notice[0], notice[1])
            return True

        return await self._write("update recipient", write)

    async def get_message(
        self, queue_id: str
    ) -> tuple[MessageRecord, list[RecipientRecord]] | None:
        """The message ``queue_id`` with its recipients (by address), or None."""

        def read(conn: sqlite3.Connection) -> tuple[MessageRecord, list[RecipientRecord]] | None:
            row = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE queue_id = ?", (queue_id,)
            ).fetchone()
            if row is None:
                return None
            recipients = conn.execute(
                f"SELECT {RECIPIENT_COLUMNS} FROM recipients WHERE queue_id = ? ORDER BY rcpt",
                (queue_id,),
            ).fetchall()
            return message_from_row(row), [recipient_from_row(r) for r in recipients]

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
            f"SELECT {RECIPIENT_COLUMNS} FROM recipients{where}"
            " ORDER BY updated_at DESC, queue_id DESC, rcpt LIMIT ?"
        )

        def read(conn: sqlite3.Connection) -> list[RecipientRecord]:
            return [recipient_from_row(row) for row in conn.execute(sql, params)]

        return await self._read("list recipients", read)

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
                        (RecipientState.UNKNOWN.value, _INTERRUPTED, queue_id, rcpt),
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
            cut = conn.execute(
                "SELECT d.message_key, d.rcpt, d.queue_id FROM dedup AS d"
                " WHERE d.state = ? AND d.lease_until < ? AND EXISTS (SELECT 1 FROM messages"
                " AS m WHERE m.queue_id = d.queue_id AND m.content IS NULL)",
                (GuardState.SENDING.value, now),
            ).fetchall()
            for key, rcpt, holder in cut:
                self._settle_cut(conn, key, rcpt, holder, now)
            # Copies that never got to send (waiting for another copy, or cut before).
            waited = conn.execute(
                "UPDATE recipients AS r SET state = ?, error = ?, updated_at = ?"
                " WHERE r.state = ? AND r.next_attempt IS NULL AND r.updated_at < ?"
                " AND EXISTS (SELECT 1 FROM messages AS m WHERE m.queue_id = r.queue_id"
                " AND m.content IS NULL)",
                (
                    RecipientState.FAILED.value,
                    _ABANDONED,
                    now,
                    RecipientState.RETRYING.value,
                    now - older_than,
                ),
            ).rowcount
            return len(cut) + waited

        return await self._write("resolve stale", write)

    async def next_due(self) -> float | None:
        """When the next spooled recipient becomes claimable, or None if none waits."""

        def read(conn: sqlite3.Connection) -> float | None:
            (when,) = conn.execute(
                "SELECT MIN(max(r.next_attempt, COALESCE(r.claimed_until, r.next_attempt)))"
                " FROM recipients AS r JOIN messages AS m ON m.queue_id = r.queue_id"
                " WHERE r.state IN (?, ?) AND r.next_attempt IS NOT NULL"
                " AND m.content IS NOT NULL",
                CLAIMABLE_STATES,
            ).fetchone()
            return None if when is None else float(when)

        return await self._read("find next due", read)

    async def spool_stats(self) -> SpoolStats:
        """Recipients waiting in the spool and the oldest one's ``spooled_at``.

        Dead letters are ``counts()["dead"]``.
        """

        def read(conn: sqlite3.Connection) -> SpoolStats:
            depth, oldest = conn.execute(
                "SELECT COUNT(*), MIN(COALESCE(r.spooled_at, m.received_at))"
                " FROM recipients AS r JOIN messages AS m ON m.queue_id = r.queue_id"
                " WHERE r.state IN (?, ?) AND r.next_attempt IS NOT NULL"
                " AND m.content IS NOT NULL",
                CLAIMABLE_STATES,
            ).fetchone()
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

    async def list_queue(
        self, *, dead: bool = False, limit: int = 1000
    ) -> list[tuple[MessageRecord, RecipientRecord]]:
        """Spooled recipients waiting for delivery (or dead letters), oldest first.

        The message records come without content; ``content`` is ``b""`` when the
        message still has it (a dead letter that can be retried), else None.
        """
        if dead:
            where = "r.state = ?"
            params: list[object] = [RecipientState.DEAD.value]
        else:
            where = "r.state IN (?, ?) AND r.next_attempt IS NOT NULL AND m.content IS NOT NULL"
            params = list(CLAIMABLE_STATES)
        # The content itself stays on disk: only whether there is any.
        names = [c.strip() for c in MESSAGE_COLUMNS.split(",")]
        columns = ", ".join("m.content IS NOT NULL" if c == "content" else f"m.{c}" for c in names)
        at = names.index("content")
        recipient_columns = ", ".join(f"r.{c.strip()}" for c in RECIPIENT_COLUMNS.split(","))
        sql = (
            f"SELECT {columns}, {recipient_columns}"
            " FROM recipients AS r JOIN messages AS m ON m.queue_id = r.queue_id"
            f" WHERE {where} ORDER BY m.received_at, r.queue_id, r.rcpt LIMIT ?"
        )
        params.append(limit)
        width = len(MESSAGE_COLUMNS.split(","))

        def read(conn: sqlite3.Connection) -> list[tuple[MessageRecord, RecipientRecord]]:
            found = []
            for row in conn.execute(sql, params):
                head = (*row[:at], b"" if row[at] else None, *row[at + 1 : width])
                found.append((message_from_row(head), recipient_from_row(row[width:])))
            return found

        return await self._read("list queue", read)

    async def retry(self, queue_id: str | None = None) -> tuple[int, int]:
        """``queue retry``: dead letters (of ``queue_id``, or all) back into the spool.

        Recipients of ``queue_id`` that are waiting become due now as well. A dead
        letter whose content was never spooled (direct mode) cannot be resent.
        Returns (recipients put back or hurried, dead letters that cannot be resent).
        """
        now = self._clock()
        scope = "" if queue_id is None else " AND r.queue_id = ?"
        scope_params: tuple[object, ...] = () if queue_id is None else (queue_id,)

        def write(conn: sqlite3.Connection) -> tuple[int, int]:
            spooled = " AND EXISTS (SELECT 1 FROM messages AS m WHERE m.queue_id = r.queue_id"
            spooled += " AND m.content IS NOT NULL)"
            back = conn.execute(
                "SELECT m.message_key, r.rcpt, r.queue_id FROM recipients AS r JOIN messages AS m"
                f" ON m.queue_id = r.queue_id WHERE r.state = ?{scope}{spooled}",
                (RecipientState.DEAD.value, *scope_params),
            ).fetchall()
            for key, rcpt, holder in back:
                # Back in the spool: its guard again, unless another copy has it now.
                ledger.acquire(
                    conn,
                    key,
                    [rcpt],
                    holder=holder,
                    state=GuardState.QUEUED,
                    until=None,
                    now=now,
                    ttl=self._ttl(key),
                )
            revived = conn.execute(
                "UPDATE recipients AS r SET state = ?, next_attempt = ?, spooled_at = ?,"
                " claimed_until = NULL, claimed_by = NULL, error = '', updated_at = ?"
                f" WHERE r.state = ?{scope}{spooled}",
                (
                    RecipientState.RETRYING.value,
                    now,
                    now,
                    now,
                    RecipientState.DEAD.value,
                    *scope_params,
                ),
            ).rowcount
            hurried = 0
            if queue_id is not None:
                hurried = conn.execute(
                    "UPDATE recipients AS r SET next_attempt = ?"
                    f" WHERE r.state IN (?, ?) AND r.next_attempt > ?{scope}{spooled}",
                    (now, *CLAIMABLE_STATES, now, *scope_params),
                ).rowcount
            (stuck,) = conn.execute(
                f"SELECT COUNT(*) FROM recipients AS r WHERE r.state = ?{scope}",
                (RecipientState.DEAD.value, *scope_params),
            ).fetchone()
            return revived + hurried, stuck

        return await self._write("retry", write)

    async def purge(self, queue_id: str | None = None, *, dead: bool = False) -> int:
        """``queue purge``: delete message ``queue_id``, or (``dead``) every dead letter.

        Returns the number of recipient rows deleted. Messages left without
        recipients are deleted with them; the dedup memory is kept.
        """
        if (queue_id is None) == (not dead):
            raise ValueError("give a queue id or dead=True")

        def write(conn: sqlite3.Connection) -> int:
            if queue_id is not None:
                removed = conn.execute(
                    "DELETE FROM recipients WHERE queue_id = ?", (queue_id,)
                ).rowcount
                conn.execute(
                    "DELETE FROM dedup WHERE queue_id = ? AND state IN (?, ?)",
                    (queue_id, GuardState.QUEUED.value, GuardState.SENDING.value),
                )
                conn.execute("DELETE FROM messages WHERE queue_id = ?", (queue_id,))
                return removed
            removed = conn.execute(
                "DELETE FROM recipients WHERE state = ?", (RecipientState.DEAD.value,)
            ).rowcount
            conn.execute(
                "DELETE FROM messages WHERE NOT EXISTS"
                " (SELECT 1 FROM recipients AS r WHERE r.queue_id = messages.queue_id)"
            )
            return removed

        return await self._write("purge", write)

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

    # -- the console's history (store/history.py) ------------------------------------------

    async def record_history(
        self, messages: Sequence[HistoryMessage], attempts: Sequence[HistoryAttempt]
    ) -> None:
        """Upsert ``messages`` and append ``attempts``, in the writer's next batch."""
        await self._write("record history", lambda conn: history.record(conn, messages, attempts))

    async def search_history(
        self, query: str = "", *, limit: int = 50, before: float | None = None
    ) -> list[HistoryEntry]:
        """Messages newest first matching ``query``, with each recipient's latest attempt."""
        return await self._read(
            "search history", lambda conn: history.search(conn, query, limit, before)
        )

    async def history_message(
        self, queue_id: str
    ) -> tuple[HistoryMessage | None, list[HistoryAttempt]]:
        """One message's history row and its attempts, oldest first."""
        return await self._read("read history", lambda conn: history.message_page(conn, queue_id))

    async def history_activity(self, since: float, bucket: float) -> list[ActivityBucket]:
        """Messages and attempts per ``bucket`` seconds since ``since``."""
        return await self._read("read activity", lambda conn: history.activity(conn, since, bucket))

    async def trim_history(self, before: float) -> int:
        """Forget history older than ``before``."""
        return await self._write("trim history", lambda conn: history.trim(conn, before))

    async def take_quota(
        self, name: str, key: str, *, window: float, limit: int, now: float | None = None
    ) -> bool:
        """Count one recipient against quota ``name`` for ``key`` (see :class:`Quotas`)."""
        at = self._clock() if now is None else now

        def write(conn: sqlite3.Connection) -> bool:
            # The writer thread runs one function at a time: read-then-write is atomic.
            row = conn.execute(
                "SELECT window_end, count FROM quota_counters WHERE name = ? AND key = ?",
                (name, key),
            ).fetchone()
            if row is None or at >= row[0] or at < row[0] - window:
                # No window yet, or it has ended (or the clock went back past it).
                conn.execute(
                    "INSERT INTO quota_counters (name, key, window_start, window_end, count)"
                    " VALUES (?, ?, ?, ?, 1) ON CONFLICT (name, key) DO UPDATE SET"
                    " window_start = excluded.window_start, window_end = excluded.window_end,"
                    " count = 1",
                    (name, key, at, at + window),
                )
                return limit >= 1
            if row[1] >= limit:
                return False
            conn.execute(
                "UPDATE quota_counters SET count = count + 1 WHERE name = ? AND key = ?",
                (name, key),
            )
            return True

        return await self._write("take quota", write)

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
        for record in recipients:
            if record.queue_id != message.queue_id:
                raise ValueError(
                    f"recipient queue_id {record.queue_id!r} is not {message.queue_id!r}"
                )
        conn.execute(
            f"INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                message.message_id,
            ),
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
        state = RecipientState(record.state)
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
                record.spooled_at,
            ),
        )
        if guards:
            ledger.record_outcome(conn, message_key, record, ttl=self._ttl(message_key))

    @staticmethod
    def _settle_cut(conn: sqlite3.Connection, key: str, rcpt: str, holder: str, now: float) -> None:
        """A session's call cut by its process's end: UNKNOWN, guard and row alike."""
        conn.execute(
            "UPDATE dedup SET state = ?, lease_until = NULL, owner = NULL, updated_at = ?"
            " WHERE message_key = ? AND rcpt = ?",
            (GuardState.UNKNOWN.value, now, key, rcpt),
        )
        conn.execute(
            "UPDATE recipients SET state = ?, error = ?, next_attempt = NULL,"
            " updated_at = ? WHERE queue_id = ? AND lower(rcpt) = ? AND state = ?",
            (RecipientState.UNKNOWN.value, _CUT, now, holder, rcpt, RecipientState.RETRYING.value),
        )

    def _ttl(self, message_key: str) -> float:
        return ttl_for(message_key, self._dedup_ttl, self._anonymous_ttl)

    def _reused_message_id(
        self, conn: sqlite3.Connection, message: MessageRecord, now: float
    ) -> str:
        """The queue id of an earlier message with this Message-ID and other content, or ""."""
        if not message.message_id:
            return ""
        row = conn.execute(
            "SELECT queue_id FROM messages WHERE message_id = ? AND message_key != ?"
            " AND received_at > ? ORDER BY received_at DESC LIMIT 1",
            (message.message_id, message.message_key, now - self._dedup_ttl),
        ).fetchone()
        return str(row[0]) if row else ""


def _in_read_transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], _T]) -> _T:
    # One read transaction: every SELECT of ``fn`` sees the same committed snapshot.
    conn.execute("BEGIN")
    try:
        return fn(conn)
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
