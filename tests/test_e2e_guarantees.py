"""docs/guarantees.md end to end: multi-recipient replies, no duplicates on client retry, no lost
calls when the client goes away, and no secrets in replies or logs.

Every test speaks SMTP to the real daemon, which calls the real sandbox API; the
sandbox counts what it received, so "sent once" is checked where it matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import json
from collections import Counter
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from smtp_raw import data_reply, split_id

from smtp_bridge import replies
from smtp_bridge.auth import hash_password
from smtp_bridge.config import Config
from smtp_bridge.outcomes import RecipientState
from smtp_bridge.replies import Reply
from smtp_bridge.sandbox import Sandbox, fingerprint
from smtp_bridge.store import STATE_FILE, RecipientRecord
from smtp_bridge.store.sqlite import SQLiteStore as Store

A, B, C = "alice@example.org", "bob@example.org", "carol@example.org"
ROUTES = """
routes:
  - name: default
    template_id: "E_GENERIC"
    data: {subject: "{{ subject }}", body: "{{ text }}"}
"""
S = RecipientState


def with_routes(yaml_text: str) -> str:
    """Config text plus the default route (a body given to ``bridge`` replaces its routes)."""
    return yaml_text + "\n" + ROUTES


def make_message(
    message_id: str | None = "<g1@example.com>",
    subject: str = "Your order",
    body: str = "Thanks for your order.",
    headers: dict[str, str] | None = None,
) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Shop <shop@example.com>"
    msg["To"] = "customers@example.org"
    msg["Subject"] = subject
    if message_id is not None:
        msg["Message-ID"] = message_id
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(body)
    return msg.as_bytes(policy=email.policy.SMTP)  # CRLF line ends, as on the wire


def assert_reply(line: str, expected: Reply) -> str:
    reply, qid = split_id(line)
    assert reply == str(expected), line
    return qid


async def states(b: Any, qid: str) -> dict[str, RecipientState]:
    stored = await b.service.store.get_message(qid)
    assert stored is not None, f"queue id {qid} not recorded"
    return {r.rcpt: r.state for r in stored[1]}


def requests_per_rcpt(sandbox: Sandbox) -> Counter[str]:
    return Counter(r["to"].lower() for r in sandbox.sent())


def events(log_lines: Any, name: str) -> list[dict[str, Any]]:
    return [e for e in log_lines() if e["event"] == name]


# --- multi-recipient replies in direct mode ------------------------------------------------


async def test_all_delivered_is_250(bridge: Any) -> None:
    async with bridge() as b:
        qid = assert_reply(await data_reply(b, make_message(), [A, B, C]), replies.OK)
        assert await states(b, qid) == {A: S.DELIVERED, B: S.DELIVERED, C: S.DELIVERED}
    assert requests_per_rcpt(b.sandbox) == {A: 1, B: 1, C: 1}


@pytest.mark.parametrize(
    ("script", "expected", "state"),
    [
        pytest.param({"code": 40003}, replies.CONFIG_ERROR, S.RETRYING, id="40003"),
        pytest.param({"status": 503}, replies.UPSTREAM_UNAVAILABLE, S.RETRYING, id="http-503"),
        pytest.param({"action": "reset"}, replies.OUTCOME_UNKNOWN, S.UNKNOWN, id="reset"),
    ],
)
async def test_one_transient_failure_is_that_4xx(
    bridge: Any, script: dict[str, Any], expected: Reply, state: RecipientState
) -> None:
    async with bridge() as b:
        b.sandbox.script({**script, "to": B})
        qid = assert_reply(await data_reply(b, make_message(), [A, B, C]), expected)
        assert await states(b, qid) == {A: S.DELIVERED, B: state, C: S.DELIVERED}


async def test_transient_beats_permanent_and_delivered(bridge: Any) -> None:
    async with bridge() as b:
        b.sandbox.script({"code": 40005, "to": A}, {"status": 502, "to": B})
        qid = assert_reply(
            await data_reply(b, make_message(), [A, B, C]), replies.UPSTREAM_UNAVAILABLE
        )
        recorded = await states(b, qid)
    assert recorded[B] is S.RETRYING
    assert recorded[C] is S.DELIVERED
    assert recorded[A] in (S.FAILED, S.DEAD)


async def test_only_permanent_failures_is_that_5xx(bridge: Any) -> None:
    async with bridge() as b:
        b.sandbox.script({"code": 40005, "to": A}, {"code": 40005, "to": B})
        qid = assert_reply(await data_reply(b, make_message(), [A, B]), replies.BAD_RECIPIENT)
        assert await states(b, qid) == {A: S.FAILED, B: S.FAILED}


async def test_mixed_permanent_failures_answer_one_of_them(bridge: Any) -> None:
    async with bridge() as b:
        b.sandbox.script({"code": 40005, "to": A}, {"status": 413, "to": B})
        line = await data_reply(b, make_message(), [A, B])
        reply, qid = split_id(line)
        assert reply in (str(replies.BAD_RECIPIENT), str(replies.TOO_LARGE))
        assert await states(b, qid) == {A: S.FAILED, B: S.FAILED}


async def test_permanent_beside_delivered_is_250_and_dead_letter(
    bridge: Any, log_lines: Any, tmp_path: Path
) -> None:
    async with bridge() as b:
        b.sandbox.script({"code": 40005, "to": B})
        qid = assert_reply(await data_reply(b, make_message(), [A, B]), replies.OK)
        assert await states(b, qid) == {A: S.DELIVERED, B: S.DEAD}
        dead = await b.service.store.list_recipients(states=[S.DEAD])
        assert [(r.queue_id, r.rcpt) for r in dead] == [(qid, B)]
        assert dead[0].api_code == 40005
        assert dead[0].reply == str(replies.BAD_RECIPIENT)
    lines = events(log_lines, "dead_letter")
    assert [(e["rcpt"], e["queue_id"], e["level"]) for e in lines] == [(B, qid, "warning")]
    # Durable: the dead letter is on disk for `smtp-bridge queue` after the daemon stopped.
    store = await Store.open(tmp_path / "state" / STATE_FILE)
    try:
        on_disk: list[RecipientRecord] = await store.list_recipients(states=[S.DEAD])
    finally:
        await store.close()
    assert [(r.queue_id, r.rcpt) for r in on_disk] == [(qid, B)]


# --- no duplicates on client retry --------------------------------------------------------


def _retry_pair(kind: str) -> tuple[bytes, bytes]:
    """The first attempt and the client's retry of the same message, identified by ``kind``."""
    if kind == "message-id":
        return make_message("<retry@example.com>"), make_message("<retry@example.com>")
    if kind == "content-hash":
        return make_message(None), make_message(None)
    assert kind == "idempotency-key"
    # Same key, everything else different: the key alone identifies the message.
    first = make_message("<try-1@example.com>", headers={"Idempotency-Key": "order-4711"})
    retry = make_message("<try-2@example.com>", body="Thanks for your order!",
                         headers={"Idempotency-Key": "order-4711"})  # fmt: skip
    return first, retry


