"""The AOTsend-compatible sandbox: validation, records, fault scripts."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from smtp_bridge.sandbox import MESSAGES, Sandbox, run_sandbox

KEY = "secret-key-0123456789"
VALID = {"app_key": KEY, "template_id": "E_1001", "to": "jack@example.com"}


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    sb = Sandbox()
    await sb.start()
    try:
        yield sb
    finally:
        await sb.stop()


@pytest.fixture
async def strict() -> AsyncIterator[Sandbox]:
    sb = Sandbox(app_key=KEY, templates={"E_1001", "E_1002"})
    await sb.start()
    try:
        yield sb
    finally:
        await sb.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        yield client


async def post_form(http: httpx.AsyncClient, sb: Sandbox, fields: dict[str, Any]) -> int:
    response = await http.post(sb.url, data=fields)
    assert response.status_code == 200
    doc = response.json()
    assert doc["message"] == MESSAGES[doc["code"]]
    code: int = doc["code"]
    return code


async def post_json(http: httpx.AsyncClient, sb: Sandbox, fields: dict[str, Any]) -> int:
    response = await http.post(sb.url, json=fields)
    assert response.status_code == 200
    code: int = response.json()["code"]
    return code


async def sent(http: httpx.AsyncClient, sb: Sandbox, **params: str) -> list[dict[str, Any]]:
    response = await http.get(f"{sb.base_url}/_sent", params=params)
    assert response.status_code == 200
    records: list[dict[str, Any]] = response.json()
    return records


async def script(http: httpx.AsyncClient, sb: Sandbox, doc: object) -> httpx.Response:
    return await http.post(f"{sb.base_url}/_script", json=doc)


# --- validation ----------------------------------------------------------------------


def test_url_requires_start() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        _ = Sandbox().url


async def test_url_and_healthz(sandbox: Sandbox, http: httpx.AsyncClient) -> None:
    assert sandbox.url.startswith("http://127.0.0.1:")
    assert sandbox.url.endswith("/index/api/send_email")
    response = await http.get(f"{sandbox.base_url}/healthz")
    assert (response.status_code, response.text) == (200, "ok")


async def test_valid_request(sandbox: Sandbox, http: httpx.AsyncClient) -> None:
    fields = {**VALID, "data": json.dumps({"name": "Jack"}), "alias": "Shop", "is_random": "1"}
    assert await post_form(http, sandbox, fields) == 200


# Each row breaks one more rule than the row below it, so the expected code proves
# the real API's order: key, key match, template, recipient, its format, reply_to, data.
ORDER = [
    (
        "40001-empty-key",
        {"app_key": "", "template_id": "", "to": "", "reply_to": "x", "data": "["},
        40001,
    ),
    (
        "40002-wrong-key",
        {"app_key": "wrong", "template_id": "", "to": "", "reply_to": "x", "data": "["},
        40002,
    ),
    (
        "40003-empty-template",
        {"app_key": KEY, "template_id": "", "to": "", "reply_to": "x", "data": "["},
        40003,
    ),
    (
        "40003-unknown-template",
        {"app_key": KEY, "template_id": "E_9", "to": "", "reply_to": "x", "data": "["},
        40003,
    ),
    (
        "40004-empty-to",
        {"app_key": KEY, "template_id": "E_1001", "to": "", "reply_to": "x", "data": "["},
        40004,
    ),
    (
        "40005-bad-to",
        {"app_key": KEY, "template_id": "E_1001", "to": "bad", "reply_to": "x", "data": "["},
        40005,
    ),
    ("40006-bad-reply-to", {**VALID, "reply_to": "x", "data": "["}, 40006),
    ("40008-bad-data", {**VALID, "reply_to": "help@example.com", "data": "["}, 40008),
    ("40008-data-array", {**VALID, "data": "[1, 2]"}, 40008),
    ("40008-data-string", {**VALID, "data": '"text"'}, 40008),
    ("40008-is-random", {**VALID, "is_random": "2"}, 40008),
    ("200-all-good", {**VALID, "reply_to": "help@example.com", "data": "{}"}, 200),
]


@pytest.mark.parametrize(("fields", "code"), [r[1:] for r in ORDER], ids=[r[0] for r in ORDER])
async def test_validation_order(
    strict: Sandbox, http: httpx.AsyncClient, fields: dict[str, str], code: int
) -> None:
    assert await post_form(http, strict, fields) == code
    assert strict.sent()[0]["code"] == code


@pytest.mark.parametrize(
    "to",
    [
        "Jack <jack@example.com>",
        "jack@example.com, jill@example.com",
        "jack@@example.com",
        "jack@example",
        "jack@exa mple.com",
        "jack@-example.com",
        "jack@example..com",
        ".jack@example.com",
        "jack@example.com>",
        '"jack"@example.com',
        "jack@1.2.3.4",
        "@example.com",
    ],
)
async def test_recipient_must_be_one_bare_address(
    sandbox: Sandbox, http: httpx.AsyncClient, to: str
) -> None:
    assert await post_form(http, sandbox, {**VALID, "to": to}) == 40005


@pytest.mark.parametrize(
    "to",
    ["jack@example.com", "j.a+ck@mail.example.co.uk", "JACK@EXAMPLE.COM", "jörg@bücher.de"],
)
async def test_plain_addresses_pass(sandbox: Sandbox, http: httpx.AsyncClient, to: str) -> None:
    assert await post_form(http, sandbox, {**VALID, "to": to}) == 200


async def test_any_key_and_template_by_default(sandbox: Sandbox, http: httpx.AsyncClient) -> None:
    fields = {"app_key": "whatever", "template_id": "ANY", "to": "a@example.com"}
    assert await post_form(http, sandbox, fields) == 200


async def test_json_encoding(strict: Sandbox, http: httpx.AsyncClient) -> None:
    assert await post_json(http, strict, {**VALID, "data": {"code": "123456"}}) == 200
    assert await post_json(http, strict, {**VALID, "is_random": 1}) == 200
    # In JSON, data must be an object, not a string holding one.
    assert await post_json(http, strict, {**VALID, "data": '{"code": "1"}'}) == 40008
    assert await post_json(http, strict, {**VALID, "is_random": True}) == 40008
    assert await post_json(http, strict, {**VALID, "to": ["a@example.com"]}) == 40005
    # An unreadable JSON body has no fields at all.
    response = await http.post(
        strict.url, content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert response.json()["code"] == 40001
    record = strict.sent()[-1]
    assert record["encoding"] == "json"
    assert record["data"] == {"code": "123456"}


# --- records -------------------------------------------------------------------------


async def test_sent_newest_first_with_key_fingerprint(
    sandbox: Sandbox, http: httpx.AsyncClient
) -> None:
    for n in range(3):
        fields = {**VALID, "to": f"u{n}@example.com", "data": json.dumps({"n": n})}
        assert await post_form(http, sandbox, fields) == 200
    records = await sent(http, sandbox)
    assert [r["to"] for r in records] == ["u2@example.com", "u1@example.com", "u0@example.com"]
    assert records == sandbox.sent()
    first = records[0]
    assert first["data"] == {"n": 2}
    assert first["code"] == 200
    assert first["encoding"] == "form"
    assert first["template_id"] == "E_1001"
    assert first["key"] == hashlib.sha256(KEY.encode()).hexdigest()[:12]
    assert {"id", "time", "alias", "reply_to", "is_random"} <= first.keys()
    assert KEY not in json.dumps(records)


async def test_sent_filter_and_clear(sandbox: Sandbox, http: httpx.AsyncClient) -> None:
    await post_form(http, sandbox, {**VALID, "to": "a@example.com"})
    await post_form(http, sandbox, {**VALID, "to": "b@example.com"})
    only = await sent(http, sandbox, to="A@Example.com")
    assert [r["to"] for r in only] == ["a@example.com"]
    response = await http.delete(f"{sandbox.base_url}/_sent")
    assert response.json() == {"deleted": 2}
    assert await sent(http, sandbox) == []


async def test_keep_bounds_the_records(http: httpx.AsyncClient) -> None:
    async with Sandbox(keep=2) as sb:
        for n in range(4):
            await post_form(http, sb, {**VALID, "to": f"u{n}@example.com"})
        assert [r["to"] for r in sb.sent()] == ["u3@example.com", "u2@example.com"]


async def test_rejected_requests_are_recorded_too(strict: Sandbox, http: httpx.AsyncClient) -> None:
    await post_form(http, strict, {**VALID, "app_key": "wrong-key"})
    record = strict.sent()[0]
    assert record["code"] == 40002
    assert record["key"] == hashlib.sha256(b"wrong-key").hexdigest()[:12]


# --- scripts -------------------------------------------------------------------------


async def test_script_fifo_and_times(sandbox: Sandbox, http: httpx.AsyncClient) -> None:
    response = await script(
        http, sandbox, [{"code": 40007, "times": 2}, {"code": 40002, "message": "custom"}]
    )
    assert response.json() == {"scripted": 2, "pending": 2}
    codes = [await post_json(http, sandbox, VALID) for _ in range(4)]
    assert codes == [40007, 40007, 40002, 200]
    assert [r["code"] for r in sandbox.sent()] == [200, 40002, 40007, 40007]


async def test_script_message(sandbox: Sandbox, http: httpx.AsyncClient) -> None:
    await script(http, sandbox, {"code": 40002, "message": "custom"})
    response = await http.post(sandbox.url, data=VALID)
    assert response.json() == {"code": 40002, "message": "custom"}


async def test_script_to_matching(sandbox: Sandbox, http: httpx.AsyncClient) -> None:
    await script(http, sandbox, [{"to": "Bob@Example.com", "code": 40005}, {"code": 40008}])
    # alice skips bob's entry and takes the catch-all behind it.
    assert await post_form(http, sandbox, {**VALID, "to": "alice@example.com"}) == 40008
    assert await post_form(http, sandbox, {**VALID, "to": "alice@example.com"}) == 200
    assert await post_form(http, sandbox, {**VALID, "to": "bob@example.com"}) == 40005
    assert await post_form(http, sandbox, {**VALID, "to": "bob@example.com"}) == 200


async def test_script_status_with_headers_and_body(
    sandbox: Sandbox, http: httpx.AsyncClient
) -> None:
    await script(
        http,
        sandbox,
        [
            {"status": 429, "headers": {"Retry-After": "7"}, "body": "slow down"},
            {"status": 200, "body": "<html>proxy</html>"},
        ],
    )
    response = await http.post(sandbox.url, data=VALID)
    assert (response.status_code, response.headers["Retry-After"], response.text) == (
        429,
        "7",
        "slow down",
    )
    response = await http.post(sandbox.url, data=VALID)
    assert (response.status_code, response.text) == (200, "<html>proxy</html>")
    assert [r["code"] for r in sandbox.sent()] == [None, None]


async def test_script_reset_drops_the_connection(sandbox: Sandbox, http: httpx.AsyncClient) -> None:
    await script(http, sandbox, {"action": "reset"})
    with pytest.raises(httpx.TransportError):
        await http.post(sandbox.url, data=VALID)
    # The request was read and recorded before the reset.
    assert sandbox.sent()[0]["to"] == VALID["to"]
    assert sandbox.sent()[0]["code"] is None


async def test_script_hang_until_client_leaves(sandbox: Sandbox, http: httpx.AsyncClient) -> None:
    await script(http, sandbox, {"action": "hang"})
    with pytest.raises(httpx.ReadTimeout):
        await http.post(sandbox.url, data=VALID, timeout=0.3)
    assert await post_form(http, sandbox, VALID) == 200


async def test_hang_is_released_by_stop(http: httpx.AsyncClient) -> None:
    sb = Sandbox()
    await sb.start()
    sb.script({"action": "hang"})
    started = time.perf_counter()
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            call = asyncio.create_task(client.post(sb.url, data=VALID))
            await sb.wait_sent(1)  # recorded as the hang begins
            await sb.stop()
            with pytest.raises(httpx.TransportError):
                await call
    finally:
        await sb.stop()
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize(
    "doc",
    [
        {"times": 1},
        {"code": 40007, "status": 500},
        {"code": "40007"},
        {"status": 99},
        {"action": "explode"},
        {"code": 40007, "times": 0},
        {"code": 40007, "to": 5},
        {"code": 40007, "colour": "red"},
        {"status": 500, "headers": {"Retry-After": 5}},
        [{"code": 40007}, "nope"],
    ],
    ids=[
        "no-behaviour",
        "two-behaviours",
        "code-string",
        "bad-status",
        "bad-action",
        "zero-times",
        "bad-to",
        "unknown-field",
        "header-not-string",
        "list-with-junk",
    ],
)
async def test_bad_script(sandbox: Sandbox, http: httpx.AsyncClient, doc: object) -> None:
    response = await script(http, sandbox, doc)
    assert response.status_code == 400
    assert response.json()["error"]
    # Nothing of a rejected batch is queued.
    assert await post_form(http, sandbox, VALID) == 200


async def test_delete_script(sandbox: Sandbox, http: httpx.AsyncClient) -> None:
    await script(http, sandbox, {"code": 40007, "times": 5})
    response = await http.delete(f"{sandbox.base_url}/_script")
    assert response.json() == {"deleted": 1}
    assert await post_form(http, sandbox, VALID) == 200


# --- latency and the CLI entry point -------------------------------------------------


def test_latency_defaults_to_zero() -> None:
    assert inspect.signature(Sandbox).parameters["latency"].default == 0.0
    assert Sandbox().latency == 0.0


async def test_latency_delays_answers(http: httpx.AsyncClient) -> None:
    async with Sandbox(latency=0.2) as sb:
        started = time.perf_counter()
        assert await post_form(http, sb, VALID) == 200
        assert time.perf_counter() - started >= 0.2


class _UrlCatcher(logging.Handler):
    """Hands the URL of the sandbox's start line to the test, without polling."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.url: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        if not self.url.done() and isinstance(record.args, tuple) and record.args:
            self.url.set_result(str(record.args[0]))


async def test_run_sandbox_logs_url_and_serves(http: httpx.AsyncClient) -> None:
    catcher = _UrlCatcher()
    logger = logging.getLogger("smtp_bridge.sandbox")
    logger.addHandler(catcher)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    task = asyncio.create_task(
        run_sandbox("127.0.0.1", 0, app_key=KEY, templates=["E_1001"], latency=0.0)
    )
    try:
        url = await asyncio.wait_for(catcher.url, 10)
        assert url.startswith("http://127.0.0.1:")
        assert url.endswith("/index/api/send_email")
        response = await http.post(url, data=VALID)
        assert response.json()["code"] == 200
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        logger.removeHandler(catcher)
        logger.setLevel(old_level)
    assert len(catcher.lines) == 1
    assert KEY not in catcher.lines[0]
