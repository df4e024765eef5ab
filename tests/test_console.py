"""The operator console over HTTP (docs/README.md (the console)), and the message history behind it.

A real bridge in-process with ``admin.listen: 127.0.0.1:0`` and the sandbox as the
API; mail goes in over SMTP, the console is read with httpx. The history store
is also exercised directly (SQLite and PostgreSQL), and the recorder's promise that history
never holds mail up is tested by blocking its write until the client has its
reply. The browser tests are in test_browser.py.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TEST_KEY, RunningBridge
from test_quotas import open_backend

from smtp_bridge.config import ConfigError, parse_config
from smtp_bridge.store.history import History, HistoryAttempt, HistoryMessage
from smtp_bridge.store.sqlite import SQLiteStore

WAIT = 10.0

ADMIN = 'admin: {listen: "127.0.0.1:0"}\n'
ROUTES = """
routes:
  - name: shop
    match: {rcpt: "*@example.org"}
    template_id: "E_SHOP"
    data: {subject: "{{ subject }}"}
"""
QUEUE = ADMIN + "delivery: {mode: queue, backoff: [50ms]}\n" + ROUTES
HOSTILE = "<img src=x onerror=alert(1)>"


def message(subject: str = "Your order", message_id: str = "<order-1@shop.example>") -> str:
    return (
        f"From: Shop <shop@example.com>\r\nTo: bob@example.org\r\nSubject: {subject}\r\n"
        f"Message-ID: {message_id}\r\n\r\nThanks.\r\n"
    )


def queue_id_of(text: str) -> str:
    return text.rsplit(" id=", 1)[1]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=WAIT, follow_redirects=False) as client:
        yield client


def base(b: RunningBridge) -> str:
    return f"http://{b.service.admin_address}"


async def settled(b: RunningBridge) -> None:
    """The history written: what the recorder buffered is in the store."""
    assert b.service.history is not None
    await b.service.history.flush()


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found, html
    return found.group(1)


# ---------------------------------------------------------------- the store's history role


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_history_store_search_page_activity_and_trim(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    store = await open_backend(backend, request, tmp_path)
    assert isinstance(store, History)
    try:
        messages = [
            HistoryMessage("Q1", 1000.0, "app@example.com", ("bob@example.org",), "Reset 100%",
                           "<a@x>"),
            HistoryMessage("Q2", 1060.0, "crm@example.com", ("Carol@Example.org", "dan@x.org"),
                           "Invoice", "<b@x>"),
        ]  # fmt: skip
        attempts = [
            HistoryAttempt("Q2", "Carol@Example.org", 1061.0, "shop", "E1", "api_error", 40007,
                           200, state="retrying", reply="451 4.3.2 x"),
            HistoryAttempt("Q2", "Carol@Example.org", 1070.0, "shop", "E1", "ok", 200, 200,
                           state="delivered", reply="250 2.0.0 Ok", request='{"app_key":"***"}'),
            HistoryAttempt("Q1", "bob@example.org", 1001.0, state="failed", reply="550 5.7.1 x"),
        ]  # fmt: skip
        await store.record_history(messages, attempts)

        newest = await store.search_history()
        assert [e.message.queue_id for e in newest] == ["Q2", "Q1"]
        assert newest[0].latest["Carol@Example.org"].state == "delivered"  # the latest attempt
        assert newest[0].message.rcpts == ("Carol@Example.org", "dan@x.org")

        async def found(query: str) -> list[str]:
            return [e.message.queue_id for e in await store.search_history(query)]

        assert await found("Q1") == ["Q1"]  # queue id
        assert await found("carol@example") == ["Q2"]  # recipient, any case
        assert await found("CRM@") == ["Q2"]  # sender
        assert (
            await found("<a@x>") == await found("a@x") == ["Q1"]
        )  # Message-ID, with or without <>
        assert await found("invoice") == ["Q2"]  # subject
        assert await found("100%") == ["Q1"]  # a LIKE wildcard is searched for as itself
        assert await found("%") == ["Q1"]
        assert await found("nothing") == []
        assert [e.message.queue_id for e in await store.search_history(before=1060.0)] == ["Q1"]

        page, tried = await store.history_message("Q2")
        assert page is not None and page.subject == "Invoice"
        assert [a.state for a in tried] == ["retrying", "delivered"]
        assert await store.history_message("NOPE") == (None, [])

        buckets = await store.history_activity(1000.0, 60.0)
        assert [(b.start, b.messages, b.delivered, b.failed) for b in buckets] == [
            (1000.0, 1, 0, 0),  # a decision without a call is not an API answer
            (1060.0, 1, 1, 1),
        ]

        # Recording a message again replaces its row (the reply became known later).
        await store.record_history([HistoryMessage("Q1", 1000.0, "app@example.com", (),
                                                   reply="250 ok")], [])  # fmt: skip
        page, _ = await store.history_message("Q1")
        assert page is not None and page.reply == "250 ok"

        assert await store.trim_history(1030.0) == 2  # Q1's message and its attempt
        assert await found("") == ["Q2"]
        assert await store.trim_history(1065.0) == 2  # Q2's message and its first attempt
        _, tried = await store.history_message("Q2")
        assert [a.state for a in tried] == ["delivered"]
    finally:
        await store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_history_batch_naming_a_message_twice_keeps_its_later_row(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    store = await open_backend(backend, request, tmp_path)
    assert isinstance(store, History)
    try:
        await store.record_history(
            [
                HistoryMessage("Q3", 900.0, "a@x", ("b@x",), reply="451 4.3.2 first"),
                HistoryMessage("Q3", 900.0, "a@x", ("b@x",), reply="250 2.0.0 then"),
            ],
            [
                HistoryAttempt("Q3", "b@x", 901.0, state="retrying"),
                HistoryAttempt("Q3", "b@x", 901.0, state="delivered"),
            ],  # fmt: skip
        )
        page, tried = await store.history_message("Q3")
        assert page is not None and page.reply == "250 2.0.0 then"
        assert [a.state for a in tried] == ["retrying", "delivered"]  # in the order given
        # More rows than one statement carries: all of them, in order.
        many = [HistoryAttempt("Q4", f"r{i}@x", 902.0 + i) for i in range(1100)]
        await store.record_history([HistoryMessage("Q4", 902.0, "a@x", ("b@x",))], many)
        _, tried = await store.history_message("Q4")
        assert [a.rcpt for a in tried] == [a.rcpt for a in many]
    finally:
        await store.close()


# ---------------------------------------------------------------- config


def test_admin_token_required_off_loopback_and_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config('admin: {listen: "0.0.0.0:9025"}\n' + ROUTES, filename="c.yaml")
    assert "admin.token" in str(caught.value.issues[0])
    for listen in ("127.0.0.1:9025", "[::1]:9025", "localhost:9025"):
        parse_config(f'admin: {{listen: "{listen}"}}\n' + ROUTES, filename="c.yaml")
    config = parse_config(
        'admin: {listen: "0.0.0.0:9025", token: "t0ken-s3cret", history: 1h}\n' + ROUTES,
        filename="c.yaml",
    )
    assert config.admin.history == 3600.0
    assert "t0ken-s3cret" not in repr(config)
    assert parse_config("admin: {history: 0}\n" + ROUTES, filename="c").admin.history == 0


# ---------------------------------------------------------------- the pages


async def test_message_appears_with_its_outcome_request_and_reply(
    bridge: Any, http: httpx.AsyncClient
) -> None:
    async with bridge(ADMIN + ROUTES) as b:
        code, text = await b.send(message(HOSTILE), ["bob@example.org"])
        assert code == 250
        queue_id = queue_id_of(text)
        await settled(b)

        page = await http.get(base(b) + "/")
        assert page.status_code == 200
        csp = page.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "unsafe-inline" not in csp
        assert queue_id in page.text and "bob@example.org" in page.text
        assert HOSTILE not in page.text  # escaped, never markup
        assert "&lt;img src=x onerror=alert(1)&gt;" in page.text
        assert "Accepting mail" in page.text

        detail = await http.get(f"{base(b)}/messages/{queue_id}")
        assert detail.status_code == 200
        assert "E_SHOP" in detail.text and "delivered" in detail.text
        assert f"250 2.0.0 Ok id={queue_id}" in detail.text  # the client's reply
        assert "&#34;app_key&#34;: &#34;***&#34;" in detail.text  # the request, key hidden
        assert TEST_KEY not in detail.text and TEST_KEY not in page.text
        assert HOSTILE not in detail.text

        for query in (queue_id, "bob@EXAMPLE", "order-1@shop.example", "onerror"):
            found = await http.get(base(b) + "/", params={"q": query})
            assert f"/messages/{queue_id}" in found.text, query
        missing = await http.get(base(b) + "/", params={"q": "nobody@nowhere"})
        assert f"/messages/{queue_id}" not in missing.text
        assert (await http.get(f"{base(b)}/messages/NOPE")).status_code == 404

        # /healthz, /readyz and /metrics answer as before.
        assert (await http.get(base(b) + "/healthz")).text == "ok\n"
        assert (await http.get(base(b) + "/readyz")).status_code == 200
        assert "smtp_bridge_" in (await http.get(base(b) + "/metrics")).text
        css = await http.get(base(b) + "/static/console.css")
        assert css.status_code == 200 and "text/css" in css.headers["content-type"]


async def test_dead_letter_retry_from_the_console_needs_the_csrf_token(
    bridge: Any, http: httpx.AsyncClient
) -> None:
    async with bridge(QUEUE) as b:
        b.sandbox.script({"code": 40005})
        code, text = await b.send(message(), ["bob@example.org"])
        assert code == 250
        queue_id = queue_id_of(text)
        async with asyncio.timeout(WAIT):
            await b.service.worker.wait_attempts(1)
        queue = await http.get(base(b) + "/queue")
        assert queue_id in queue.text and "dead" in queue.text

        refused = await http.post(base(b) + "/queue/retry", data={"queue_id": queue_id})
        assert refused.status_code == 403
        cross = await http.post(
            base(b) + "/queue/retry",
            data={"queue_id": queue_id, "csrf": csrf_of(queue.text)},
            headers={"Origin": "http://evil.example"},
        )
        assert cross.status_code == 403
        assert len(b.sandbox.sent()) == 1  # nothing was retried

        done = await http.post(
            base(b) + "/queue/retry", data={"queue_id": queue_id, "csrf": csrf_of(queue.text)}
        )
        assert done.status_code == 303
        async with asyncio.timeout(WAIT):
            await b.service.worker.wait_attempts(2)
        assert [r["code"] for r in b.sandbox.sent()] == [200, 40005]
        await settled(b)
        detail = await http.get(f"{base(b)}/messages/{queue_id}")
        # Both attempts, each with the API's answer.
        assert detail.text.count("API answer:") == 2
        assert "code 40005" in detail.text and "code 200" in detail.text


async def test_purge_a_selection(bridge: Any, http: httpx.AsyncClient) -> None:
    async with bridge(QUEUE) as b:
        b.sandbox.script({"code": 40008, "times": 2})
        ids = []
        for n in range(2):
            code, text = await b.send(message(f"m{n}", f"<m{n}@x>"), [f"r{n}@example.org"])
            ids.append(queue_id_of(text))
        async with asyncio.timeout(WAIT):
            await b.service.worker.wait_attempts(2)
        queue = await http.get(base(b) + "/queue")
        token = csrf_of(queue.text)
        done = await http.post(base(b) + "/queue/purge", data={"csrf": token, "queue_id": [ids[0]]})
        assert done.status_code == 303 and "Purged+1" in done.headers["Location"]
        assert await b.service.store.get_message(ids[0]) is None
        assert await b.service.store.get_message(ids[1]) is not None


async def test_try_a_message_sends_nothing(bridge: Any, http: httpx.AsyncClient) -> None:
    async with bridge(ADMIN + ROUTES) as b:
        form = await http.get(base(b) + "/try")
        token = csrf_of(form.text)
        result = await http.post(
            base(b) + "/try",
            data={"csrf": token, "eml": message("Hello {{ 7*7 }}"), "rcpt": ""},
        )
        assert result.status_code == 200
        assert "shop" in result.text and "E_SHOP" in result.text
        # Content is data: the subject shows as sent, never evaluated ("Hello 49").
        assert "Hello {{ 7*7 }}" in result.text and "Hello 49" not in result.text
        assert "***" in result.text and TEST_KEY not in result.text
        upload = await http.post(
            base(b) + "/try",
            data={"csrf": token, "rcpt": "eve@elsewhere.test"},
            files={"file": ("m.eml", message().encode(), "message/rfc822")},
        )
        assert "550 5.7.1" in upload.text  # no route for that recipient
        assert b.sandbox.sent() == []


async def test_history_zero_keeps_none(bridge: Any, http: httpx.AsyncClient) -> None:
    async with bridge('admin: {listen: "127.0.0.1:0", history: 0}\n' + ROUTES) as b:
        code, text = await b.send(message(), ["bob@example.org"])
        assert code == 250
        await settled(b)
        assert await b.service.store.search_history() == []
        page = await http.get(base(b) + "/")
        assert "History is off" in page.text


async def test_a_failing_history_write_never_fails_mail(bridge: Any) -> None:
    async with bridge(ADMIN + ROUTES) as b:
        store = b.service.store

        async def broken(*args: Any) -> None:
            raise OSError("disk full")

        store.record_history = broken
        code, _ = await b.send(message(), ["bob@example.org"])
        assert code == 250
        await settled(b)
        assert b.service.history.failures >= 1


async def test_the_reply_does_not_wait_for_the_history_write(bridge: Any) -> None:
    async with bridge(ADMIN + ROUTES) as b:
        store = b.service.store
        release = asyncio.Event()
        written: list[Any] = []
        original = store.record_history

        async def held(messages: Any, attempts: Any) -> None:
            await release.wait()  # the write cannot finish until the client has its reply
            written.append(messages)
            await original(messages, attempts)

        store.record_history = held
        code, text = await b.send(message(), ["bob@example.org"])
        assert code == 250  # answered while the history write is still held
        assert written == []
        release.set()
        await settled(b)
        assert any(m.queue_id == queue_id_of(text) for batch in written for m in batch)


# ---------------------------------------------------------------- who may look


async def test_token_bearer_or_basic_required_when_set(
    bridge: Any, http: httpx.AsyncClient
) -> None:
    body = 'admin: {listen: "127.0.0.1:0", token: "console-t0ken"}\n' + ROUTES
    async with bridge(body) as b:
        for path in ("/", "/queue", "/metrics", "/readyz"):
            refused = await http.get(base(b) + path)
            assert refused.status_code == 401, path
            assert refused.headers["WWW-Authenticate"].startswith("Basic")
        wrong = await http.get(base(b) + "/", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        bearer = await http.get(base(b) + "/", headers={"Authorization": "Bearer console-t0ken"})
        assert bearer.status_code == 200
        basic = base64.b64encode(b"ops:console-t0ken").decode()
        page = await http.get(base(b) + "/", headers={"Authorization": f"Basic {basic}"})
        assert page.status_code == 200 and "console-t0ken" not in page.text


async def test_without_a_token_a_dns_name_is_refused(bridge: Any, http: httpx.AsyncClient) -> None:
    async with bridge(ADMIN + ROUTES) as b:
        rebound = await http.get(base(b) + "/", headers={"Host": "evil.example:9025"})
        assert rebound.status_code == 421
        local = await http.get(base(b) + "/", headers={"Host": "localhost"})
        assert local.status_code == 200


# ---------------------------------------------------------------- retention


async def test_the_recorder_trims_to_the_retention(tmp_path: Path) -> None:
    from smtp_bridge.history import HistoryRecorder

    now = [10_000.0]
    store = await SQLiteStore.open(tmp_path / "state.sqlite3")
    try:
        await store.record_history(
            [
                HistoryMessage("OLD", 10_000.0 - 7200, "a@x", ("b@x",)),
                HistoryMessage("NEW", 10_000.0 - 60, "a@x", ("b@x",)),
            ],
            [HistoryAttempt("OLD", "b@x", 10_000.0 - 7200, state="delivered")],
        )
        recorder = HistoryRecorder(store, retention=3600.0, clock=lambda: now[0])
        assert await recorder.trim() == 2
        assert [e.message.queue_id for e in await store.search_history()] == ["NEW"]
        recorder.retention = 0  # admin.history: 0 (a reload) keeps none
        assert await recorder.trim() == 1
        assert await store.search_history() == []
    finally:
        await store.close()


async def test_a_store_of_the_version_before_gains_the_history_tables(tmp_path: Path) -> None:
    import contextlib
    import sqlite3

    from smtp_bridge.store.sqlite.schema import MIGRATIONS, SCHEMA_VERSION

    # The version just before the migration that adds the history tables (later
    # migrations, such as quotas', come after it).
    before = next(
        i for i, step in enumerate(MIGRATIONS) if any("history_messages" in s for s in step)
    )
    assert before < SCHEMA_VERSION
    path = tmp_path / "state.sqlite3"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        for statements in MIGRATIONS[:before]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {before}")
        conn.execute(
            "INSERT INTO messages (queue_id, message_key, mail_from, client, user, subject,"
            " size, received_at, mode) VALUES ('Q1', 'k', 'a@x', '', '', 's', 1, 1.0, 'queue')"
        )
    store = await SQLiteStore.open(path)
    try:
        assert (await store.get_message("Q1")) is not None  # kept
        await store.record_history([HistoryMessage("Q1", 1.0, "a@x", ("b@x",))], [])
        assert [e.message.queue_id for e in await store.search_history()] == ["Q1"]
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