@pytest.mark.parametrize("kind", ["message-id", "content-hash", "idempotency-key"])
@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        pytest.param({"status": 503}, replies.UPSTREAM_UNAVAILABLE, id="http-503"),
        pytest.param({"code": 40003}, replies.CONFIG_ERROR, id="40003"),
    ],
)
async def test_retry_after_partial_failure_sends_only_the_rest(
    bridge: Any, log_lines: Any, kind: str, failure: dict[str, Any], expected: Reply
) -> None:
    first, retry = _retry_pair(kind)
    async with bridge() as b:
        b.sandbox.script({**failure, "to": C})
        qid1 = assert_reply(await data_reply(b, first, [A, B, C]), expected)
        assert requests_per_rcpt(b.sandbox) == {A: 1, B: 1, C: 1}
        qid2 = assert_reply(await data_reply(b, retry, [A, B, C]), replies.OK)
        assert qid2 != qid1
        assert await states(b, qid2) == {A: S.DUPLICATE, B: S.DUPLICATE, C: S.DELIVERED}
    assert requests_per_rcpt(b.sandbox) == {A: 1, B: 1, C: 2}
    assert Counter(r["to"] for r in b.delivered()) == {A: 1, B: 1, C: 1}
    skipped = events(log_lines, "duplicate_skipped")
    assert sorted((e["rcpt"], e["queue_id"]) for e in skipped) == [(A, qid2), (B, qid2)]


async def test_content_hash_ignores_line_end_style(bridge: Any) -> None:
    # "Same content" is the SHA-256 with line ends normalised to CRLF: a client that
    # retries with bare LF (normalised by smtp.bare_lf) is the same message.
    crlf = make_message(None)
    # Bare LF everywhere but the last line: DATA ends only at CRLF.CRLF.
    lf = crlf.replace(b"\r\n", b"\n")[:-1] + b"\r\n"
    assert lf.count(b"\r") == 1
    async with bridge() as b:
        b.sandbox.script({"status": 503, "to": B})
        assert_reply(await data_reply(b, crlf, [A, B]), replies.UPSTREAM_UNAVAILABLE)
        assert_reply(await raw_send(b, lf, [A, B]), replies.OK)
    assert requests_per_rcpt(b.sandbox) == {A: 1, B: 2}


