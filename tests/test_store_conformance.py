"""The rules of :mod:`smtp_bridge.store.base`, held against every backend.

Each test runs on SQLite (a file under tmp_path) and on PostgreSQL (a fresh
database of the session's throwaway cluster, tests/pg.py). What only one
backend does is in tests/test_store_sqlite.py and tests/test_store_postgres.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from store_helpers import SECRET, T0, TTL, Clock, message, rcpt

import smtp_bridge.store as store_module
from smtp_bridge.outcomes import RecipientState
from smtp_bridge.store import Guard, GuardState, StateStore, StoreError

#: Opens a store on the test's database: ``await opener(dedup_ttl=..., clock=...)``.
Opener = Callable[..., Awaitable[StateStore]]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens stores of one backend, all on the same database."""
    if request.param == "sqlite":
        from smtp_bridge.store.sqlite import SQLiteStore

        path = tmp_path / "state" / "bridge.sqlite3"

        async def open_sqlite(**kwargs: Any) -> StateStore:
            return await SQLiteStore.open(path, **kwargs)

        return open_sqlite
    url = request.getfixturevalue("pg_url")
    from smtp_bridge.store.postgres import PostgresStore

    async def open_postgres(**kwargs: Any) -> StateStore:
        return await PostgresStore.open(url, **kwargs)

    return open_postgres


@pytest.fixture
async def store(opener: Opener, clock: Clock) -> AsyncIterator[StateStore]:
    opened = await opener(dedup_ttl=TTL, clock=clock)
    try:
        yield opened
    finally:
        await opened.close()


def test_exports() -> None:
    assert set(store_module.__all__) == {
        "FINAL_STATES",
        "STATE_FILE",
        "Admission",
        "Guard",
        "GuardState",
        "Health",
        "Ledger",
        "MessageRecord",
        "Notice",
        "QueueAdmin",
        "Quotas",
        "RecipientRecord",
        "Spool",
        "SpoolStats",
        "StateStore",
        "StoreError",
        "describe_store",
        "open_store",
        "sqlite_path",
        "store_secrets",
    }


async def test_reopen_keeps_data(opener: Opener) -> None:
    first = await opener()
    await first.add_message(message(), [rcpt("a@example.com")])
    await first.close()
    second = await opener()
    try:
        assert await second.get_message("Q1") is not None
    finally:
        await second.close()


async def test_closed_store_raises(store: StateStore) -> None:
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.update_recipient(rcpt("a@example.com"), message_key="k")
    with pytest.raises(StoreError, match="closed"):
        await store.counts()
    assert await store.check_writable() is False
    await store.close()  # idempotent


async def test_close_completes_pending_writes(opener: Opener) -> None:
    opened = await opener()
    writes = [
        opened.update_recipient(rcpt(f"r{i}@example.com"), message_key="k") for i in range(50)
    ]
    # close() is started after every write has been queued (gather runs tasks in order)
    # and must not return before all of them are committed.
    results = await asyncio.gather(*writes, opened.close(), return_exceptions=True)
    assert results == [True] * 50 + [None]
    reopened = await opener()
    try:
        assert (await reopened.counts())["retrying"] == 50
    finally:
        await reopened.close()


async def test_message_round_trip(store: StateStore) -> None:
    msg = message(content=SECRET)
    recipients = [
        rcpt("b@example.com", route="otp", template_id="E_1002", next_attempt=T0 + 30),
        rcpt(
            "a@example.com",
            RecipientState.FAILED,
            api_code=40005,
            reply="550 5.1.3 rejected",
            attempts=1,
            updated_at=T0 + 5,
            error="recipient format incorrect",
        ),
    ]
    await store.add_message(msg, recipients)
    got = await store.get_message("Q1")
    assert got is not None
    got_msg, got_rcpts = got
    assert got_msg == msg
    assert got_rcpts == [
        recipients[1],
        rcpt(
            "b@example.com",
            route="otp",
            template_id="E_1002",
            next_attempt=T0 + 30,
            updated_at=T0,  # 0.0 means "now": the store's clock
        ),
    ]
    assert await store.get_message("nope") is None


