"""docs/replies.md: every API result, through a real SMTP session, to its exact reply.

SMTP client (aiosmtplib) -> the daemon -> the sandbox API, which is scripted to give
each answer of the table. Replies are compared with the constants of
``smtp_bridge.replies`` and, beside them, with the code and enhanced status the
docs/replies.md names, so a wrong constant fails as well as a wrong mapping.
"""

from __future__ import annotations

import email.policy
import json
import re
import socket
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest
from smtp_raw import data_reply, split_id

from smtp_bridge import replies
from smtp_bridge.outcomes import RecipientState
from smtp_bridge.replies import Reply
from smtp_bridge.sandbox import Sandbox

RCPT = "bob@example.org"
DEFAULT_ROUTES_TEXT = """
routes:
  - name: default
    template_id: "E_GENERIC"
    data: {subject: "{{ subject }}", body: "{{ text }}"}
"""
ROUTES_WITH_REPLY_TO = """
routes:
  - name: with-reply-to
    template_id: "E_GENERIC"
    reply_to: "support@example.com"
    data: {subject: "{{ subject }}"}
"""
# Class names and texts an exception could leak into a reply.
_LEAK_RE = re.compile(
    r"Traceback|Exception|[A-Z][A-Za-z]*Error\b|aiohttp|httpx|sqlite|jinja|"
    r"division|Undefined|is undefined|Errno|refused|\bFile \"",
)


def with_routes(yaml_text: str) -> str:
    """Config text plus the default route (a body given to ``bridge`` replaces its routes)."""
    return yaml_text + "\n" + DEFAULT_ROUTES_TEXT


def make_message(subject: str = "Hello", message_id: str | None = "<r1@example.com>") -> bytes:
    msg = EmailMessage()
    msg["From"] = "Shop <shop@example.com>"
    msg["To"] = RCPT
    msg["Subject"] = subject
    if message_id is not None:
        msg["Message-ID"] = message_id
    msg.set_content("Hi there")
    return msg.as_bytes(policy=email.policy.SMTP)


async def send(b: Any, message: bytes, rcpts: list[str] | None = None) -> str:
    """One message to ``rcpts`` (default one recipient); the whole DATA reply line."""
    return await data_reply(b, message, rcpts or [RCPT])


def assert_no_leak(line: str) -> None:
    assert not _LEAK_RE.search(line), f"reply leaks internals: {line!r}"


async def check_reply(b: Any, line: str, expected: Reply, code: int, status: str) -> str:
    """The reply is ``expected`` (which is ``code status``) with the id of a stored record."""
    assert (expected.code, expected.status) == (code, status), (
        "constant disagrees with docs/replies.md"
    )
    reply, qid = split_id(line)
    assert reply == str(expected)
    assert line == expected.with_id(qid)
    assert_no_leak(line)
    stored = await b.service.store.get_message(qid)
    assert stored is not None, f"queue id {qid} not in the state store"
    return qid


async def recipient_state(b: Any, qid: str, rcpt: str = RCPT) -> RecipientState:
    stored = await b.service.store.get_message(qid)
    assert stored is not None
    _, recipients = stored
    (record,) = [r for r in recipients if r.rcpt == rcpt]
    return record.state


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local port bound but not listening: a connection attempt is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# --- the table, one scripted sandbox answer per row ------------------------------------

