"""What only the PostgreSQL backend does: several instances on one database, outages.

The rules every backend keeps are tested for PostgreSQL too, in
tests/test_store_conformance.py. Every test gets a fresh database of the
session's throwaway cluster (tests/pg.py), whose fixtures skip (or fail under
``CI=true``) when PostgreSQL or psycopg is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pg import PgCluster
from store_helpers import SECRET, T0, TTL, Clock, message, rcpt

from smtp_bridge.config import DeliveryConfig
from smtp_bridge.outcomes import RecipientState
from smtp_bridge.store import StoreError, open_store

with contextlib.suppress(ImportError):  # then the pg_url fixture skips, saying why
    import psycopg

    from smtp_bridge.store.postgres import PostgresStore
    from smtp_bridge.store.postgres.schema import SCHEMA_VERSION

PASSWORD = "s3cretpw"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def stores(pg_url: str, clock: Clock) -> AsyncIterator[Callable[..., Any]]:
    """Opens stores on the test's database (each its own instance); closes them all."""
    opened: list[PostgresStore] = []

    async def open_one(**kwargs: Any) -> PostgresStore:
        kwargs.setdefault("dedup_ttl", TTL)
        kwargs.setdefault("clock", clock)
        store = await PostgresStore.open(kwargs.pop("url", pg_url), **kwargs)
        opened.append(store)
        return store

    try:
        yield open_one
    finally:
        for store in opened:
            await store.close()


def sql(url: str, statement: str) -> list[tuple[Any, ...]]:
    """Run one statement on ``url`` outside any store; its rows, if it returns any."""
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description else []


# -- schema --------------------------------------------------------------------------


async def test_reused_message_id_lookup_searches_its_index_in_a_generic_plan(
    stores: Callable[..., Any], pg_url: str
) -> None:
    """A prepared statement's generic plan, not a walk over the dedup window."""
    await stores()
    from smtp_bridge.store.postgres import _REUSED_MESSAGE_ID

    numbered = _REUSED_MESSAGE_ID.replace("%s", "$1", 1).replace("%s", "$2", 1).replace("%s", "$3")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        conn.execute("SET enable_seqscan = off")  # an empty table: choose between the indexes
        conn.execute(f"PREPARE reused (text, text, float8) AS {numbered}")  # type: ignore[arg-type]
        plan = [row[0] for row in conn.execute("EXPLAIN EXECUTE reused ('<a@b>', 'k', 0)")]
    assert any("messages_message_id" in line for line in plan), plan
    assert not any("messages_received" in line for line in plan), plan


