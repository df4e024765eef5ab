"""Group commit: one thread owns the only writing connection and commits groups of writes.

Everything queued while the previous transaction was being made durable goes into
the next one, so a burst of recipients costs one fsync, not one each. A caller's
future resolves only after the transaction holding its write has committed (WAL,
``synchronous=FULL``); if that commit fails, every caller of the batch gets
:class:`StoreError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from ...errors import StoreError

__all__ = ["MAX_BATCH", "GroupCommitWriter", "no_wakeup_preemption", "settle", "thread_connection"]

_T = TypeVar("_T")

#: Upper bound on the operations committed together, to bound one batch's latency.
MAX_BATCH: Final = 1000


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


def no_wakeup_preemption() -> None:
    """Make the calling thread SCHED_BATCH: when woken, it waits for the core to
    be free instead of preempting the thread that woke it.

    The event loop queues a write and goes on serving sessions; preempted at
    every write, it cost 12 context switches a message and each batch held one
    write (bench/README.md, change 16: direct mode -25% CPU a message when the
    loop and this thread share a core). On an idle core it runs at once, as
    before. Where the policy cannot be set (not Linux, a seccomp filter), the
    thread keeps the default.
    """
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is None:
        return
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, batch, os.sched_param(0))


@contextlib.contextmanager
def _flocked(fd: int | None) -> Iterator[None]:
    """Hold an exclusive flock on ``fd`` (nothing if None) for the block.

    Measured with ``serve --workers 2`` (bench/README.md): without it the two
    writers met SQLITE_BUSY and slept in SQLite's busy handler (p99 355 ms,
    1.00x one worker); with it, p99 71 ms and 1.27x. A process holds it only
    for one batch's transaction, and the kernel drops it if the process dies.
    """
    if fd is None:
        yield
        return
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


class GroupCommitWriter:
    """The writer thread of one SQLite database file.

    ``connect`` opens (and migrates) the writing connection on the thread itself;
    its StoreError reaches :meth:`start`'s caller.
    """

    def __init__(self, path: Path, connect: Callable[[], sqlite3.Connection]) -> None:
        self._path = path
        self._connect = connect
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread: threading.Thread | None = None
        self._closed = False
        #: Transactions committed (group commit: fewer than writes).
        self.commits = 0

    async def start(self) -> None:
        """Start the thread; return once its connection is open, or raise why not."""
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._main, args=(ready,), name="smtp-bridge-store-writer", daemon=True
        )
        self._thread.start()
        try:
            await asyncio.wrap_future(ready)
        except BaseException:
            self._queue.put(_STOP)  # if the writer did start (we were cancelled), stop it
            await asyncio.wrap_future(self._done)
            self._closed = True
            raise

    async def stop(self) -> None:
        """Commit what is queued, then close the connection and end the thread."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)
            await asyncio.wrap_future(self._done)
            self._thread.join()  # it has finished; this returns at once

    def submit(
        self, what: str, fn: Callable[[sqlite3.Connection], _T], *, alone: bool = False
    ) -> asyncio.Future[_T]:
        """Queue ``fn`` for the next batch; the future resolves after its commit.

        Cancelling the future does not withdraw the write: it is committed anyway.
        """
        if self._closed or self._done.done():
            raise StoreError(f"state store {self._path} is closed", path=self._path)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._queue.put(_Op(what, fn, loop, future, alone))
        return future

    def commit(self, conn: sqlite3.Connection) -> None:
        """COMMIT the batch transaction (a method of its own: fault-injection tests wrap it)."""
        conn.execute("COMMIT")

    # -- the thread ------------------------------------------------------------------

    def _main(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            conn = thread_connection(self._connect, ready)
            if conn is None:
                return
            lock_fd = self._open_write_lock()
            try:
                while True:
                    batch = [self._queue.get()]
                    # Writers of other processes (serve --workers, the CLI) take turns
                    # on this flock: a blocked writer wakes the moment the lock is
                    # free, where SQLite's busy handler sleeps 1..100 ms and retries.
                    # Writes queued while we waited join this batch.
                    with _flocked(lock_fd):
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
                _rollback(conn)
                conn.close()
                if lock_fd is not None:
                    os.close(lock_fd)
        finally:
            self._done.set_result(None)
            # Only if the loop above died of a bug: nobody may wait forever.
            stopped = StoreError(f"state store {self._path}: writer stopped", path=self._path)
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Op):
                    _settle(item, None, stopped)

    def _open_write_lock(self) -> int | None:
        """The file whose flock orders the writers of several processes (``--workers``)."""
        path = self._path.with_name(self._path.name + ".write-lock")
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return None  # then BEGIN IMMEDIATE and busy_timeout alone order the writers

    def _run_batch(self, conn: sqlite3.Connection, ops: list[_Op]) -> None:
        """Run ``ops`` in one transaction, commit, then settle every caller."""
        _rollback(conn)  # a transaction left open by an earlier failure, if any
        for op in [op for op in ops if op.alone]:
            try:
                _settle(op, op.fn(conn), None)
            except Exception as exc:
                _rollback(conn)
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
        # A savepoint keeps one op's failure from undoing the others' writes; an op
        # alone in its batch needs none (two statements less: at low load most are).
        isolate = len(ops) > 1
        for op in ops:
            try:
                if isolate:
                    conn.execute("SAVEPOINT op")
                result = op.fn(conn)
                if isolate:
                    conn.execute("RELEASE op")
            except Exception as exc:
                # A failed statement normally undoes only itself; then only this op
                # fails. SQLITE_FULL, IOERR and the like may roll back the whole
                # transaction, taking every write of the batch with it.
                if isolate and conn.in_transaction and _rollback_to_savepoint(conn):
                    failed.append((op, self._error(op.what, exc)))
                    continue
                _rollback(conn)
                for other in ops:
                    reason = exc if other is op else _BatchLost(exc)
                    _settle(other, None, self._error(other.what, reason))
                return
            done.append((op, result))
        try:
            self.commit(conn)
        except sqlite3.Error as exc:
            # A commit that did not happen is never reported as success.
            _rollback(conn)
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


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        # If even ROLLBACK fails there is nothing left to undo: the next BEGIN starts clean.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _rollback_to_savepoint(conn: sqlite3.Connection) -> bool:
    try:
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")
    except sqlite3.Error:
        return False
    return True


class _BatchLost(Exception):
    """Another operation's failure rolled back the whole batch transaction."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def thread_connection(
    connect: Callable[[], sqlite3.Connection], ready: concurrent.futures.Future[None]
) -> sqlite3.Connection | None:
    """A store thread's start: its scheduling (:func:`no_wakeup_preemption`) and its
    connection, the outcome told to ``ready`` (the starter); None if it failed."""
    no_wakeup_preemption()
    # InvalidStateError: start() was cancelled and gave up waiting for us.
    try:
        conn = connect()
    except BaseException as exc:
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            ready.set_exception(exc)
        return None
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        ready.set_result(None)
    return conn


def _settle(op: _Op, result: object, error: BaseException | None) -> None:
    settle(op.loop, op.future, result, error)


def settle(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: object,
    error: BaseException | None,
) -> None:
    """Resolve ``future`` from a store thread, on its loop (the reader's too)."""

    def resolve() -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    # RuntimeError: the caller's loop is closed, nobody is waiting any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(resolve)
