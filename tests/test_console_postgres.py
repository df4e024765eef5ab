"""The operator console on a PostgreSQL store: one history for every instance.

Real daemons in-process (``admin.listen: 127.0.0.1:0``) on one throwaway
PostgreSQL database (tests/pg.py), real SMTP, the sandbox as the API; the
console is read with httpx.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from test_console import ADMIN, ROUTES, WAIT, base, message, queue_id_of, settled

from smtp_bridge.store.history import History, HistoryMessage


def on_postgres(url: str) -> str:
    return ADMIN + f"delivery: {{store: {json.dumps(url)}}}\n" + ROUTES


async def test_the_console_lists_mail_received_on_a_postgres_store(
    bridge: Any, pg_url: str
) -> None:
    async with bridge(on_postgres(pg_url)) as b, httpx.AsyncClient(timeout=WAIT) as http:
        assert isinstance(b.service.store, History)
        assert b.service.history is not None  # the recorder runs on this store
        code, text = await b.send(message("Postgres order"), ["bob@example.org"])
        assert code == 250, text
        queue_id = queue_id_of(text)
        await settled(b)

        listed = await http.get(base(b) + "/")
        assert listed.status_code == 200
        assert f"/messages/{queue_id}" in listed.text and "Postgres order" in listed.text
        found = await http.get(base(b) + "/", params={"q": queue_id})
        assert f"/messages/{queue_id}" in found.text
        missing = await http.get(base(b) + "/", params={"q": "nobody@nowhere"})
        assert f"/messages/{queue_id}" not in missing.text

        detail = await http.get(f"{base(b)}/messages/{queue_id}")
        assert detail.status_code == 200
        assert "E_SHOP" in detail.text and "delivered" in detail.text
        assert f"250 2.0.0 Ok id={queue_id}" in detail.text


async def test_two_instances_on_one_database_show_each_others_mail(
    bridge: Any, pg_url: str
) -> None:
    async with (
        bridge(on_postgres(pg_url)) as first,
        bridge(on_postgres(pg_url)) as second,
        httpx.AsyncClient(timeout=WAIT) as http,
    ):
        code, text = await first.send(message("Via first", "<one@app>"), ["bob@example.org"])
        assert code == 250, text
        via_first = queue_id_of(text)
        code, text = await second.send(message("Via second", "<two@app>"), ["bob@example.org"])
        assert code == 250, text
        via_second = queue_id_of(text)
        await settled(first)
        await settled(second)

        for b in (first, second):
            listed = await http.get(base(b) + "/")
            assert listed.status_code == 200
            for queue_id in (via_first, via_second):
                assert f"/messages/{queue_id}" in listed.text, (base(b), queue_id)
            # The other instance's message opens here too, with its outcome.
            other = via_second if b is first else via_first
            detail = await http.get(f"{base(b)}/messages/{other}")
            assert detail.status_code == 200
            assert f"250 2.0.0 Ok id={other}" in detail.text


async def test_a_database_of_the_version_before_gains_the_history_tables(pg_url: str) -> None:
    import psycopg

    from smtp_bridge.store.postgres import PostgresStore
    from smtp_bridge.store.postgres.schema import MIGRATIONS, SCHEMA_VERSION

    before = next(
        i for i, step in enumerate(MIGRATIONS) if any("history_messages" in s for s in step)
    )
    assert before == 2  # the third migration, for good: migrations are only ever appended
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for statements in MIGRATIONS[:before]:
            for statement in statements:
                conn.execute(statement)  # type: ignore[arg-type]
        conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (before,))
        conn.execute(
            'INSERT INTO messages (queue_id, message_key, mail_from, client, "user", subject,'
            " size, received_at, mode) VALUES ('Q1', 'k', 'a@x', '', '', 's', 1, 1.0, 'queue')"
        )
    store = await PostgresStore.open(pg_url)
    try:
        assert (await store.get_message("Q1")) is not None  # kept
        await store.record_history([HistoryMessage("Q1", 1.0, "a@x", ("b@x",))], [])
        assert [e.message.queue_id for e in await store.search_history()] == ["Q1"]
    finally:
        await store.close()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