async def test_message_without_content_round_trips_as_none(store: StateStore) -> None:
    await store.add_message(message(), [])
    got = await store.get_message("Q1")
    assert got is not None
    assert got[0].content is None
    assert got[1] == []


async def test_add_message_rejects_recipients_of_another_message(store: StateStore) -> None:
    with pytest.raises(ValueError, match="queue_id"):
        await store.add_message(message(), [rcpt("a@example.com", queue_id="OTHER")])


async def test_add_message_twice_is_a_store_error_and_store_keeps_working(
    store: StateStore,
) -> None:
    await store.add_message(message(), [rcpt("a@example.com")])
    with pytest.raises(StoreError, match="add message failed"):
        await store.add_message(message(), [rcpt("a@example.com")])
    await store.add_message(message("Q2"), [rcpt("a@example.com", queue_id="Q2")])
    assert (await store.counts())["retrying"] == 2


async def test_add_message_is_one_transaction(store: StateStore) -> None:
    # The second recipient fails after the message row was written: nothing may remain.
    bogus = rcpt("b@example.com", "bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bogus"):
        await store.add_message(message(), [rcpt("a@example.com"), bogus])
    assert await store.get_message("Q1") is None
    assert sum((await store.counts()).values()) == 0


async def test_add_message_merges_a_repeated_recipient(store: StateStore) -> None:
    await store.add_message(
        message(), [rcpt("a@example.com"), rcpt("a@example.com", RecipientState.DELIVERED)]
    )
    got = await store.get_message("Q1")
    assert got is not None
    assert [(r.rcpt, r.state) for r in got[1]] == [("a@example.com", RecipientState.DELIVERED)]


async def test_update_recipient_inserts_then_replaces(store: StateStore, clock: Clock) -> None:
    await store.add_message(message(content=SECRET), [rcpt("a@example.com")])
    clock.now = T0 + 10
    await store.update_recipient(
        rcpt("a@example.com", RecipientState.DELIVERED, api_code=200, attempts=1, reply="250"),
        message_key="key-1",
    )
    await store.update_recipient(rcpt("new@example.com"), message_key="key-1")
    got = await store.get_message("Q1")
    assert got is not None
    assert got[1] == [
        rcpt(
            "a@example.com",
            RecipientState.DELIVERED,
            api_code=200,
            attempts=1,
            reply="250",
            updated_at=T0 + 10,
        ),
        rcpt("new@example.com", updated_at=T0 + 10),
    ]


async def test_update_recipient_never_lowers_attempts(store: StateStore) -> None:
    await store.update_recipient(rcpt("a@example.com", attempts=3), message_key="k")
    await store.update_recipient(rcpt("a@example.com", attempts=1), message_key="k")
    (record,) = await store.list_recipients()
    assert record.attempts == 3


async def test_list_recipients_newest_first_with_state_filter(store: StateStore) -> None:
    await store.update_recipient(
        rcpt("old@example.com", RecipientState.DEAD, updated_at=T0 + 1), message_key="k"
    )
    await store.update_recipient(
        rcpt("mid@example.com", RecipientState.DELIVERED, updated_at=T0 + 2), message_key="k"
    )
    await store.update_recipient(
        rcpt("new@example.com", RecipientState.DEAD, updated_at=T0 + 3), message_key="k"
    )
    assert [r.rcpt for r in await store.list_recipients()] == [
        "new@example.com",
        "mid@example.com",
        "old@example.com",
    ]
    dead = await store.list_recipients(states={RecipientState.DEAD})
    assert [r.rcpt for r in dead] == ["new@example.com", "old@example.com"]
    assert [r.rcpt for r in await store.list_recipients(limit=1)] == ["new@example.com"]
    assert await store.list_recipients(states=()) == []


async def test_counts_every_state(store: StateStore) -> None:
    await store.add_message(
        message(),
        [
            rcpt("a@example.com", RecipientState.DELIVERED),
            rcpt("b@example.com", RecipientState.DELIVERED),
            rcpt("c@example.com", RecipientState.DEAD),
        ],
    )
    assert await store.counts() == {
        "delivered": 2,
        "retrying": 0,
        "unknown": 0,
        "failed": 0,
        "dead": 1,
        "dropped": 0,
        "duplicate": 0,
    }