async def test_dedup_compares_recipients_lower_cased(bridge: Any) -> None:
    message = make_message("<case@example.com>")
    async with bridge() as b:
        b.sandbox.script({"status": 503, "to": C})
        assert_reply(await data_reply(b, message, ["Alice@Example.ORG", C]),
                     replies.UPSTREAM_UNAVAILABLE)  # fmt: skip
        assert_reply(await data_reply(b, message, ["alice@example.org", "CAROL@example.ORG"]),
                     replies.OK)  # fmt: skip
    assert requests_per_rcpt(b.sandbox) == {A: 1, C: 2}


async def test_delivered_message_resent_in_full_sends_nothing(bridge: Any) -> None:
    message = make_message("<twice@example.com>")
    async with bridge() as b:
        assert_reply(await data_reply(b, message, [A, B]), replies.OK)
        # The reply says why nothing was sent; this copy's record says it too.
        qid = assert_reply(await data_reply(b, message, [A, B]), replies.ALREADY_DELIVERED)
        assert await states(b, qid) == {A: S.DUPLICATE, B: S.DUPLICATE}
    assert requests_per_rcpt(b.sandbox) == {A: 1, B: 1}


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(make_message("<one@example.com>"), make_message("<two@example.com>"),
                     id="different-message-id"),
        pytest.param(make_message(None, body="First."), make_message(None, body="Second."),
                     id="different-content"),
        pytest.param(make_message(headers={"Idempotency-Key": "k-1"}),
                     make_message(headers={"Idempotency-Key": "k-2"}),
                     id="different-idempotency-key"),
    ],
)  # fmt: skip
async def test_a_different_message_is_not_deduplicated(
    bridge: Any, first: bytes, second: bytes
) -> None:
    async with bridge() as b:
        assert_reply(await data_reply(b, first, [A]), replies.OK)
        assert_reply(await data_reply(b, second, [A]), replies.OK)
    assert len(b.delivered(to=A)) == 2


async def test_same_message_to_another_recipient_is_sent(bridge: Any) -> None:
    message = make_message("<fanout@example.com>")
    async with bridge() as b:
        assert_reply(await data_reply(b, message, [A]), replies.OK)
        assert_reply(await data_reply(b, message, [A, B]), replies.OK)
    assert requests_per_rcpt(b.sandbox) == {A: 1, B: 1}


@pytest.mark.parametrize("action", ["hang", "reset"])
async def test_unknown_outcome_is_sent_again_as_possible_duplicate(
    bridge: Any, log_lines: Any, action: str
) -> None:
    message = make_message("<unknown@example.com>")
    async with bridge(with_routes("api: {timeout: 0.5s}")) as b:
        b.sandbox.script({"action": action, "to": B})
        qid1 = assert_reply(await data_reply(b, message, [A, B]), replies.OUTCOME_UNKNOWN)
        assert await states(b, qid1) == {A: S.DELIVERED, B: S.UNKNOWN}
        unknown = await b.service.store.list_recipients(states=[S.UNKNOWN])
        assert [(r.queue_id, r.rcpt) for r in unknown] == [(qid1, B)]
        # At-least-once: the retry sends B again and says it may be a duplicate.
        qid2 = assert_reply(await data_reply(b, message, [A, B]), replies.OK)
        assert await states(b, qid2) == {A: S.DUPLICATE, B: S.DELIVERED}
        # Now delivered: a further retry sends nothing.
        assert_reply(await data_reply(b, message, [A, B]), replies.ALREADY_DELIVERED)
    assert requests_per_rcpt(b.sandbox) == {A: 1, B: 2}
    warnings = events(log_lines, "possible_duplicate")
    assert [(e["rcpt"], e["queue_id"], e["level"]) for e in warnings] == [(B, qid2, "warning")]


# --- a client that goes away mid-delivery ---------------------------------------------------


async def _read_reply(reader: asyncio.StreamReader) -> str:
    """One (possibly multi-line) SMTP reply; returns its last line."""
    while True:
        line = (await reader.readline()).decode()
        assert line, "connection closed before a reply"
        if line[3:4] != "-":
            return line.rstrip("\r\n")


async def _command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str,
                   code: str) -> str:  # fmt: skip
    writer.write(line.encode() + b"\r\n")
    await writer.drain()
    reply = await _read_reply(reader)
    assert reply.startswith(code), (line, reply)
    return reply