S = RecipientState
# (script for the sandbox, or None for its own answer; reply; code; status; recorded state)
ROWS: list[Any] = [
    pytest.param(None, replies.OK, 250, "2.0.0", S.DELIVERED, id="200"),
    pytest.param({"code": 40001}, replies.CONFIG_ERROR, 451, "4.3.5", S.RETRYING, id="40001"),
    pytest.param({"code": 40002}, replies.CONFIG_ERROR, 451, "4.3.5", S.RETRYING, id="40002"),
    pytest.param({"code": 40003}, replies.CONFIG_ERROR, 451, "4.3.5", S.RETRYING, id="40003"),
    pytest.param({"code": 40004}, replies.INTERNAL, 451, "4.3.0", S.RETRYING, id="40004"),
    pytest.param({"code": 40005}, replies.BAD_RECIPIENT, 550, "5.1.3", S.FAILED, id="40005"),
    pytest.param({"code": 40007}, replies.BALANCE, 451, "4.3.2", S.RETRYING, id="40007"),
    pytest.param({"code": 40008}, replies.DATA_FORMAT, 554, "5.6.0", S.FAILED, id="40008"),
    pytest.param({"code": 49999}, replies.UNKNOWN_CODE, 451, "4.3.0", S.RETRYING,
                 id="unknown-code-49999"),
    pytest.param({"code": 0}, replies.UNKNOWN_CODE, 451, "4.3.0", S.RETRYING,
                 id="unknown-code-0"),
    pytest.param({"code": 500}, replies.UNKNOWN_CODE, 451, "4.3.0", S.RETRYING,
                 id="unknown-code-500-in-json"),
    pytest.param({"action": "reset"}, replies.OUTCOME_UNKNOWN, 451, "4.4.2", S.UNKNOWN,
                 id="reset-after-sending"),
    pytest.param({"status": 429, "headers": {"Retry-After": "7"}}, replies.THROTTLED, 451,
                 "4.4.5", S.RETRYING, id="http-429"),
    pytest.param({"status": 429}, replies.THROTTLED, 451, "4.4.5", S.RETRYING,
                 id="http-429-without-retry-after"),
    pytest.param({"status": 502}, replies.UPSTREAM_UNAVAILABLE, 451, "4.4.1", S.RETRYING,
                 id="http-502"),
    pytest.param({"status": 503, "body": "<html>maintenance</html>"},
                 replies.UPSTREAM_UNAVAILABLE, 451, "4.4.1", S.RETRYING, id="http-503"),
    pytest.param({"status": 504}, replies.UPSTREAM_UNAVAILABLE, 451, "4.4.1", S.RETRYING,
                 id="http-504"),
    pytest.param({"status": 401}, replies.HTTP_CONFIG_ERROR, 451, "4.3.5", S.RETRYING,
                 id="http-401"),
    pytest.param({"status": 403}, replies.HTTP_CONFIG_ERROR, 451, "4.3.5", S.RETRYING,
                 id="http-403"),
    pytest.param({"status": 404, "body": "Not Found"}, replies.HTTP_CONFIG_ERROR, 451,
                 "4.3.5", S.RETRYING, id="http-404"),
    pytest.param({"status": 413}, replies.TOO_LARGE, 552, "5.3.4", S.FAILED, id="http-413"),
    pytest.param({"status": 500, "body": '{"code": 200, "message": "ok"}'},
                 replies.UNKNOWN_CODE, 451, "4.3.0", S.RETRYING, id="http-500"),
    pytest.param({"status": 418}, replies.UNKNOWN_CODE, 451, "4.3.0", S.RETRYING,
                 id="http-418-other-status"),
    pytest.param({"status": 301, "headers": {"Location": "http://127.0.0.1:9/elsewhere"}},
                 replies.UNKNOWN_CODE, 451, "4.3.0", S.RETRYING, id="http-301-not-followed"),
    pytest.param({"status": 200, "body": "<html>proxy</html>"}, replies.UNKNOWN_CODE, 451,
                 "4.3.0", S.RETRYING, id="http-200-html-body"),
    pytest.param({"status": 200, "body": ""}, replies.UNKNOWN_CODE, 451, "4.3.0", S.RETRYING,
                 id="http-200-empty-body"),
    pytest.param({"status": 200, "body": '{"ok": true}'}, replies.UNKNOWN_CODE, 451, "4.3.0",
                 S.RETRYING, id="http-200-json-without-code"),
    pytest.param({"status": 200, "body": '{"code": "200"}'}, replies.UNKNOWN_CODE, 451, "4.3.0",
                 S.RETRYING, id="http-200-code-as-string"),
    pytest.param({"status": 200, "body": "[200]"}, replies.UNKNOWN_CODE, 451, "4.3.0",
                 S.RETRYING, id="http-200-json-array"),
]  # fmt: skip