async def test_check_writable(store: StateStore) -> None:
    assert await store.check_writable() is True


async def test_previous_outcomes_lower_cases_and_honours_ttl(
    store: StateStore, clock: Clock
) -> None:
    await store.update_recipient(
        rcpt("Alice@Example.COM", RecipientState.DELIVERED), message_key="key-1"
    )
    await store.update_recipient(
        rcpt("bob@example.com", RecipientState.UNKNOWN), message_key="key-1"
    )
    for state in (RecipientState.FAILED, RecipientState.RETRYING, RecipientState.DEAD):
        await store.update_recipient(rcpt(f"{state.value}@example.com", state), message_key="key-1")
    asked = ["alice@example.com", "BOB@example.com", "failed@example.com", "retrying@example.com"]
    asked += ["dead@example.com", "carol@example.com"]

    assert await store.previous_outcomes("key-1", asked) == {
        "alice@example.com": RecipientState.DELIVERED,
        "bob@example.com": RecipientState.UNKNOWN,
    }
    assert await store.previous_outcomes("other-key", asked) == {}
    assert await store.previous_outcomes("key-1", []) == {}

    clock.now = T0 + TTL - 1
    assert set(await store.previous_outcomes("key-1", asked)) == {
        "alice@example.com",
        "bob@example.com",
    }
    clock.now = T0 + TTL
    assert await store.previous_outcomes("key-1", asked) == {}


async def test_dedup_unknown_becomes_delivered_but_not_back(
    store: StateStore, clock: Clock
) -> None:
    await store.update_recipient(rcpt("a@example.com", RecipientState.UNKNOWN), message_key="k")
    clock.now = T0 + 10
    await store.update_recipient(
        rcpt("a@example.com", RecipientState.DELIVERED, queue_id="Q2"), message_key="k"
    )
    assert await store.previous_outcomes("k", ["a@example.com"]) == {
        "a@example.com": RecipientState.DELIVERED
    }
    # A later duplicate send that times out does not make the pair "unknown" again.
    clock.now = T0 + 20
    await store.update_recipient(
        rcpt("A@example.com", RecipientState.UNKNOWN, queue_id="Q3"), message_key="k"
    )
    assert await store.previous_outcomes("k", ["a@example.com"]) == {
        "a@example.com": RecipientState.DELIVERED
    }
    # ... but the delivery is remembered from its own time, not the later attempt's.
    clock.now = T0 + 10 + TTL
    assert await store.previous_outcomes("k", ["a@example.com"]) == {}


async def test_add_message_remembers_delivered_recipients(store: StateStore) -> None:
    await store.add_message(
        message(key="sha256:abc"),
        [
            rcpt("A@example.com", RecipientState.DELIVERED),
            rcpt("b@example.com", RecipientState.RETRYING),
        ],
    )
    outcomes = await store.previous_outcomes("sha256:abc", ["a@example.com", "b@example.com"])
    assert outcomes == {"a@example.com": RecipientState.DELIVERED}


