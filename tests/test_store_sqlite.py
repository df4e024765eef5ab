"""The SQLite backend's own behaviour: WAL and its file, group commit, failures, claimers.

The rules every backend keeps are tested for SQLite too, in
tests/test_store_conformance.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from store_helpers import SECRET, T0, TTL, Clock, message, rcpt

from smtp_bridge.outcomes import RecipientState
from smtp_bridge.store import StoreError
from smtp_bridge.store.sqlite import SQLiteStore as Store
from smtp_bridge.store.sqlite.core import REUSED_MESSAGE_ID
from smtp_bridge.store.sqlite.schema import SCHEMA_VERSION


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "bridge.sqlite3"


@pytest.fixture
async def store(db_path: Path, clock: Clock) -> AsyncIterator[Store]:
    opened = await Store.open(db_path, dedup_ttl=TTL, clock=clock)
    try:
        yield opened
    finally:
        await opened.close()


@contextlib.asynccontextmanager
async def writer_held(store: Store) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Park the writer thread inside a batch of its own until ``release()`` is awaited.

    Writes submitted meanwhile queue up and form the next batch, so a test can decide
    exactly which operations share a transaction, without sleeping.
    """
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    gate = threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        loop.call_soon_threadsafe(started.set)
        gate.wait(30)

    blocker = store.writer.submit("test: hold the writer", hold)
    waiting = asyncio.ensure_future(started.wait())
    either: list[asyncio.Future[Any]] = [waiting, blocker]
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if not waiting.done():  # the parked batch itself failed (e.g. a read-only database)
        waiting.cancel()
        await blocker

    async def release_writer() -> None:
        gate.set()

    try:
        yield release_writer
    finally:
        gate.set()
        await blocker


async def in_one_batch(store: Store, *writes: Awaitable[Any]) -> list[Any | BaseException]:
    """Run ``writes`` so that all of them are committed (or fail) in one transaction."""
    async with writer_held(store) as release:
        # gather starts its tasks in order: each write is queued by its task's first
        # step, so by the time the last task runs, every write is waiting in the queue.
        *results, _ = await asyncio.gather(*writes, release(), return_exceptions=True)
    return results


async def set_writer_pragma(store: Store, pragma: str) -> None:
    """Test hook: a PRAGMA on the writer's own connection, outside any transaction."""
    await store.writer.submit(
        f"test: {pragma}", lambda conn: conn.execute(f"PRAGMA {pragma}"), alone=True
    )


async def limit_size_to_current(store: Store) -> None:
    """Simulate a full disk: the database may not grow by a single page."""

    def limit(conn: sqlite3.Connection) -> None:
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        conn.execute(f"PRAGMA max_page_count = {pages}")

    await store.writer.submit("test: fill the disk", limit)


# -- open ----------------------------------------------------------------------


async def test_open_creates_directory_wal_and_schema_version(db_path: Path) -> None:
    opened = await Store.open(db_path)
    await opened.close()
    assert db_path.is_file()
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    assert {"messages", "recipients", "dedup", "recipients_due"} <= tables


async def test_open_fails_when_directory_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create state directory") as info:
        await Store.open(blocker / "state" / "bridge.sqlite3")
    assert str(blocker) in str(info.value)