@pytest.mark.parametrize(("script", "expected", "code", "status", "state"), ROWS)
async def test_api_result_maps_to_reply(
    bridge: Any, script: dict[str, Any] | None, expected: Reply, code: int, status: str,
    state: RecipientState,
) -> None:  # fmt: skip
    async with bridge() as b:
        if script is not None:
            b.sandbox.script(script)
        line = await send(b, make_message())
        qid = await check_reply(b, line, expected, code, status)
        assert await recipient_state(b, qid) is state
    # Exactly one API call: no hidden retry, no redirect followed.
    assert len(b.sandbox.sent()) == 1
    assert b.sandbox.sent()[0]["to"] == RCPT


async def test_timeout_after_sending_is_outcome_unknown(bridge: Any, log_lines: Any) -> None:
    async with bridge(with_routes("api: {timeout: 0.5s}")) as b:
        b.sandbox.script({"action": "hang"})
        line = await send(b, make_message())
        qid = await check_reply(b, line, replies.OUTCOME_UNKNOWN, 451, "4.4.2")
        assert await recipient_state(b, qid) is RecipientState.UNKNOWN
    assert len(b.sandbox.sent()) == 1
    calls = [e for e in log_lines() if e["event"] == "api_call"]
    assert [(e["result"], e["state"]) for e in calls] == [("unknown", "unknown")]


# --- the sandbox's own validation (no script) -------------------------------------------


@pytest.mark.parametrize(
    ("sandbox_kwargs", "body", "api_code"),
    [
        pytest.param({}, 'api: {app_key: ""}', 40001, id="40001-no-key-configured"),
        pytest.param({"app_key": "the-right-key"}, "", 40002, id="40002-wrong-key"),
        pytest.param({"templates": ["E_OTHER"]}, "", 40003, id="40003-unknown-template"),
    ],
)
async def test_config_errors_from_sandbox_validation(
    bridge: Any, sandbox_kwargs: dict[str, Any], body: str, api_code: int
) -> None:
    async with Sandbox(**sandbox_kwargs) as strict:
        async with bridge(with_routes(body), api_url=strict.url) as b:
            line = await send(b, make_message())
            qid = await check_reply(b, line, replies.CONFIG_ERROR, 451, "4.3.5")
            assert await recipient_state(b, qid) is RecipientState.RETRYING
        assert [r["code"] for r in strict.sent()] == [api_code]
    # 535 is about the client's own login, never the bridge's key (the queue id
    # is hex and may contain the digits, so compare the reply code itself).
    assert not line.startswith("535")


# --- never sent ------------------------------------------------------------------------


async def test_connection_refused_is_never_sent(bridge: Any, closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}/index/api/send_email"
    async with bridge(api_url=url) as b:
        line = await send(b, make_message())
        qid = await check_reply(b, line, replies.NEVER_SENT, 451, "4.4.1")
        assert await recipient_state(b, qid) is RecipientState.RETRYING


async def test_tls_failure_is_never_sent(bridge: Any, sandbox: Sandbox) -> None:
    # https:// to the sandbox's plain-HTTP port: the TLS handshake fails, nothing is sent.
    url = sandbox.url.replace("http://", "https://", 1)
    async with bridge(api_url=url) as b:
        line = await send(b, make_message())
        qid = await check_reply(b, line, replies.NEVER_SENT, 451, "4.4.1")
        assert await recipient_state(b, qid) is RecipientState.RETRYING
    assert sandbox.sent() == []


async def test_dns_failure_is_never_sent(bridge: Any) -> None:
    # .invalid never resolves (RFC 6761 6.4); without a resolver the deadline hits
    # before any connection, which is "never sent" too.
    url = "http://api.smtp-bridge-test.invalid/index/api/send_email"
    async with bridge(with_routes("api: {timeout: 2s}"), api_url=url) as b:
        line = await send(b, make_message())
        qid = await check_reply(b, line, replies.NEVER_SENT, 451, "4.4.1")
        assert await recipient_state(b, qid) is RecipientState.RETRYING


# --- 40006: resend once without reply_to -----------------------------------------------