async def test_claim_due_respects_next_attempt_leases_and_counts_attempts(
    store: StateStore,
) -> None:
    now = T0 + 100
    await store.add_message(
        message("Q1", content=SECRET),
        [
            rcpt("due@example.com", next_attempt=now - 1, attempts=1),
            rcpt("later@example.com", next_attempt=now + 1),
            rcpt("unknown@example.com", RecipientState.UNKNOWN, next_attempt=now),
            rcpt("done@example.com", RecipientState.DELIVERED, next_attempt=now - 1),
            rcpt("never@example.com", next_attempt=None),
        ],
    )
    # Not spooled (direct mode): there is nothing a worker could send.
    await store.add_message(
        message("Q2"),
        [
            rcpt("direct@example.com", RecipientState.UNKNOWN, queue_id="Q2", next_attempt=0.0),
            rcpt("direct2@example.com", queue_id="Q2", next_attempt=0.0),
        ],
    )

    claimed = await store.claim_due(now=now, limit=10, lease=60)
    assert [(m.queue_id, r.rcpt, r.attempts) for m, r in claimed] == [
        ("Q1", "due@example.com", 2),
        ("Q1", "unknown@example.com", 1),
    ]
    assert all(m.content == SECRET for m, _ in claimed)
    # The attempt is counted in the database before it is made.
    got = await store.get_message("Q1")
    assert got is not None
    assert {r.rcpt: r.attempts for r in got[1]}["due@example.com"] == 2

    # Leased: nobody else gets them until the lease runs out; "later" is due by now.
    claimed = await store.claim_due(now=now + 30, limit=10, lease=60)
    assert [(r.rcpt, r.attempts) for _, r in claimed] == [("later@example.com", 1)]
    assert await store.claim_due(now=now + 60, limit=10, lease=60) == []
    claimed = await store.claim_due(now=now + 61, limit=10, lease=60)
    assert [(r.rcpt, r.attempts) for _, r in claimed] == [
        ("due@example.com", 3),
        ("unknown@example.com", 2),
    ]

    # Writing the outcome releases the claim at once.
    await store.update_recipient(
        rcpt("due@example.com", attempts=3, next_attempt=now + 70), message_key="key-1"
    )
    claimed = await store.claim_due(now=now + 70, limit=10, lease=60)
    assert [(r.rcpt, r.attempts) for _, r in claimed] == [("due@example.com", 4)]


async def test_claim_due_limit_takes_the_most_overdue(store: StateStore) -> None:
    await store.add_message(
        message(content=SECRET),
        [rcpt(f"r{i}@example.com", next_attempt=T0 - i) for i in range(5)],
    )
    claimed = await store.claim_due(now=T0, limit=2, lease=60)
    assert [r.rcpt for _, r in claimed] == ["r4@example.com", "r3@example.com"]
    assert await store.claim_due(now=T0, limit=0, lease=60) == []


async def test_purge_expired(store: StateStore, clock: Clock) -> None:
    old, recent = T0, T0 + 2 * TTL
    # Old, all final: purged with its recipients.
    await store.add_message(
        message("final", content=SECRET, received_at=old),
        [
            rcpt("a@example.com", RecipientState.DELIVERED, queue_id="final", updated_at=old),
            rcpt("b@example.com", RecipientState.FAILED, queue_id="final", updated_at=old),
        ],
    )
    # Old dead letter with its content: kept for `queue retry` until purged by hand.
    await store.add_message(
        message("deadletter", content=SECRET, received_at=old),
        [rcpt("g@example.com", RecipientState.DEAD, queue_id="deadletter", updated_at=old)],
    )
    # Old but still spooled and retrying: kept.
    await store.add_message(
        message("spooled", content=SECRET, received_at=old),
        [rcpt("c@example.com", queue_id="spooled", updated_at=old)],
    )
    # Old, never spooled, the client owned the retry: nothing will ever touch it, purged.
    await store.add_message(
        message("direct", received_at=old),
        [rcpt("d@example.com", RecipientState.UNKNOWN, queue_id="direct", updated_at=old)],
    )
    # Old message whose last recipient became final recently: kept.
    await store.add_message(
        message("late", content=SECRET, received_at=old),
        [rcpt("e@example.com", RecipientState.FAILED, queue_id="late", updated_at=recent)],
    )
    # A recent delivery: kept, dedup row too.
    await store.add_message(
        message("new", received_at=recent),
        [rcpt("f@example.com", RecipientState.DELIVERED, queue_id="new", updated_at=recent)],
    )
    # Dedup rows written: a, d (old) and f (recent).

    clock.now = recent + 1
    removed = await store.purge_expired()
    # 2 dedup rows + final (1 message, 2 recipients) + direct (1 message, 1 recipient)
    assert removed == 7
    assert await store.get_message("final") is None
    assert await store.get_message("direct") is None
    for kept in ("spooled", "late", "new", "deadletter"):
        assert await store.get_message(kept) is not None
    assert await store.previous_outcomes("key-1", ["f@example.com", "a@example.com"]) == {
        "f@example.com": RecipientState.DELIVERED
    }
    assert await store.purge_expired() == 0
    # An explicit `now` overrides the clock.
    assert await store.purge_expired(now=recent + TTL + 1) == 5  # late, new and f's dedup row
    assert await store.get_message("deadletter") is not None