async def test_open_fails_on_a_file_that_is_not_a_database(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open state store") as info:
        await Store.open(db_path)
    assert str(db_path) in str(info.value)


async def test_open_fails_when_path_is_a_directory(db_path: Path) -> None:
    db_path.mkdir(parents=True)
    with pytest.raises(StoreError, match=str(db_path)):
        await Store.open(db_path)


async def test_open_refuses_a_newer_schema(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema version 99 is newer"):
        await Store.open(db_path)


# -- group commit, failures, other processes -----------------------------------


async def test_group_commit_many_writers_one_transaction(store: Store, db_path: Path) -> None:
    before = store.writer.commits
    writes = [
        store.update_recipient(
            rcpt(f"r{i}@example.com", RecipientState.DELIVERED, queue_id="G"),
            message_key="group",
        )
        for i in range(200)
    ]
    assert await in_one_batch(store, *writes) == [True] * 200
    assert store.writer.commits == before + 2  # the test's own parked batch, then all 200 at once

    # Durable and visible to another process' connection (the CLI, say).
    other = await Store.open(db_path, dedup_ttl=TTL, clock=Clock())
    try:
        assert (await other.counts())["delivered"] == 200
        outcomes = await other.previous_outcomes("group", [f"R{i}@example.com" for i in range(200)])
        assert len(outcomes) == 200
    finally:
        await other.close()


async def test_reused_message_id_lookup_searches_its_index(store: Store, db_path: Path) -> None:
    """Not a walk over every message of the dedup window (one row read each)."""
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        plan = conn.execute(
            f"EXPLAIN QUERY PLAN {REUSED_MESSAGE_ID}", ("<a@example.com>", "key", 0.0)
        ).fetchall()
    details = " ".join(row[3] for row in plan)
    assert "USING INDEX messages_message_id (message_id=?)" in details, details
    assert "SCAN" not in details


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
async def test_store_threads_do_not_preempt_the_event_loop(store: Store) -> None:
    """Woken by a write, the writer waits for a free core (bench/README.md, change 16)."""
    policy = await store.writer.submit("test: policy", lambda conn: os.sched_getscheduler(0))
    assert policy == os.SCHED_BATCH
    reader = await store._read("test: policy", lambda conn: os.sched_getscheduler(0))
    assert reader == os.SCHED_BATCH
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's thread is untouched


async def test_unbatched_concurrent_writes_all_land(store: Store) -> None:
    writes = [
        store.update_recipient(rcpt(f"r{i}@example.com"), message_key="k") for i in range(200)
    ]
    await asyncio.gather(*writes)
    assert (await store.counts())["retrying"] == 200
    assert 1 <= store.writer.commits <= 201


async def test_one_bad_write_fails_alone_in_its_batch(store: Store) -> None:
    await store.add_message(message(), [])
    duplicate, fine = await in_one_batch(
        store,
        store.add_message(message(), []),
        store.update_recipient(rcpt("a@example.com"), message_key="k"),
    )
    assert isinstance(duplicate, StoreError)
    assert fine is True
    assert len(await store.list_recipients()) == 1


async def test_a_write_alone_in_its_batch_that_fails_leaves_nothing(store: Store) -> None:
    """No savepoint for a lone op: its failure rolls back the batch, which is only it."""

    def half_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO meta (key, value) VALUES ('half', 1)")
        conn.execute("INSERT INTO meta (key, value) VALUES ('half', 2)")  # primary key

    with pytest.raises(StoreError, match="test: lone write failed: UNIQUE"):
        await store.writer.submit("test: lone write", half_then_fail)
    rows = await store.writer.submit(
        "test: read", lambda conn: conn.execute("SELECT * FROM meta WHERE key = 'half'").fetchall()
    )
    assert rows == []
    await store.add_message(message(), [])  # the writer goes on
    assert await store.get_message("Q1") is not None


async def test_failed_commit_fails_every_caller_and_reports_no_success(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = store.writer.commit
    commits: list[int] = []

    def commit_fails_after_the_parked_batch(conn: sqlite3.Connection) -> None:
        commits.append(1)
        if len(commits) == 1:
            commit(conn)
        else:
            raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store.writer, "commit", commit_fails_after_the_parked_batch)
    writes = [store.update_recipient(rcpt(f"r{i}@example.com"), message_key="k") for i in range(3)]
    results = await in_one_batch(store, *writes)
    assert len(commits) == 2
    assert all(isinstance(r, StoreError) and "disk I/O error" in str(r) for r in results)

    monkeypatch.undo()
    assert await store.list_recipients() == []  # rolled back
    await store.update_recipient(rcpt("after@example.com"), message_key="k")
    assert [r.rcpt for r in await store.list_recipients()] == ["after@example.com"]


async def test_disk_full_fails_the_batch_then_recovers(store: Store, db_path: Path) -> None:
    await store.add_message(message("Q0"), [rcpt("kept@example.com", queue_id="Q0")])
    await limit_size_to_current(store)
    big = SECRET + b"x" * 200_000

    small, large = await in_one_batch(
        store,
        store.update_recipient(rcpt("small@example.com", queue_id="Q0"), message_key="k"),
        store.add_message(message("Q1", content=big), [rcpt("a@example.com")]),
    )
    for error in (small, large):
        assert isinstance(error, StoreError)
        assert "full" in str(error)
        assert str(db_path) in str(error)
        assert "secret" not in str(error)
    # Full is full: later writes fail too ...
    with pytest.raises(StoreError, match="full"):
        await store.add_message(message("Q1", content=big), [rcpt("a@example.com")])
    # ... and reads still work.
    got = await store.get_message("Q0")
    assert got is not None
    assert [r.rcpt for r in got[1]] == ["kept@example.com"]

    await set_writer_pragma(store, "max_page_count = 1000000")  # space freed
    await store.add_message(message("Q1", content=big), [rcpt("a@example.com")])
    await store.update_recipient(rcpt("small@example.com", queue_id="Q0"), message_key="k")
    got = await store.get_message("Q1")
    assert got is not None
    assert got[0].content == big
    assert await store.check_writable() is True


async def test_read_only_database_fails_writers_then_recovers(store: Store) -> None:
    await set_writer_pragma(store, "query_only = ON")
    results = await asyncio.gather(
        store.add_message(message(), [rcpt("a@example.com")]),
        store.update_recipient(rcpt("b@example.com"), message_key="k"),
        return_exceptions=True,
    )
    assert all(isinstance(r, StoreError) and "readonly" in str(r) for r in results)
    assert await store.check_writable() is False

    await set_writer_pragma(store, "query_only = OFF")
    assert await store.check_writable() is True
    await store.add_message(message(), [rcpt("a@example.com")])
    assert len(await store.list_recipients()) == 1


# -- claimers of one host ------------------------------------------------------


async def test_recover_claims_releases_only_dead_claimers(db_path: Path, clock: Clock) -> None:
    first = await Store.open(db_path, clock=clock)
    second = await Store.open(db_path, clock=clock)
    try:
        assert await first.recover_claims() == 0
        await first.add_message(
            message(content=SECRET), [rcpt("a@x.org", next_attempt=T0, spooled_at=T0)]
        )
        await first.claim_due(now=T0, limit=1, lease=1e9)
        assert await second.recover_claims() == 0  # first is alive: its claim stands
        assert await second.claim_due(now=T0 + 1, limit=1, lease=60) == []
        await first.close()
        third = await Store.open(db_path, clock=clock)
        try:
            assert await third.recover_claims() == 1
            [(_, record)] = await third.claim_due(now=T0 + 1, limit=1, lease=60)
            assert (record.state, record.attempts) == (RecipientState.UNKNOWN, 2)
        finally:
            await third.close()
    finally:
        await first.close()
        await second.close()