async def _open_transaction(b: Any, rcpts: list[str]) -> tuple[asyncio.StreamReader,
                                                                asyncio.StreamWriter]:  # fmt: skip
    """A raw SMTP session up to the 354 of DATA."""
    reader, writer = await asyncio.open_connection(b.host, b.port)
    assert (await _read_reply(reader)).startswith("220")
    await _command(reader, writer, "EHLO client.test", "250")
    await _command(reader, writer, "MAIL FROM:<app@example.com>", "250")
    for rcpt in rcpts:
        await _command(reader, writer, f"RCPT TO:<{rcpt}>", "250")
    await _command(reader, writer, "DATA", "354")
    return reader, writer


def _dot_stuffed(message: bytes) -> bytes:
    lines = message.split(b"\n")
    body = b"\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    return body if body.endswith(b"\n") else body + b"\r\n"


async def raw_send(b: Any, message: bytes, rcpts: list[str]) -> str:
    """Send ``message`` bytes exactly as given (aiosmtplib would rewrite line ends)."""
    reader, writer = await _open_transaction(b, rcpts)
    try:
        writer.write(_dot_stuffed(message) + b".\r\n")
        await writer.drain()
        reply = await _read_reply(reader)
        writer.write(b"QUIT\r\n")
        await writer.drain()
        await _read_reply(reader)
    finally:
        writer.close()
        await writer.wait_closed()
    return reply


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_client_disconnect_mid_delivery_does_not_cancel_api_calls(
    bridge: Any, log_lines: Any, how: str
) -> None:
    message = make_message("<gone@example.com>")
    # Every API answer takes a while: the client is gone before the first one.
    async with Sandbox(latency=0.5) as slow, bridge(api_url=slow.url) as b:
        reader, writer = await _open_transaction(b, [A, B])
        writer.write(_dot_stuffed(message) + b".\r\n")
        await writer.drain()
        await slow.wait_sent(2)  # both calls are at the API, unanswered
        assert len(b.service._deliveries) == 1
        (task,) = b.service._deliveries
        if how == "abort":
            writer.transport.abort()  # RST
        else:
            writer.close()  # FIN
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        # The delivery finishes on its own and records what the API said.
        outcomes = await asyncio.wait_for(asyncio.shield(task), 10)
        assert not task.cancelled()
        assert {o.rcpt: o.state for o in outcomes} == {A: S.DELIVERED, B: S.DELIVERED}
        delivered = await b.service.store.list_recipients(states=[S.DELIVERED])
        assert sorted(r.rcpt for r in delivered) == [A, B]
        # The client retries (it never saw a reply): nothing is sent again.
        line = await data_reply(b, message, [A, B])
        qid = assert_reply(line, replies.ALREADY_DELIVERED)
        assert await states(b, qid) == {A: S.DUPLICATE, B: S.DUPLICATE}
        assert Counter(r["to"] for r in slow.sent()) == {A: 1, B: 1}
        assert all(r["code"] == 200 for r in slow.sent())
    calls = events(log_lines, "api_call")
    assert sorted((e["rcpt"], e["state"]) for e in calls) == [(A, "delivered"), (B, "delivered")]
    # The client really was gone before the API answered.
    names = [e["event"] for e in log_lines()]
    assert names.index("disconnect") < names.index("api_call")


# --- secrets --------------------------------------------------------------------------------

SECRET = "sk-live-E2E-distinctive-9f4c2a7d1b3e"


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(None, id="40002-from-sandbox-validation"),
        pytest.param({"code": 40002}, id="40002-scripted"),
        pytest.param({"code": 40002, "message": f"key {SECRET} is not valid"},
                     id="40002-message-echoes-key"),
        pytest.param({"status": 401}, id="http-401"),
        pytest.param({"status": 401, "body": f"bad key {SECRET}"}, id="http-401-echoes-key"),
        pytest.param({"status": 200, "body": f"<html>app_key={SECRET}</html>"},
                     id="proxy-page-echoes-key"),
        pytest.param({"action": "reset"}, id="reset"),
    ],
)  # fmt: skip
async def test_api_key_never_in_replies_logs_or_repr(
    bridge: Any, log_lines: Any, failure: dict[str, Any] | None
) -> None:
    config_text = with_routes(f"api: {{app_key: {SECRET}}}")
    async with Sandbox(app_key=None if failure else "the-real-key") as api:
        if failure is not None:
            api.script(failure)
        async with bridge(config_text, api_url=api.url) as b:
            line = await data_reply(b, make_message(), [A])
            _, qid = split_id(line)
            assert not line.startswith("2")
            config: Config = b.service.runtime.config
            shown = [repr(config), str(config), repr(config.api), str(config.api),
                     repr(b.service.api), repr(b.service)]  # fmt: skip
            recorded = await b.service.store.list_recipients()
            stored = await b.service.store.get_message(qid)
        # The key really was used (the check below is not vacuous) ...
        assert [r["key"] for r in api.sent()] == [fingerprint(SECRET)]
    # ... and it is nowhere else.
    assert SECRET not in line
    assert SECRET not in log_lines.text()
    assert log_lines(), "no log lines captured"
    for text in shown:
        assert SECRET not in text
    assert SECRET not in repr(recorded)
    assert SECRET not in repr(stored)