async def test_two_stores_on_one_database_see_each_others_writes(
    store: StateStore, opener: Opener, clock: Clock
) -> None:
    cli = await opener(dedup_ttl=TTL, clock=clock)
    try:
        await store.add_message(
            message("Q1", content=SECRET), [rcpt("a@example.com", next_attempt=T0)]
        )
        claimed = await cli.claim_due(now=T0, limit=10, lease=60)
        assert [r.rcpt for _, r in claimed] == ["a@example.com"]
        # The daemon sees the CLI's claim: nothing left for it.
        assert await store.claim_due(now=T0, limit=10, lease=60) == []
        await cli.update_recipient(
            rcpt("a@example.com", RecipientState.DEAD, attempts=1), message_key="key-1"
        )
        assert (await store.counts())["dead"] == 1
    finally:
        await cli.close()


async def test_record_outcomes_spools_content_and_recipients_in_one_transaction(
    store: StateStore,
) -> None:
    await store.add_message(message("Q1"), [rcpt("a@example.com"), rcpt("b@example.com")])
    assert await store.next_due() is None
    delivered = rcpt("b@example.com", state=RecipientState.DELIVERED, attempts=1)
    await store.record_outcomes(
        "Q1",
        [rcpt("a@example.com", attempts=1, next_attempt=T0 + 30, spooled_at=T0), delivered],
        message_key="key-1",
        spool=SECRET,
        mode="hybrid",
    )
    got = await store.get_message("Q1")
    assert got is not None
    assert (got[0].content, got[0].mode) == (SECRET, "hybrid")
    assert {r.rcpt: r.state for r in got[1]} == {
        "a@example.com": RecipientState.RETRYING,
        "b@example.com": RecipientState.DELIVERED,
    }
    assert await store.next_due() == T0 + 30
    assert await store.spool_stats() == (1, T0)
    assert await store.previous_outcomes("key-1", ["B@example.com", "a@example.com"]) == {
        "b@example.com": RecipientState.DELIVERED
    }
    with pytest.raises(StoreError):
        await store.record_outcomes("nope", [], message_key="k", spool=SECRET)


async def test_record_outcomes_without_content_spools_nothing(store: StateStore) -> None:
    await store.add_message(message("Q1"), [rcpt("a@example.com")])
    failed = rcpt("a@example.com", state=RecipientState.FAILED, attempts=1)
    await store.record_outcomes("Q1", [failed], message_key="key-1")
    got = await store.get_message("Q1")
    assert got is not None
    assert got[0].content is None
    assert [(r.rcpt, r.state, r.attempts) for r in got[1]] == [
        ("a@example.com", RecipientState.FAILED, 1)
    ]
    assert await store.previous_outcomes("key-1", ["a@example.com"]) == {}


async def test_open_message_records_the_message_and_answers_what_was_remembered(
    store: StateStore,
) -> None:
    await store.add_message(
        message("Q0"),
        [
            rcpt("a@example.com", queue_id="Q0", state=RecipientState.DELIVERED),
            rcpt("b@example.com", queue_id="Q0", state=RecipientState.UNKNOWN),
            rcpt("c@example.com", queue_id="Q0", state=RecipientState.FAILED),
        ],
    )
    rcpts = ["A@example.com", "b@example.com", "c@example.com", "d@example.com"]
    admission = await store.open_message(message("Q1"), rcpts, lease=60)
    # Delivered by Q0: not Q1's to send. Unknown (Q0's call may have gone out): Q1's,
    # as a possible duplicate of Q0. Failed, or nothing: Q1's.
    assert admission.guards == {
        "a@example.com": Guard(False, GuardState.DELIVERED, "Q0"),
        "b@example.com": Guard(True, GuardState.UNKNOWN, "Q0"),
        "c@example.com": Guard(True),
        "d@example.com": Guard(True),
    }
    assert admission.guards["b@example.com"].possibly_sent
    assert admission.message_id_reused_by == ""
    got = await store.get_message("Q1")
    assert got is not None
    assert got[0].content is None
    assert [(r.rcpt, r.state) for r in got[1]] == [(r, RecipientState.RETRYING) for r in rcpts]
    # Nothing was sent for Q1 yet: its guards do not count as remembered outcomes.
    assert await store.previous_outcomes("key-1", ["d@example.com"]) == {}
    with pytest.raises(StoreError):
        await store.open_message(message("Q1"), ["e@example.com"], lease=60)  # same queue id


