"""The reader thread: the read-only connection, each read settled on its caller's loop.

``loop.run_in_executor`` wraps every call in a ``concurrent.futures.Future``
chained to an asyncio one: a lock, a condition and two callbacks a read. Queue
mode reads the ledger once a message (the recipients' earlier outcomes), and
that wrapping cost about 5% of its accept CPU (bench/README.md, change 21). Here
a read is one queue put and one ``call_soon_threadsafe``, as the writer's are.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .writer import settle, thread_connection

__all__ = ["ReadThread"]

_T = TypeVar("_T")


@dataclass(slots=True)
class _Read:
    fn: Callable[[sqlite3.Connection], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


class ReadThread:
    """One thread owning the read-only connection ``connect`` opens.

    Every read runs in a read transaction of its own (one committed snapshot for
    all its SELECTs), in the order submitted.
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._queue: queue.SimpleQueue[_Read | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._open = False

    async def start(self) -> None:
        """Start the thread; return once its connection is open, or raise why not."""
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._main, args=(ready,), name="smtp-bridge-store-reader", daemon=True
        )
        self._thread.start()
        await asyncio.wrap_future(ready)
        self._open = True

    def submit(self, fn: Callable[[sqlite3.Connection], _T]) -> asyncio.Future[_T]:
        """Queue ``fn(conn)``; the future has its result or its exception.

        RuntimeError once :meth:`stop` has begun (the caller checks first).
        """
        if not self._open:
            raise RuntimeError("the reader thread is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._queue.put(_Read(fn, loop, future))
        return future

    async def stop(self) -> None:
        """Finish the reads queued, close the connection and end the thread."""
        self._open = False
        if self._thread is None:
            return
        self._queue.put(None)
        await asyncio.wrap_future(self._done)
        self._thread.join()  # it has finished; this returns at once
        self._thread = None

    def _main(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            conn = thread_connection(self._connect, ready)
            if conn is None:
                return
            try:
                while (item := self._queue.get()) is not None:
                    try:
                        result = _in_read_transaction(conn, item.fn)
                    except Exception as exc:
                        settle(item.loop, item.future, None, exc)
                    else:
                        settle(item.loop, item.future, result, None)
            finally:
                conn.close()
        finally:
            self._done.set_result(None)


def _in_read_transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], _T]) -> _T:
    # One read transaction: every SELECT of ``fn`` sees the same committed snapshot.
    conn.execute("BEGIN")
    try:
        return fn(conn)
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