@pytest.mark.parametrize(
    ("script", "expected_requests", "reply", "retried"),
    [
        pytest.param(None, {A: 1, B: 1}, replies.ALREADY_DELIVERED,
                     {A: S.DUPLICATE, B: S.DUPLICATE}, id="first-attempt-delivers"),
        pytest.param({"status": 503, "to": B}, {A: 1, B: 2}, replies.OK,
                     {A: S.DUPLICATE, B: S.DELIVERED}, id="first-attempt-fails-for-one"),
    ],
)  # fmt: skip
async def test_retry_while_first_attempt_in_flight_waits_for_it(
    bridge: Any,
    script: dict[str, Any] | None,
    expected_requests: dict[str, int],
    reply: Reply,
    retried: dict[str, S],
) -> None:
    # A client that gave up on a slow DATA reply and retries at once must not
    # duplicate the calls its first attempt still has in flight.
    message = make_message("<impatient@example.com>")
    async with Sandbox(latency=0.5) as slow, bridge(api_url=slow.url) as b:
        if script is not None:
            slow.script(script)
        reader, writer = await _open_transaction(b, [A, B])
        writer.write(_dot_stuffed(message) + b".\r\n")
        await writer.drain()
        await slow.wait_sent(2)
        (first,) = b.service._deliveries
        writer.transport.abort()
        assert not first.done()
        qid = assert_reply(await data_reply(b, message, [A, B]), reply)
        assert first.done()
        assert await states(b, qid) == retried
    assert requests_per_rcpt(slow) == expected_requests
    assert Counter(r["to"] for r in slow.sent() if r["code"] == 200) == {A: 1, B: 1}


@pytest.mark.parametrize(
    "rcpts",
    [
        pytest.param([A, A], id="same-address-twice"),
        pytest.param([A, "Alice@Example.ORG", B], id="same-address-other-case"),
    ],
)
async def test_recipient_listed_twice_gets_one_call(bridge: Any, rcpts: list[str]) -> None:
    async with bridge() as b:
        qid = assert_reply(await data_reply(b, make_message("<twice-listed@example.com>"), rcpts),
                           replies.OK)  # fmt: skip
        recorded = await states(b, qid)
    assert requests_per_rcpt(b.sandbox) == {r.lower(): 1 for r in rcpts}
    assert {r.lower() for r in recorded} == {r.lower() for r in rcpts}
    assert set(recorded.values()) == {S.DELIVERED}


async def test_per_user_api_key_and_password_never_in_replies_logs_or_repr(
    bridge: Any, log_lines: Any
) -> None:
    user_key = "sk-user-E2E-crm-only-5d8e0b6a2c"
    password = "pw-E2E-never-logged-31f7"
    password_hash = hash_password(password)
    users = {"crm": {"password_hash": password_hash, "app_key": user_key}}
    config_text = with_routes(f"smtp: {json.dumps({'auth': {'users': users}})}")
    async with Sandbox(app_key="the-real-key") as api, bridge(config_text, api_url=api.url) as b:
        async with b.client() as smtp:
            await smtp.ehlo()
            await smtp.login("crm", password)
            await smtp.mail("app@example.com")
            await smtp.rcpt(A)
            with pytest.raises(aiosmtplib.SMTPDataError) as failed:
                await smtp.data(make_message())
        line = f"{failed.value.code} {failed.value.message}"
        config: Config = b.service.runtime.config
        shown = [repr(config), str(config), repr(config.smtp), repr(config.smtp.auth)]
    assert_reply(line, replies.CONFIG_ERROR)
    # The user's own key was the one sent (40002 from the sandbox's own check).
    assert [(r["key"], r["code"]) for r in api.sent()] == [(fingerprint(user_key), 40002)]
    for secret in (user_key, password, password_hash):
        assert secret not in line
        assert secret not in log_lines.text()
        for text in shown:
            assert secret not in text