async def test_record_outcomes_moves_each_recipients_guard_by_its_own_outcome(
    store: StateStore,
) -> None:
    # One call, four recipients (two of them one address in two cases): each guard
    # ends as its own outcome says, whatever the others' say.
    rcpts = ["a@x.org", "b@x.org", "c@x.org", "C@x.org"]
    admission = await store.open_message(message("Q1"), rcpts, lease=60)
    assert set(admission.guards) == {"a@x.org", "b@x.org", "c@x.org"}
    assert all(guard.acquired for guard in admission.guards.values())
    await store.record_outcomes(
        "Q1",
        [
            rcpt("a@x.org", RecipientState.DELIVERED, attempts=1),
            rcpt("b@x.org", RecipientState.RETRYING, attempts=1),  # 451 to the client
            rcpt("c@x.org", RecipientState.UNKNOWN, attempts=1),
            rcpt("C@x.org", RecipientState.DELIVERED, attempts=1),
        ],
        message_key="key-1",
    )
    assert await store.previous_outcomes("key-1", rcpts) == {
        "a@x.org": RecipientState.DELIVERED,
        "c@x.org": RecipientState.DELIVERED,  # written last: the truth
    }
    retry = await store.open_message(message("Q2"), rcpts, lease=60)
    assert retry.guards == {
        "a@x.org": Guard(False, GuardState.DELIVERED, "Q1"),
        "b@x.org": Guard(True),  # released: the client's retry sends it
        "c@x.org": Guard(False, GuardState.DELIVERED, "Q1"),
    }
    got = await store.get_message("Q1")
    assert got is not None
    assert {(r.rcpt, r.state, r.attempts) for r in got[1]} == {
        ("a@x.org", RecipientState.DELIVERED, 1),
        ("b@x.org", RecipientState.RETRYING, 1),
        ("c@x.org", RecipientState.UNKNOWN, 1),
        ("C@x.org", RecipientState.DELIVERED, 1),
    }


async def test_a_message_to_more_recipients_than_one_statement_takes(store: StateStore) -> None:
    # 1,200 recipients: more rows than one PostgreSQL statement carries (500), some
    # of them delivered already by an earlier copy.
    rcpts = [f"r{i:04}@x.org" for i in range(1200)]
    await store.add_message(
        message("Q0"),
        [rcpt(r, queue_id="Q0", state=RecipientState.DELIVERED) for r in rcpts[::100]],
    )
    admission = await store.open_message(message("Q1"), rcpts, lease=60)
    assert len(admission.guards) == 1200
    assert {r for r, g in admission.guards.items() if not g.acquired} == set(rcpts[::100])
    sent = [r for r in rcpts if admission.guards[r].acquired]
    await store.record_outcomes(
        "Q1",
        [rcpt(r, RecipientState.DELIVERED, attempts=1) for r in sent],
        message_key="key-1",
    )
    remembered = await store.previous_outcomes("key-1", rcpts)
    assert remembered == {r: RecipientState.DELIVERED for r in rcpts}
    got = await store.get_message("Q1")
    assert got is not None and len(got[1]) == 1200


async def test_release_claim_takes_the_attempt_back(store: StateStore) -> None:
    await store.add_message(
        message(content=SECRET), [rcpt("a@example.com", next_attempt=T0, spooled_at=T0)]
    )
    [(_, claimed)] = await store.claim_due(now=T0, limit=5, lease=60)
    assert claimed.attempts == 1
    assert await store.next_due() == T0 + 60  # the lease
    await store.release_claim("Q1", "a@example.com", next_attempt=T0 + 5)
    [(_, again)] = await store.claim_due(now=T0 + 5, limit=5, lease=60)
    assert again.attempts == 1