async def test_40006_from_sandbox_validation_resends_without_reply_to(
    bridge: Any, log_lines: Any
) -> None:
    routes = ROUTES_WITH_REPLY_TO.replace("support@example.com", "not an address")
    async with bridge(routes) as b:
        line = await send(b, make_message())
        qid = await check_reply(b, line, replies.OK, 250, "2.0.0")
        assert await recipient_state(b, qid) is RecipientState.DELIVERED
    second, first = b.sandbox.sent()
    assert (first["code"], first["reply_to"]) == (40006, "not an address")
    assert (second["code"], second["reply_to"]) == (200, None)
    assert first["to"] == second["to"] == RCPT
    assert first["data"] == second["data"]
    warnings = [e for e in log_lines() if e["event"] == "reply_to_rejected"]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["route"] == "with-reply-to"
    assert warnings[0]["queue_id"] == qid


async def test_40006_scripted_then_200(bridge: Any, log_lines: Any) -> None:
    async with bridge(ROUTES_WITH_REPLY_TO) as b:
        b.sandbox.script({"code": 40006})
        line = await send(b, make_message())
        await check_reply(b, line, replies.OK, 250, "2.0.0")
    second, first = b.sandbox.sent()
    assert (first["code"], first["reply_to"]) == (40006, "support@example.com")
    assert (second["code"], second["reply_to"]) == (200, None)
    assert [e["level"] for e in log_lines() if e["event"] == "reply_to_rejected"] == ["warning"]


@pytest.mark.parametrize(
    ("second", "expected", "code", "status"),
    [
        pytest.param({"code": 40007}, replies.BALANCE, 451, "4.3.2", id="then-40007"),
        pytest.param({"code": 40005}, replies.BAD_RECIPIENT, 550, "5.1.3", id="then-40005"),
        pytest.param({"code": 40008}, replies.DATA_FORMAT, 554, "5.6.0", id="then-40008"),
        pytest.param({"code": 40006}, replies.REPLY_TO_REJECTED, 451, "4.3.0", id="then-40006"),
        pytest.param({"status": 502}, replies.UPSTREAM_UNAVAILABLE, 451, "4.4.1",
                     id="then-http-502"),
        pytest.param({"action": "reset"}, replies.OUTCOME_UNKNOWN, 451, "4.4.2",
                     id="then-reset"),
    ],
)  # fmt: skip
async def test_40006_resend_result_decides(
    bridge: Any, log_lines: Any, second: dict[str, Any], expected: Reply, code: int, status: str
) -> None:
    async with bridge(ROUTES_WITH_REPLY_TO) as b:
        b.sandbox.script({"code": 40006}, second)
        line = await send(b, make_message())
        await check_reply(b, line, expected, code, status)
    # Resent once, not twice: exactly two requests.
    resend, first = b.sandbox.sent()
    assert first["reply_to"] == "support@example.com"
    assert resend["reply_to"] is None
    assert [e["level"] for e in log_lines() if e["event"] == "reply_to_rejected"] == ["warning"]


async def test_40006_without_reply_to_is_not_resent(bridge: Any) -> None:
    async with bridge() as b:
        b.sandbox.script({"code": 40006})
        line = await send(b, make_message())
        await check_reply(b, line, replies.REPLY_TO_REJECTED, 451, "4.3.0")
    assert len(b.sandbox.sent()) == 1


# --- operator overrides -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "script"),
    [
        pytest.param("40007", "451 4.3.2 Provider balance exhausted, try again later",
                     {"code": 40007}, id="40007"),
        pytest.param("40005", "550 5.1.1 No such user at the provider", {"code": 40005},
                     id="40005"),
        pytest.param("http:429", "450 4.7.1 Slow down please", {"status": 429}, id="http-429"),
        pytest.param("unknown", "451 4.4.7 Provider did not confirm, retry later",
                     {"action": "reset"}, id="unknown-outcome"),
        pytest.param("bad_body", "451 4.3.0 Proxy page instead of the API",
                     {"status": 200, "body": "<html>proxy</html>"}, id="bad-body"),
        pytest.param("200", "250 2.6.0 Handed to the email API", None, id="200"),
    ],
)  # fmt: skip
async def test_reply_override_changes_the_reply(
    bridge: Any, key: str, value: str, script: dict[str, Any] | None
) -> None:
    async with bridge(with_routes(f'replies: {{"{key}": "{value}"}}')) as b:
        if script is not None:
            b.sandbox.script(script)
        line = await send(b, make_message())
        reply, qid = split_id(line)
        assert reply == value
        assert line == Reply.parse(value).with_id(qid)


