"""The connection pool of the PostgreSQL store: one transaction per call, errors as StoreError.

Every store call borrows a pooled connection for one transaction. Whatever goes
wrong on the way (the server is down or restarting, the pool has no connection
within ``timeout``, a constraint fails) reaches the caller as
:class:`StoreError` naming the store without its password. A connection that
died while it sat idle in the pool (the server restarted) fails at its first
statement, before anything could commit: that call is retried once on a fresh
connection, so the first call after an outage does not fail for nothing (the
server rolls back a transaction whose connection died before COMMIT). A
failure during COMMIT is never retried (it may have committed) and never
reported as success.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ..records import StoreError
from ..urls import redact_url, secrets_of

__all__ = ["DEFAULT_TIMEOUT", "Database", "execute_rows"]

_T = TypeVar("_T")

#: Seconds to connect, or to wait for a pooled connection, before a call fails.
DEFAULT_TIMEOUT: Final = 5.0

Conn = psycopg.AsyncConnection[Any]


class Database:
    """A small pool of connections to one database, and the transaction runner."""

    def __init__(self, url: str, *, timeout: float, min_size: int, max_size: int) -> None:
        self.url = url
        self.name = redact_url(url)
        self.timeout = timeout
        self._secrets = secrets_of(url)
        # libpq counts connect_timeout in whole seconds, at least 2.
        self.connect_kwargs: dict[str, Any] = {
            "connect_timeout": max(2, round(timeout)),
            "application_name": "smtp-bridge",
            # No server-side prepared statements: they break behind PgBouncer's
            # transaction pooling (before 1.21), which README.md promises works.
            "prepare_threshold": None,
        }
        self.pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            url,
            kwargs=self.connect_kwargs,
            min_size=min_size,
            max_size=max_size,
            open=False,
            name="smtp-bridge-store",
            timeout=timeout,
            # A failed reconnection is given up after ``timeout`` (the next call
            # starts a fresh one at once) rather than retried with a backoff that
            # grows to minutes while the server is already back.
            reconnect_timeout=timeout,
        )
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.closed = False

    async def connect(self) -> Conn:
        """One connection outside the pool (the migrations); libpq's reason if it fails."""
        try:
            return await psycopg.AsyncConnection.connect(self.url, **self.connect_kwargs)
        except psycopg.Error as exc:
            raise StoreError(
                f"cannot open state store {self.name}: {self.scrub(str(exc))}"
            ) from exc

    async def open(self) -> None:
        """Open the pool: its first connection must come within ``timeout``."""
        try:
            await self.pool.open(wait=True, timeout=self.timeout)
        except (PoolTimeout, psycopg.Error) as exc:
            await self.pool.close()
            raise StoreError(
                f"cannot open state store {self.name}: no connection within {self.timeout:g}s"
            ) from exc

    async def close(self) -> None:
        """Refuse new calls, let the running ones finish, then close every connection."""
        if self.closed:
            return
        self.closed = True
        await self._idle.wait()
        await self.pool.close()

    def scrub(self, text: str) -> str:
        """``text`` (an error message) on one line, with the password replaced."""
        first = text.strip().splitlines()[0] if text.strip() else text
        for secret in self._secrets:
            first = first.replace(secret, "***")
        return first

    def error(self, what: str, exc: BaseException) -> StoreError:
        """The StoreError for ``what`` failing with ``exc``."""
        if isinstance(exc, PoolTimeout):
            reason = f"no connection to the database within {self.timeout:g}s"
        else:
            reason = self.scrub(str(exc))
        error = StoreError(f"state store {self.name}: {what} failed: {reason}")
        error.__cause__ = exc
        return error

    async def run(
        self,
        what: str,
        fn: Callable[[Conn], Awaitable[_T]],
        *,
        snapshot: bool = False,
        single: bool = False,
    ) -> _T:
        """Run ``fn`` in one transaction on a pooled connection and commit it.

        ``snapshot``: a read-only REPEATABLE READ transaction, so several SELECTs
        see one committed state. ``single``: ``fn`` runs one statement, which is
        its own transaction (autocommit: no BEGIN and COMMIT round trips); as
        its end is its commit, it is never retried here.
        """
        if self.closed:
            raise StoreError(f"state store {self.name} is closed")
        self._active += 1
        self._idle.clear()
        try:
            if single:
                try:
                    return await self._single(fn)
                except (psycopg.Error, PoolTimeout) as exc:
                    raise self.error(what, exc) from exc
            for attempt in (1, 2):
                try:
                    return await self._once(fn, snapshot)
                except _Stale as stale:
                    if attempt == 2:
                        raise self.error(what, stale.cause) from stale.cause
                except (psycopg.Error, PoolTimeout) as exc:
                    raise self.error(what, exc) from exc
            raise AssertionError("unreachable")
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def _once(self, fn: Callable[[Conn], Awaitable[_T]], snapshot: bool) -> _T:
        async with self.pool.connection() as conn:
            try:
                if snapshot:
                    await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                result = await fn(conn)
            except psycopg.OperationalError as exc:
                # The connection died before COMMIT: the server rolled back whatever
                # the transaction did, so doing it again on another one is safe.
                if conn.broken:
                    raise _Stale(exc) from exc
                await _rollback(conn)
                raise
            except BaseException:
                await _rollback(conn)
                raise
            # A failure of COMMIT itself is never retried: it may have committed.
            await conn.commit()
            return result

    async def _single(self, fn: Callable[[Conn], Awaitable[_T]]) -> _T:
        async with self.pool.connection() as conn:
            await conn.set_autocommit(True)
            try:
                return await fn(conn)
            finally:
                if not conn.broken and not conn.closed:
                    await conn.set_autocommit(False)


class _Stale(Exception):
    """The connection broke before COMMIT (nothing of the transaction was kept)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


async def _rollback(conn: Conn) -> None:
    if conn.broken or conn.closed:
        return
    with contextlib.suppress(psycopg.Error):
        await conn.rollback()


async def execute_rows(conn: Conn, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """``sql`` once per row. One row (the common case: one recipient) is a plain
    execute: psycopg's executemany enters and leaves pipeline mode even for one
    row, which measured as the largest cost of a store call (about 0.25 ms each)."""
    if len(rows) == 1:
        await conn.execute(sql, rows[0])
    elif rows:
        async with conn.cursor() as cursor:
            await cursor.executemany(sql, rows)