async def test_four_instances_starting_at_once_on_an_empty_database_all_come_up(
    stores: Callable[..., Any], pg_url: str
) -> None:
    opened = await asyncio.gather(*(stores() for _ in range(4)))
    assert [await store.check_writable() for store in opened] == [True] * 4
    assert sql(pg_url, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    tables = {name for (name,) in sql(pg_url, "SELECT tablename FROM pg_tables")}
    assert {"messages", "recipients", "dedup", "meta", "schema_version"} <= tables


async def test_a_newer_schema_is_refused(stores: Callable[..., Any], pg_url: str) -> None:
    await (await stores()).close()
    sql(pg_url, "UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError, match="schema version 99 is newer") as info:
        await stores()
    assert "postgresql://postgres@127.0.0.1:" in str(info.value)


# -- claims of several instances -------------------------------------------------------


async def test_two_instances_claiming_at_once_never_share_a_row(
    stores: Callable[..., Any],
) -> None:
    first, second = await stores(), await stores()
    count = 300
    await first.add_message(
        message(content=SECRET),
        [rcpt(f"r{i:03}@x.org", next_attempt=T0, spooled_at=T0) for i in range(count)],
    )
    claims: dict[str, list[str]] = {first.token: [], second.token: []}

    async def claimer(store: PostgresStore) -> None:
        while True:
            got = await store.claim_due(now=T0, limit=7, lease=600)
            if not got:
                return
            for _, record in got:
                assert record.attempts == 1
                claims[store.token].append(record.rcpt)

    # Eight claimers, four per instance, all running their transactions at once.
    await asyncio.gather(*(claimer(store) for store in (first, second) for _ in range(4)))
    taken = claims[first.token] + claims[second.token]
    assert len(taken) == count
    assert set(taken) == {f"r{i:03}@x.org" for i in range(count)}
    assert claims[first.token] and claims[second.token]  # both did take some
    assert set(claims[first.token]).isdisjoint(claims[second.token])


async def test_a_final_write_after_a_lease_takeover_is_fenced(
    stores: Callable[..., Any],
) -> None:
    slow, other = await stores(), await stores()
    await slow.add_message(
        message(content=SECRET), [rcpt("a@x.org", next_attempt=T0, spooled_at=T0)]
    )
    [(_, mine)] = await slow.claim_due(now=T0, limit=1, lease=10)
    assert await other.claim_due(now=T0 + 10, limit=1, lease=60) == []  # still leased
    [(_, theirs)] = await other.claim_due(now=T0 + 11, limit=1, lease=60)  # lease ran out
    assert (mine.attempts, theirs.attempts) == (1, 2)
    # The first attempt never recorded its end: the takeover may be a duplicate.
    assert theirs.state is RecipientState.UNKNOWN

    # The slow claimer's answer arrives late: it must not overwrite the other's claim.
    late = rcpt("a@x.org", RecipientState.DELIVERED, attempts=1, api_code=200)
    assert await slow.update_recipient(late, message_key="key-1", claim=True) is False
    assert await slow.renew_claim("Q1", "a@x.org", lease=60) is False
    got = await other.get_message("Q1")
    assert got is not None
    [row] = got[1]
    assert (row.state, row.attempts, row.api_code) == (RecipientState.UNKNOWN, 2, None)
    assert got[0].content == SECRET
    assert await other.previous_outcomes("key-1", ["a@x.org"]) == {}

    done = rcpt("a@x.org", RecipientState.DELIVERED, attempts=2, api_code=200)
    assert await other.update_recipient(done, message_key="key-1", claim=True) is True
    got = await other.get_message("Q1")
    assert got is not None
    assert [(r.state, r.attempts) for r in got[1]] == [(RecipientState.DELIVERED, 2)]
    assert got[0].content is None


async def test_on_the_real_clock_leases_are_the_databases_not_the_callers(
    stores: Callable[..., Any], pg_url: str
) -> None:
    first, ahead = await stores(clock=time.time), await stores(clock=time.time)
    now = time.time()
    await first.add_message(
        message(content=SECRET, received_at=now),
        [rcpt("a@x.org", next_attempt=now - 1, spooled_at=now)],
    )
    [(_, claimed)] = await first.claim_due(now=now, limit=5, lease=60)
    # A host whose clock runs an hour ahead does not see the lease as run out.
    assert await ahead.claim_due(now=time.time() + 3600, limit=5, lease=60) == []
    [(left,)] = sql(
        pg_url, "SELECT claimed_until - extract(epoch FROM clock_timestamp()) FROM recipients"
    )
    assert 0 < left <= 60
    assert await first.renew_claim("Q1", "a@x.org", lease=60) is True
    assert claimed.attempts == 1


async def test_renew_claim_extends_only_our_own_live_claim(
    stores: Callable[..., Any], clock: Clock
) -> None:
    mine, other = await stores(), await stores()
    await mine.add_message(
        message(content=SECRET),
        [rcpt(r, next_attempt=T0, spooled_at=T0) for r in ("a@x.org", "b@x.org")],
    )
    assert await mine.renew_claim("Q1", "a@x.org", lease=60) is False  # nobody's claim
    claimed = await mine.claim_due(now=T0, limit=1, lease=60)
    assert [r.rcpt for _, r in claimed] == ["a@x.org"]
    clock.now = T0 + 50
    assert await mine.renew_claim("Q1", "a@x.org", lease=60) is True
    assert await other.renew_claim("Q1", "a@x.org", lease=600) is False  # not theirs
    # b is due at once; a only when the renewed lease (T0 + 50 + 60) runs out.
    assert [r.rcpt for _, r in await other.claim_due(now=T0 + 100, limit=5, lease=60)] == [
        "b@x.org"
    ]
    assert await mine.next_due() == T0 + 110
    assert await other.claim_due(now=T0 + 110, limit=5, lease=60) == []
    [(_, taken)] = await other.claim_due(now=T0 + 111, limit=5, lease=60)
    assert (taken.rcpt, taken.attempts) == ("a@x.org", 2)
    await mine.release_claim("Q1", "b@x.org", next_attempt=T0)  # any writer may release
    assert await mine.recover_claims() == 0  # leases, not recovery, free a dead one's claims


async def test_copies_on_several_instances_never_both_hold_a_guard(
    stores: Callable[..., Any],
) -> None:
    # Eight copies of one message (one key) arrive at once on four instances, in
    # direct mode (open_message) and in queue mode (add_message): for each
    # recipient exactly one copy may send it; the others are told who holds it.
    instances = [await stores() for _ in range(4)]
    rcpts = [f"r{i}@x.org" for i in range(20)]

    async def direct(store: PostgresStore, n: int) -> dict[str, Any]:
        admission = await store.open_message(message(f"D{n}"), rcpts, lease=60)
        return admission.guards

    async def queued(store: PostgresStore, n: int) -> dict[str, Any]:
        admission = await store.add_message(
            message(f"S{n}", content=SECRET),
            [rcpt(r, queue_id=f"S{n}", next_attempt=T0, spooled_at=T0) for r in rcpts],
        )
        return admission.guards

    results = await asyncio.gather(
        *(direct(store, n) for n, store in enumerate(instances)),
        *(queued(store, n) for n, store in enumerate(instances)),
    )
    for r in rcpts:
        holders = [guards[r] for guards in results if guards[r].acquired]
        assert len(holders) == 1, (r, holders)
        refused = [guards[r] for guards in results if not guards[r].acquired]
        assert len(refused) == 7 and all(g.holder for g in refused)
    # Queue-mode copies that lost wrote their rows as duplicates, not spooled.
    spooled = await instances[0].list_queue()
    assert len(spooled) == sum(1 for guards in results[4:] for r in rcpts if guards[r].acquired)


# -- notifications ---------------------------------------------------------------------


async def test_spooling_on_one_instance_wakes_the_other(stores: Callable[..., Any]) -> None:
    listening, writing = await stores(), await stores()
    woken = asyncio.Event()
    listening.on_spooled(woken.set)
    await asyncio.wait_for(listening.listener.ready.wait(), 10)

    await writing.add_message(message("Q0"), [rcpt("a@x.org", queue_id="Q0")])  # not spooled
    await writing.add_message(message(content=SECRET), [rcpt("a@x.org", next_attempt=T0)])
    await asyncio.wait_for(woken.wait(), 10)

    # A failure notice spooled with a dead letter wakes it too, as does `queue retry`.
    for write in (
        writing.update_recipient(
            rcpt("a@x.org", RecipientState.DEAD),
            message_key="key-1",
            notice=(message("N1", content=b"{}"), [rcpt("app@x.org", queue_id="N1")]),
        ),
        writing.retry("Q1"),
    ):
        woken.clear()
        await write
        await asyncio.wait_for(woken.wait(), 10)


# -- outages ---------------------------------------------------------------------------


async def test_database_down_fails_fast_without_password_then_recovers(
    stores: Callable[..., Any], pg_cluster: PgCluster, pg_url: str
) -> None:
    database = pg_url.rsplit("/", 1)[1]
    url = pg_cluster.url(database, password=PASSWORD)
    store = await stores(url=url, timeout=1.0)
    assert store.name == f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/{database}"
    await store.add_message(message(content=SECRET), [rcpt("a@x.org", next_attempt=T0)])
    woken = asyncio.Event()
    store.on_spooled(woken.set)
    await asyncio.wait_for(store.listener.ready.wait(), 10)
    assert not woken.is_set()  # Q1 was spooled before anybody listened

    pg_cluster.stop()
    try:
        for call in (
            lambda: store.add_message(message("Q2"), [rcpt("b@x.org", queue_id="Q2")]),
            lambda: store.claim_due(now=T0, limit=5, lease=60),
        ):
            started = time.monotonic()
            with pytest.raises(StoreError) as info:
                await call()
            assert time.monotonic() - started < 10
            text = str(info.value)
            assert store.name in text
            assert PASSWORD not in text and "secret body" not in text
        assert await store.check_writable() is False
    finally:
        pg_cluster.start()

    # The same store object works again, without a restart ...
    assert await store.check_writable() is True
    await store.add_message(message("Q2"), [rcpt("b@x.org", queue_id="Q2")])
    assert (await store.counts())["retrying"] == 2
    # ... and so do its notifications: it says so once reconnected (some may be lost).
    await asyncio.wait_for(woken.wait(), 15)


async def test_unreachable_database_at_open_is_a_quick_store_error(pg_cluster: PgCluster) -> None:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = sock.getsockname()[1]
        url = f"postgresql://bridge:{PASSWORD}@127.0.0.1:{port}/bridge"
        started = time.monotonic()
        with pytest.raises(StoreError, match="cannot open state store") as info:
            await PostgresStore.open(url, timeout=1.0)
    assert time.monotonic() - started < 10
    assert f"postgresql://bridge@127.0.0.1:{port}/bridge" in str(info.value)
    assert "refused" in str(info.value)  # why, not only that no connection came
    assert PASSWORD not in str(info.value)


# -- open_store ------------------------------------------------------------------------


async def test_open_store_opens_postgresql_with_the_configured_lease(
    pg_cluster: PgCluster, pg_url: str, tmp_path: Path
) -> None:
    database = pg_url.rsplit("/", 1)[1]
    config = DeliveryConfig(
        state_dir=tmp_path, store=pg_cluster.url(database, password=PASSWORD), claim_lease=42
    )
    store = await open_store(config)
    try:
        assert isinstance(store, PostgresStore)
        assert store.claim_lease == 42
        assert PASSWORD not in store.name
        assert await store.check_writable() is True
    finally:
        await store.close()
    assert not (tmp_path / "state.sqlite3").exists()


async def test_open_store_without_the_postgresql_extra_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in [n for n in sys.modules if n.startswith("smtp_bridge.store.postgres")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg -> ImportError
    config = DeliveryConfig(state_dir=tmp_path, store=f"postgresql://u:{PASSWORD}@db/bridge")
    with pytest.raises(StoreError, match=r"pip install 'smtp-bridge\[postgresql\]'") as info:
        await open_store(config)
    assert PASSWORD not in str(info.value)