async def test_content_is_dropped_when_done_but_kept_for_dead_letters(store: StateStore) -> None:
    # Two different messages (two keys: the same key would make the second a copy).
    for queue_id in ("done", "dead"):
        await store.add_message(
            message(queue_id, key=f"key-{queue_id}", content=SECRET),
            [rcpt(r, queue_id=queue_id, next_attempt=T0) for r in ("a@x.org", "b@x.org")],
        )
    delivered = rcpt("a@x.org", RecipientState.DELIVERED, queue_id="done")
    await store.update_recipient(delivered, message_key="key-done")
    got = await store.get_message("done")
    assert got is not None and got[0].content == SECRET  # b is still waiting
    failed = rcpt("b@x.org", RecipientState.FAILED, queue_id="done")
    await store.update_recipient(failed, message_key="key-done")
    got = await store.get_message("done")
    assert got is not None and got[0].content is None
    for r, state in (("a@x.org", RecipientState.DELIVERED), ("b@x.org", RecipientState.DEAD)):
        await store.update_recipient(rcpt(r, state, queue_id="dead"), message_key="key-dead")
    got = await store.get_message("dead")
    assert got is not None and got[0].content == SECRET  # `queue retry` may resend it


async def test_dead_letter_and_its_notice_commit_together(store: StateStore) -> None:
    await store.add_message(message(content=SECRET), [rcpt("a@x.org", next_attempt=T0)])
    notice = (
        message("N1", key="notice:Q1:a@x.org", content=b"{}"),
        [rcpt("app@example.com", queue_id="N1", next_attempt=T0)],
    )
    await store.update_recipient(
        rcpt("a@x.org", RecipientState.DEAD), message_key="key-1", notice=notice
    )
    assert await store.get_message("N1") is not None
    # A notice that cannot be written takes the dead letter with it: both or neither.
    await store.add_message(message("Q2", content=SECRET), [rcpt("b@x.org", queue_id="Q2")])
    with pytest.raises(StoreError):
        await store.update_recipient(
            rcpt("b@x.org", RecipientState.DEAD, queue_id="Q2"), message_key="k", notice=notice
        )
    got = await store.get_message("Q2")
    assert got is not None and got[1][0].state is RecipientState.RETRYING


async def test_list_retry_and_purge_for_the_queue_command(store: StateStore, clock: Clock) -> None:
    await store.add_message(
        message("Q1", content=SECRET),
        [
            rcpt("wait@x.org", next_attempt=T0 + 600, spooled_at=T0),
            rcpt("dead@x.org", RecipientState.DEAD, spooled_at=T0),
        ],
    )
    await store.add_message(
        message("Q2"), [rcpt("direct@x.org", RecipientState.DEAD, queue_id="Q2")]
    )
    waiting = await store.list_queue()
    assert [(m.queue_id, r.rcpt, m.content) for m, r in waiting] == [("Q1", "wait@x.org", b"")]
    dead = await store.list_queue(dead=True)
    assert sorted((r.rcpt, m.content is not None) for m, r in dead) == [
        ("dead@x.org", True),
        ("direct@x.org", False),  # direct mode: nothing to resend
    ]
    clock.now = T0 + 10
    assert await store.retry("Q1") == (2, 0)  # revived one, hurried the other
    got = await store.get_message("Q1")
    assert got is not None
    assert {r.rcpt: (r.state, r.next_attempt, r.spooled_at) for r in got[1]} == {
        "dead@x.org": (RecipientState.RETRYING, T0 + 10, T0 + 10),
        "wait@x.org": (RecipientState.RETRYING, T0 + 10, T0),
    }
    assert await store.retry() == (0, 1)  # --all-dead: only the unretryable one is left
    assert await store.purge(dead=True) == 1
    assert await store.get_message("Q2") is None
    assert await store.purge("Q1") == 2
    assert await store.get_message("Q1") is None
    with pytest.raises(ValueError):
        await store.purge()
