"""``quotas:``: recipients per window per key, counted in the state store, refused at
RCPT with 451 4.7.1 naming the quota (issue 13, docs/configuration.md)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest
from store_helpers import TTL, Clock

from smtp_bridge.config import ConfigError, parse_config
from smtp_bridge.store import StateStore
from smtp_bridge.store.sqlite import SQLiteStore
from smtp_bridge.store.sqlite.schema import MIGRATIONS

T0 = 1_700_000_000.0


async def open_backend(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> StateStore:
    """A store of ``backend`` on this test's database (SQLite file, or PostgreSQL)."""
    if backend == "sqlite":
        return await SQLiteStore.open(tmp_path / "q.sqlite3", dedup_ttl=TTL, clock=Clock(T0))
    from smtp_bridge.store.postgres import PostgresStore

    url = request.getfixturevalue("pg_url")
    return await PostgresStore.open(
        url, dedup_ttl=TTL, anonymous_ttl=TTL, claim_lease=60, clock=Clock(T0)
    )


@pytest.fixture(params=["sqlite", "postgres"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateStore]:
    opened = await open_backend(request.param, request, tmp_path)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = await SQLiteStore.open(tmp_path / "q.sqlite3", dedup_ttl=TTL, clock=Clock(T0))
    try:
        yield opened
    finally:
        await opened.close()


# ---------------------------------------------------------------- the store


async def test_take_quota_counts_up_to_the_limit_per_key(any_store: StateStore) -> None:
    store = any_store
    assert isinstance(store, StateStore)
    takes = [await store.take_quota("q", "a", window=3600, limit=3, now=T0 + i) for i in range(5)]
    assert takes == [True, True, True, False, False]
    assert await store.take_quota("q", "b", window=3600, limit=3, now=T0 + 5)  # another key
    assert await store.take_quota("other", "a", window=3600, limit=3, now=T0 + 5)  # another quota


async def test_a_new_window_starts_after_the_last_one_ends(any_store: StateStore) -> None:
    store = any_store
    for _ in range(2):
        assert await store.take_quota("q", "a", window=60, limit=2, now=T0)
    assert not await store.take_quota("q", "a", window=60, limit=2, now=T0 + 59.9)
    assert await store.take_quota("q", "a", window=60, limit=2, now=T0 + 60)
    assert await store.take_quota("q", "a", window=60, limit=2, now=T0 + 61)
    assert not await store.take_quota("q", "a", window=60, limit=2, now=T0 + 62)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_concurrent_takers_never_pass_the_limit(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Two store objects on one store: two processes of one host (SQLite: the host's
    # count), or two instances on one database (PostgreSQL: shared).
    one = await open_backend(backend, request, tmp_path)
    two = await open_backend(backend, request, tmp_path)
    try:
        takes = await asyncio.gather(
            *(s.take_quota("q", "k", window=3600, limit=25, now=T0) for s in (one, two) * 40)
        )
    finally:
        await one.close()
        await two.close()
    assert sum(takes) == 25


async def test_purge_drops_ended_windows_only(store: SQLiteStore) -> None:
    await store.take_quota("q", "old", window=60, limit=5, now=T0)
    await store.take_quota("q", "live", window=3600, limit=5, now=T0)
    await store.purge_expired(now=T0 + 120)
    with sqlite3.connect(store.path) as conn:
        keys = [k for (k,) in conn.execute("SELECT key FROM quota_counters")]
    assert keys == ["live"]


async def test_the_migration_adds_the_counters_to_an_older_store(tmp_path: Path) -> None:
    path = tmp_path / "previous.sqlite3"
    with sqlite3.connect(path) as conn:  # a store as the previous release left it
        for statements in MIGRATIONS[:-1]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) - 1}")
    conn.close()
    store = await SQLiteStore.open(path, dedup_ttl=TTL)
    try:
        assert await store.take_quota("q", "k", window=60, limit=1, now=T0)
        assert not await store.take_quota("q", "k", window=60, limit=1, now=T0)
    finally:
        await store.close()


# ---------------------------------------------------------------- the config


def _config_with(tmp_path: Path, quotas: object) -> str:
    return json.dumps({
        "api": {"url": "http://127.0.0.1:9/x", "app_key": "k"},
        "delivery": {"state_dir": str(tmp_path)},
        "routes": [{"template_id": "E"}],
        "quotas": quotas,
    })  # fmt: skip


@pytest.mark.parametrize(
    ("quota", "path", "needle"),
    [
        ({"name": "q", "per": "user", "recipients": "10/w"}, "quotas[0].recipients", "1000/h"),
        ({"name": "q", "per": "user", "recipients": "0/h"}, "quotas[0].recipients", "at least"),
        ({"name": "q", "per": "host", "recipients": "1/h"}, "quotas[0].per", "mail_from"),
        ({"name": "q", "per": "user", "recipients": "1/h", "match": {"subject": "x"}},
         "quotas[0].match.subject", "unknown key"),
        ({"name": "q x", "per": "user", "recipients": "1/h"}, "quotas[0].name", "match"),
        ({"name": "q", "per": "user", "recipients": "1/h", "limit": 3}, "quotas[0].limit",
         "unknown key"),
    ],
)  # fmt: skip
def test_bad_quotas_are_config_errors(
    tmp_path: Path, quota: dict[str, object], path: str, needle: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_config_with(tmp_path, [quota]))
    issues = [i for i in caught.value.issues if i.path == path]
    assert issues and needle in issues[0].message, caught.value.issues


def test_duplicate_quota_names_are_refused(tmp_path: Path) -> None:
    quota = {"name": "q", "per": "client", "recipients": "5/m"}
    with pytest.raises(ConfigError) as caught:
        parse_config(_config_with(tmp_path, [quota, quota]))
    assert [i.path for i in caught.value.issues] == ["quotas[1].name"]


def test_rates_and_units(tmp_path: Path) -> None:
    text = _config_with(tmp_path, [
        {"name": f"q{i}", "per": "client", "recipients": rate}
        for i, rate in enumerate(["7/s", "7/m", "1000/h", "20000/D"])
    ])  # fmt: skip
    rates = [(q.recipients.count, q.recipients.window) for q in parse_config(text).quotas]
    assert rates == [(7, 1), (7, 60), (1000, 3600), (20000, 86400)]


# ---------------------------------------------------------------- end to end

QUOTAS = """
quotas:
  - name: cron-hourly
    match: {mail_from: "cron@*"}
    per: mail_from
    recipients: 3/h
routes:
  - name: default
    template_id: E_GENERIC
"""

MESSAGE = b"From: cron@example.com\r\nSubject: nightly\r\n\r\nreport\r\n"


async def test_the_fourth_recipient_gets_451_naming_the_quota(bridge, log_lines) -> None:
    async with bridge(QUOTAS) as b:
        async with b.client() as smtp:
            await smtp.ehlo()
            await smtp.mail("cron@example.com")
            for n in range(3):
                code, _ = await smtp.rcpt(f"user{n}@example.org")
                assert code == 250
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
                await smtp.rcpt("user3@example.org")
            assert refused.value.code == 451
            assert refused.value.message.startswith("4.7.1 Quota cron-hourly exceeded")
            code, _ = await smtp.data(MESSAGE)  # the three accepted ones go out
            assert code == 250
            # Another sender is not counted by it (and matches no quota).
            await smtp.mail("app@example.com")
            code, _ = await smtp.rcpt("user4@example.org")
            assert code == 250
            code, _ = await smtp.data(MESSAGE)
            assert code == 250
            # The count lives in the store: a new session of the sender is still over it.
            await smtp.mail("CRON@example.com")
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as again:
                await smtp.rcpt("user5@example.org")
            assert again.value.code == 451
        sample = b.service.metrics.registry.get_sample_value
        assert sample("smtp_bridge_quota_exceeded_total", {"quota": "cron-hourly"}) == 2
        assert sample("smtp_bridge_rcpt_rejected_total", {"reason": "quota"}) == 2
    assert sorted(r["to"] for r in b.delivered()) == [
        "user0@example.org", "user1@example.org", "user2@example.org", "user4@example.org",
    ]  # fmt: skip
    [first, _] = [line for line in log_lines() if line["event"] == "quota_exceeded"]
    assert first["quota"] == "cron-hourly" and first["key"] == "cron@example.com"
    assert first["limit"] == "3/h" and first["rcpt"] == "user3@example.org"


async def test_quota_per_client_counts_every_sender_of_the_address(bridge) -> None:
    body = QUOTAS.replace('match: {mail_from: "cron@*"}', "match: {}").replace(
        "per: mail_from", "per: client"
    )
    async with bridge(body) as b:
        async with b.client() as smtp:
            await smtp.ehlo()
            await smtp.mail("a@example.com")
            for n in range(3):
                assert (await smtp.rcpt(f"u{n}@example.org"))[0] == 250
            await smtp.rset()
            await smtp.mail("b@example.com")  # another sender, the same client
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
                await smtp.rcpt("u3@example.org")
        assert refused.value.code == 451