async def test_reply_override_leaves_other_rows_alone(bridge: Any) -> None:
    async with bridge(
        with_routes('replies: {"40007": "451 4.3.2 Provider balance exhausted"}')
    ) as b:
        b.sandbox.script({"code": 40003})
        line = await send(b, make_message())
        await check_reply(b, line, replies.CONFIG_ERROR, 451, "4.3.5")
        line = await send(b, make_message(message_id="<r2@example.com>"))
        await check_reply(b, line, replies.OK, 250, "2.0.0")


# --- templates that fail to render ------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "template"),
    [
        pytest.param("data", "{{ 1/0 }}", id="data-division-by-zero"),
        pytest.param("data", "{{ no_such_function() }}", id="data-undefined-function"),
        pytest.param("data", "{{ subject | regex_search('(') }}", id="data-bad-regex"),
        pytest.param("data", "{{ subject.__class__.__mro__[1].__subclasses__() }}",
                     id="data-sandbox-escape"),
        pytest.param("template_id", "{{ 1/0 }}", id="template-id"),
        pytest.param("alias", "{{ no_such_function() }}", id="alias"),
        pytest.param("reply_to", "{{ 1/0 }}", id="reply-to"),
    ],
)  # fmt: skip
async def test_template_failure_is_451_435_and_logged_with_route(
    bridge: Any, log_lines: Any, field: str, template: str
) -> None:
    route: dict[str, Any] = {"name": "broken-route", "template_id": "E_GENERIC",
                             "data": {"subject": "{{ subject }}"}}  # fmt: skip
    if field == "data":
        route["data"]["x"] = template
    else:
        route[field] = template
    async with bridge(json.dumps({"routes": [route]})) as b:
        line = await send(b, make_message())
        qid = await check_reply(b, line, replies.TEMPLATE_FAILED, 451, "4.3.5")
        assert await recipient_state(b, qid) is RecipientState.RETRYING
    assert b.sandbox.sent() == []  # nothing half-rendered reaches the API
    failures = [e for e in log_lines() if e["event"] == "template_failed"]
    assert len(failures) == 1
    assert failures[0]["route"] == "broken-route"
    assert failures[0]["queue_id"] == qid
    assert failures[0]["level"] == "error"


async def test_subject_with_template_syntax_is_data_not_code(bridge: Any) -> None:
    async with bridge() as b:
        line = await send(b, make_message(subject="{{ 1/0 }} {{ 7*7 }}"))
        await check_reply(b, line, replies.OK, 250, "2.0.0")
    assert b.delivered()[0]["data"]["subject"] == "{{ 1/0 }} {{ 7*7 }}"


# --- every DATA reply carries its own queue id -------------------------------------------


async def test_each_data_reply_has_a_distinct_queue_id(bridge: Any) -> None:
    async with bridge() as b:
        # A 4xx that does not open the circuit breaker (40007 would: the next
        # MAIL FROM would then be refused before any DATA reply).
        b.sandbox.script({"code": 40003})
        ids = set()
        for n in range(3):
            line = await send(b, make_message(message_id=f"<distinct-{n}@example.com>"))
            ids.add(split_id(line)[1])
    assert len(ids) == 3


async def test_json_encoding_maps_the_same(bridge: Any) -> None:
    routes = ROUTES_WITH_REPLY_TO.replace("support@example.com", "not an address")
    async with bridge("api: {encoding: json}\n" + routes) as b:
        await check_reply(b, await send(b, make_message()), replies.OK, 250, "2.0.0")
        b.sandbox.script({"code": 40008})
        line = await send(b, make_message(message_id="<j2@example.com>"))
        await check_reply(b, line, replies.DATA_FORMAT, 554, "5.6.0")
    encodings = [(r["encoding"], r["code"], r["reply_to"]) for r in reversed(b.sandbox.sent())]
    assert encodings == [("json", 40006, "not an address"), ("json", 200, None),
                         ("json", 40008, "not an address")]  # fmt: skip
