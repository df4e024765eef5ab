"""End to end: routing rules, actions and the template context (docs/routing.md).

A real SMTP client (aiosmtplib, or stdlib smtplib in a thread) talks to the real
daemon, which calls the real sandbox API. Every test asserts the exact SMTP reply
(code and enhanced status, against the constants of ``smtp_bridge.replies``)
and exactly what the sandbox received.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import smtplib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from smtp_bridge import replies
from smtp_bridge.replies import Reply
from smtp_bridge.sandbox import fingerprint

DATA = Path(__file__).parent / "data"
CLIENTS = ["aiosmtplib", "smtplib"]
_message_ids = itertools.count(1)


# --- helpers ---------------------------------------------------------------------


@dataclass
class Transaction:
    """The replies of one SMTP transaction: per RCPT, and to DATA (None if not sent)."""

    rcpt: dict[str, tuple[int, str]] = field(default_factory=dict)
    data: tuple[int, str] | None = None


async def transact(
    b: Any,
    message: bytes,
    rcpts: Sequence[str],
    *,
    mail_from: str = "app@example.com",
    mail_options: Sequence[str] = (),
    client: str = "aiosmtplib",
) -> Transaction:
    """MAIL, one raw ``RCPT TO:<addr>`` per recipient, DATA if any was accepted.

    Unlike ``b.send`` this never raises on a refusal: the replies are the result.
    """
    if client == "smtplib":
        # The daemon runs on this test's loop: the blocking client runs in a thread.
        return await asyncio.to_thread(
            _smtplib_transact, b.host, b.port, message, rcpts, mail_from, mail_options
        )
    result = Transaction()
    async with b.client() as smtp:
        await smtp.ehlo()
        await smtp.mail(mail_from, options=list(mail_options))
        for rcpt in rcpts:
            answer = await smtp.execute_command(b"RCPT", f"TO:<{rcpt}>".encode())
            result.rcpt[rcpt] = (answer.code, answer.message)
        if any(code == 250 for code, _ in result.rcpt.values()):
            try:
                answer = await smtp.data(message)
            except aiosmtplib.SMTPDataError as exc:
                result.data = (exc.code, exc.message)
            else:
                result.data = (answer.code, answer.message)
    return result


def _smtplib_transact(
    host: str,
    port: int,
    message: bytes,
    rcpts: Sequence[str],
    mail_from: str,
    mail_options: Sequence[str],
) -> Transaction:
    result = Transaction()
    with smtplib.SMTP(host, port, local_hostname="client.test", timeout=30) as smtp:
        smtp.ehlo()
        code, text = smtp.mail(mail_from, list(mail_options))
        assert code == 250, (code, text)
        for rcpt in rcpts:
            code, text = smtp.docmd("RCPT", f"TO:<{rcpt}>")
            result.rcpt[rcpt] = (code, text.decode())
        if any(code == 250 for code, _ in result.rcpt.values()):
            code, text = smtp.data(message)
            result.data = (code, text.decode())
    return result


def assert_data_reply(reply: tuple[int, str] | None, expected: Reply) -> None:
    """The DATA reply is exactly ``expected`` followed by ``id=<queue id>`` (docs/replies.md)."""
    assert reply is not None, "DATA was never sent: no recipient was accepted"
    code, text = reply
    body, sep, queue_id = text.rpartition(" id=")
    assert (code, body) == (expected.code, f"{expected.status} {expected.text}"), reply
    assert sep and len(queue_id) == 17 and all(c in "0123456789ABCDEF" for c in queue_id), reply


def rcpt_reply(expected: Reply) -> tuple[int, str]:
    return expected.code, f"{expected.status} {expected.text}"


ACCEPTED = (250, "2.1.5 Ok")
_FIELDS = ("to", "template_id", "data", "alias", "reply_to", "is_random", "encoding", "code")


def received(b: Any) -> list[dict[str, Any]]:
    """Every request the sandbox API got, oldest first, as the fields docs/upstream-api.md names."""
    records = list(reversed(b.sandbox.sent()))
    key = fingerprint(b.service.runtime.config.app_key())
    assert all(r["key"] == key for r in records)
    return [{name: r[name] for name in _FIELDS} for r in records]


def by_to(b: Any) -> list[dict[str, Any]]:
    """``received`` in recipient order: calls of one message run concurrently."""
    return sorted(received(b), key=lambda r: r["to"])


def api_call(
    to: str,
    template_id: str,
    data: dict[str, Any] | None,
    *,
    alias: str | None = None,
    reply_to: str | None = None,
    is_random: str | None = None,
    encoding: str = "form",
    code: int = 200,
) -> dict[str, Any]:
    return {
        "to": to,
        "template_id": template_id,
        "data": data,
        "alias": alias,
        "reply_to": reply_to,
        "is_random": is_random,
        "encoding": encoding,
        "code": code,
    }


def make_message(
    *,
    subject: str | None = "Hello",
    body: str = "Hi there\n",
    headers: Sequence[str] = (),
    sender: str = "Shop <shop@example.com>",
    to: str = "bob@example.org",
    content_type: str = "text/plain; charset=utf-8",
    message_id: str | None = None,
) -> bytes:
    """A message with CRLF line ends; ``headers`` are extra raw header lines."""
    message_id = message_id or f"<routing-{next(_message_ids)}@example.com>"
    lines = [f"From: {sender}", f"To: {to}"]
    if subject is not None:
        lines.append(f"Subject: {subject}")
    lines += [f"Message-ID: {message_id}", *headers, "MIME-Version: 1.0"]
    lines += [f"Content-Type: {content_type}", "Content-Transfer-Encoding: 8bit", ""]
    return ("\r\n".join(lines) + "\r\n" + body.replace("\n", "\r\n")).encode()


def eml(name: str) -> bytes:
    return (DATA / name).read_bytes()


# --- match conditions ------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    match: str  # YAML flow mapping for the candidate route's ``match``
    hit: bool  # True: the candidate route matches; False: the fallback does
    rcpt: str = "bob@example.com"
    mail_from: str = "app@example.com"
    subject: str | None = "Hello"
    headers: tuple[str, ...] = ()
    body: str = "Hi there\n"


def case(id: str, match: str, hit: bool, **kwargs: Any) -> Any:
    return pytest.param(Case(match, hit, **kwargs), id=id)


ALL = (
    "{rcpt: '*@example.com', mail_from: 'app@*', client: 127.0.0.0/8, "
    "subject: 're:invoice', headers: {X-App: crm}, body: 're:total \\d+'}"
)
ALL_KW: dict[str, Any] = {
    "subject": "Invoice 7",
    "headers": ("X-App: crm",),
    "body": "Your total 42 EUR\n",
}

MATCH_CASES = [
    # rcpt: glob (whole value) and regex (searched), both case-insensitive
    case("rcpt-glob-hit", "{rcpt: '*@example.com'}", True),
    case("rcpt-glob-miss", "{rcpt: '*@example.com'}", False, rcpt="bob@example.org"),
    case("rcpt-glob-whole-value", "{rcpt: 'bob@example.com'}", False,
         rcpt="bob@example.com.evil.test"),
    case("rcpt-glob-case-insensitive", "{rcpt: '*@Example.COM'}", True, rcpt="BOB@example.com"),
    case("rcpt-glob-charclass", "{rcpt: 'user[0-9]@example.com'}", True,
         rcpt="user7@example.com"),
    case("rcpt-glob-question-mark", "{rcpt: 'b?b@example.com'}", True),
    case("rcpt-regex-searched", "{rcpt: 're:alerts'}", True, rcpt="ops-alerts@example.com"),
    case("rcpt-regex-anchored-miss", "{rcpt: 're:^alerts@'}", False,
         rcpt="ops-alerts@example.com"),
    case("rcpt-regex-case-insensitive", "{rcpt: 're:^ALERTS@'}", True,
         rcpt="alerts@example.com"),
    case("rcpt-list-any-of", "{rcpt: ['a@example.com', 're:^b@']}", True,
         rcpt="b@example.com"),
    case("rcpt-list-none", "{rcpt: ['a@example.com', 're:^b@']}", False,
         rcpt="c@example.com"),
    # mail_from
    case("mail-from-glob-hit", "{mail_from: 'cron@*'}", True, mail_from="cron@host.example.com"),
    case("mail-from-glob-case-insensitive", "{mail_from: 'cron@*'}", True,
         mail_from="CRON@Host.example.com"),
    case("mail-from-glob-miss", "{mail_from: 'cron@*'}", False),
    case("mail-from-regex", r"{mail_from: 're:@(ci|build)\.example\.com$'}", True,
         mail_from="jenkins@build.example.com"),
    case("mail-from-list-any-of", "{mail_from: ['noreply@*', 'cron@*']}", True,
         mail_from="cron@example.com"),
    case("mail-from-null-sender-miss", "{mail_from: '*@*'}", False, mail_from=""),
    # user: no AUTH here, so an unauthenticated (trusted) client has no user
    case("user-unauthenticated-miss", "{user: crm}", False),
    case("user-glob-star-unauthenticated-miss", "{user: '*'}", False),
    case("user-regex-unauthenticated-miss", "{user: 're:.*'}", False),
    # client: CIDR
    case("client-loopback-cidr-hit", "{client: 127.0.0.0/8}", True),
    case("client-other-cidr-miss", "{client: 10.0.0.0/8}", False),
    case("client-single-address-hit", "{client: 127.0.0.1}", True),
    case("client-list-any-of", "{client: [10.0.0.0/8, 127.0.0.1/32]}", True),
    case("client-ipv6-miss", "{client: '::1/128'}", False),
    # subject: decoded, glob or regex
    case("subject-glob-hit", "{subject: '*invoice*'}", True, subject="Your Invoice #12"),
    case("subject-glob-whole-value", "{subject: 'invoice'}", False, subject="Your invoice"),
    case("subject-regex-searched", "{subject: 're:reset your password'}", True,
         subject="Please RESET your password now"),
    case("subject-regex-anchored-miss", "{subject: 're:^reset'}", False,
         subject="Please reset"),
    case("subject-rfc2047-decoded", "{subject: '*Grüße*'}", True,
         subject="=?UTF-8?Q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?="),
    case("subject-list-any-of", "{subject: ['re:^invoice', '*receipt*']}", True,
         subject="Your receipt"),
    # headers: name -> pattern(s); the header must be there
    case("header-hit", "{headers: {X-App: crm}}", True, headers=("X-App: CRM",)),
    case("header-value-miss", "{headers: {X-App: crm}}", False, headers=("X-App: erp",)),
    case("header-absent-miss", "{headers: {X-App: crm}}", False),
    case("header-absent-star-miss", "{headers: {X-App: '*'}}", False),
    case("header-present-star-hit", "{headers: {X-App: '*'}}", True,
         headers=("X-App: anything",)),
    case("header-name-case-insensitive", "{headers: {x-app: crm}}", True,
         headers=("X-APP: crm",)),
    case("header-regex", r"{headers: {X-Priority: 're:^[12]\b'}}", True,
         headers=("X-Priority: 1 (Highest)",)),
    case("header-repeated-any-value", "{headers: {X-Tag: beta}}", True,
         headers=("X-Tag: alpha", "X-Tag: beta")),
    case("header-list-any-of", "{headers: {X-App: [erp, crm]}}", True,
         headers=("X-App: crm",)),
    case("header-rfc2047-decoded", "{headers: {X-Team: Zürich}}", True,
         headers=("X-Team: =?UTF-8?Q?Z=C3=BCrich?=",)),
    case("headers-all-must-hold", "{headers: {X-App: crm, X-Env: prod}}", False,
         headers=("X-App: crm",)),
    case("headers-all-hold", "{headers: {X-App: crm, X-Env: prod}}", True,
         headers=("X-App: crm", "X-Env: prod")),
    # body: the text part
    case("body-regex", r"{body: 're:order \d+'}", True, body="Your ORDER 1234 shipped\n"),
    case("body-glob-spans-lines", "{body: '*urgent*'}", True,
         body="Hello\nthis is URGENT\nbye\n"),
    case("body-miss", r"{body: 're:order \d+'}", False, body="Nothing to see\n"),
    # all conditions of a route must hold
    case("all-conditions-hold", ALL, True, **ALL_KW),
    case("all-but-rcpt", ALL, False, **{**ALL_KW, "rcpt": "bob@example.org"}),
    case("all-but-mail-from", ALL, False, **{**ALL_KW, "mail_from": "cron@example.com"}),
    case("all-but-subject", ALL, False, **{**ALL_KW, "subject": "Receipt 7"}),
    case("all-but-header", ALL, False, **{**ALL_KW, "headers": ("X-App: erp",)}),
    case("all-but-body", ALL, False, **{**ALL_KW, "body": "No sum here\n"}),
    case("all-but-client", ALL.replace("127.0.0.0/8", "10.0.0.0/8"), False, **ALL_KW),
]  # fmt: skip


@pytest.mark.parametrize("c", MATCH_CASES)
async def test_match_condition(bridge: Any, c: Case) -> None:
    config = f"""
    routes:
      - name: candidate
        match: {c.match}
        template_id: T_HIT
        data: {{route: candidate}}
      - name: fallback
        template_id: T_MISS
        data: {{route: fallback}}
    """
    message = make_message(subject=c.subject, headers=c.headers, body=c.body)
    async with bridge(config) as b:
        result = await transact(b, message, [c.rcpt], mail_from=c.mail_from)
    assert result.rcpt == {c.rcpt: ACCEPTED}
    assert_data_reply(result.data, replies.OK)
    expected = ("T_HIT", "candidate") if c.hit else ("T_MISS", "fallback")
    assert received(b) == [api_call(c.rcpt, expected[0], {"route": expected[1]})]


async def test_body_condition_matches_text_derived_from_html(bridge: Any) -> None:
    config = """
    routes:
      - name: fish
        match: {body: 're:fish & chips <large>'}
        template_id: T_FISH
      - name: fallback
        template_id: T_MISS
    """
    async with bridge(config) as b:
        result = await transact(b, eml("routing_html_only.eml"), ["bob@example.org"])
    assert_data_reply(result.data, replies.OK)
    assert received(b) == [api_call("bob@example.org", "T_FISH", {})]


async def test_first_match_wins(bridge: Any) -> None:
    config = """
    routes:
      - name: domain
        match: {rcpt: '*@example.com'}
        template_id: T_FIRST
      - name: exact-but-later
        match: {rcpt: 'bob@example.com'}
        template_id: T_SECOND
      - name: noise
        match: {subject: 're:noise'}
        action: drop
      - name: catch-all
        template_id: T_LAST
    """
    async with bridge(config) as b:
        result = await transact(b, make_message(), ["bob@example.com", "carol@example.org"])
        assert_data_reply(result.data, replies.OK)
        assert by_to(b) == [
            api_call("bob@example.com", "T_FIRST", {}),
            api_call("carol@example.org", "T_LAST", {}),
        ]
        # The drop route comes before the catch-all: it wins for carol, not for bob.
        noise = make_message(subject="noise report")
        result = await transact(b, noise, ["carol@example.org"])
        assert_data_reply(result.data, replies.DROPPED)
        result = await transact(b, noise, ["bob@example.com"])
        assert_data_reply(result.data, replies.OK)
        # One recipient dropped, one delivered: the message was delivered.
        noise = make_message(subject="noise again")
        result = await transact(b, noise, ["carol@example.org", "dave@example.com"])
        assert_data_reply(result.data, replies.OK)
    assert received(b)[2:] == [
        api_call("bob@example.com", "T_FIRST", {}),
        api_call("dave@example.com", "T_FIRST", {}),
    ]


async def test_design_example_routes(bridge: Any) -> None:
    """The ``routes:`` of docs/configuration.md, verbatim, route as the contract says."""
    config = r"""
    routes:                             # first match wins
      - name: password-reset
        match:                          # all given conditions must hold
          rcpt: ["*@example.com"]       # a list means any of them
          subject: 're:reset your password'
          headers: {X-App: crm}
        template_id: "E_1001"
        alias: "{{ sender.name or 'Example' }}"
        reply_to: "support@example.com"
        is_random: false
        data:
          name: "{{ rcpt.local }}"
          link: "{{ text | regex_search('https://\\S+') }}"
      - name: otp
        match:
          subject: 're:code (?P<code>\d{6})'
        template_id: "E_1002"
        data: {code: "{{ match.code }}"}
      - name: block-noise
        match: {mail_from: "cron@*"}
        action: drop                    # relay (default) | drop | reject
      - name: default
        template_id: "E_GENERIC"
        data: {subject: "{{ subject }}", body: "{{ text }}"}
    """
    reset = make_message(
        subject="Please reset your password",
        headers=("X-App: crm",),
        sender="noreply@example.com",
        body="Click https://example.com/reset?t=abc to continue.\n",
    )
    async with bridge(config) as b:
        result = await transact(b, reset, ["jane@example.com", "joe@example.org"])
        assert_data_reply(result.data, replies.OK)
        otp = make_message(subject="Your login code 123456")
        assert_data_reply((await transact(b, otp, ["jane@example.com"])).data, replies.OK)
        noise = make_message(subject="backup finished")
        result = await transact(b, noise, ["jane@example.com"], mail_from="cron@example.com")
        assert_data_reply(result.data, replies.DROPPED)
        # otp comes before block-noise: a code from cron is still relayed.
        cron_otp = make_message(subject="Your login code 654321")
        result = await transact(b, cron_otp, ["jane@example.com"], mail_from="cron@example.com")
        assert_data_reply(result.data, replies.OK)
    sent = received(b)
    assert sorted(sent[:2], key=lambda r: r["to"]) == [
        api_call(
            "jane@example.com",
            "E_1001",
            {"name": "jane", "link": "https://example.com/reset?t=abc"},
            alias="Example",
            reply_to="support@example.com",
            is_random="0",
        ),
        # Not *@example.com: the reset route does not hold, nor otp; the default does.
        api_call(
            "joe@example.org",
            "E_GENERIC",
            {
                "subject": "Please reset your password",
                "body": "Click https://example.com/reset?t=abc to continue.\n",
            },
        ),
    ]
    assert sent[2:] == [
        api_call("jane@example.com", "E_1002", {"code": "123456"}),
        api_call("jane@example.com", "E_1002", {"code": "654321"}),
    ]


@pytest.mark.parametrize("client", CLIENTS)
async def test_null_sender_is_routed_with_an_empty_mail_from(bridge: Any, client: str) -> None:
    """Bounces come from <>: accepted, and ``mail_from`` is empty, not '<>'."""
    config = """
    routes:
      - name: from-cron
        match: {mail_from: 'cron@*'}
        template_id: E_CRON
      - name: default
        template_id: E_GENERIC
        data: {mail_from: "[{{ mail_from }}]", sender: "{{ sender.address }}"}
    """
    async with bridge(config) as b:
        message = make_message(sender="MAILER-DAEMON@example.com")
        result = await transact(b, message, ["bob@example.org"], mail_from="", client=client)
    assert result.rcpt == {"bob@example.org": ACCEPTED}
    assert_data_reply(result.data, replies.OK)
    data = {"mail_from": "[]", "sender": "MAILER-DAEMON@example.com"}
    assert received(b) == [api_call("bob@example.org", "E_GENERIC", data)]


# --- named regex groups ------------------------------------------------------------


async def test_regex_group_reaches_match(bridge: Any) -> None:
    config = r"""
    routes:
      - name: otp
        match: {subject: 're:code (?P<code>\d{6})(?: for (?P<app>\w+))?'}
        template_id: E_OTP
        data:
          code: "{{ match.code }}"
          app: "{{ match.app | default('none') }}"
    """
    async with bridge(config) as b:
        result = await transact(b, make_message(subject="Your code 123456"), ["bob@example.org"])
    assert_data_reply(result.data, replies.OK)
    assert received(b) == [api_call("bob@example.org", "E_OTP", {"code": "123456", "app": "none"})]


async def test_regex_groups_of_every_condition_are_merged(bridge: Any) -> None:
    config = r"""
    routes:
      - name: tickets
        match:
          rcpt: 're:^(?P<team>[a-z]+)-alerts@'
          mail_from: 're:@(?P<system>[a-z]+)\.example\.com$'
          subject: 're:ticket #(?P<ticket>\d+)'
          headers: {X-Severity: 're:(?P<severity>p[0-9])'}
          body: 're:host=(?P<host>[\w.-]+)'
        template_id: E_TICKET
        data:
          team: "{{ match.team }}"
          system: "{{ match.system }}"
          ticket: "{{ match.ticket }}"
          severity: "{{ match.severity }}"
          host: "{{ match.host }}"
          all: "{{ match | dictsort | map('first') | join(',') }}"
    """
    message = make_message(
        subject="New ticket #4711 opened",
        headers=("X-Severity: P1",),
        body="Alert on host=db-1.example.net\n",
    )
    async with bridge(config) as b:
        result = await transact(
            b, message, ["ops-alerts@example.com"], mail_from="noreply@jira.example.com"
        )
    assert_data_reply(result.data, replies.OK)
    data = {
        "team": "ops",
        "system": "jira",
        "ticket": "4711",
        "severity": "P1",
        "host": "db-1.example.net",
        "all": "host,severity,system,team,ticket",
    }
    assert received(b) == [api_call("ops-alerts@example.com", "E_TICKET", data)]


async def test_groups_of_a_route_that_did_not_match_do_not_leak(bridge: Any) -> None:
    config = r"""
    routes:
      - name: half-match
        match: {rcpt: 're:^(?P<leak>[^@]+)@', subject: 're:never'}
        template_id: E_NEVER
      - name: fallback
        template_id: E_FALLBACK
        data: {leak: "{{ match.leak }}", groups: "{{ match | length }}"}
    """
    async with bridge(config) as b:
        result = await transact(b, make_message(), ["bob@example.org"])
    assert_data_reply(result.data, replies.OK)
    assert received(b) == [api_call("bob@example.org", "E_FALLBACK", {"leak": "", "groups": "0"})]


# --- actions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "match",
    [
        pytest.param("{mail_from: 'cron@*'}", id="envelope-condition"),
        pytest.param("{subject: 're:^\\[cron\\]'}", id="content-condition"),
    ],
)
async def test_drop_answers_250_and_calls_nothing(bridge: Any, match: str) -> None:
    config = f"""
    routes:
      - name: noise
        match: {match}
        action: drop
      - name: never
        match: {{rcpt: 'nobody@example.invalid'}}
        template_id: E_NEVER
    """
    async with bridge(config) as b:
        result = await transact(
            b,
            make_message(subject="[cron] backup ok"),
            ["bob@example.org", "alice@example.org"],
            mail_from="cron@build.example.com",
        )
    assert result.rcpt == {"bob@example.org": ACCEPTED, "alice@example.org": ACCEPTED}
    assert_data_reply(result.data, replies.DROPPED)
    assert received(b) == []


@pytest.mark.parametrize(
    ("reply_yaml", "expected"),
    [
        pytest.param("reply: '550 5.7.1 Bulk mail is not accepted here'",
                     Reply(550, "5.7.1", "Bulk mail is not accepted here"), id="own-5xx-reply"),
        pytest.param("reply: '451 4.7.1 Try again after the maintenance'",
                     Reply(451, "4.7.1", "Try again after the maintenance"), id="own-4xx-reply"),
        pytest.param("", replies.REJECTED, id="default-reply"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("client", CLIENTS)
async def test_reject_on_content_answers_its_reply_at_data(
    bridge: Any, reply_yaml: str, expected: Reply, client: str
) -> None:
    config = f"""
    routes:
      - name: no-bulk
        match: {{subject: 're:unsubscribe'}}
        action: reject
        {reply_yaml}
      - name: default
        template_id: E_GENERIC
    """
    async with bridge(config) as b:
        message = make_message(subject="Weekly news (unsubscribe below)")
        result = await transact(b, message, ["bob@example.org"], client=client)
        assert result.rcpt == {"bob@example.org": ACCEPTED}
        assert_data_reply(result.data, expected)
        assert received(b) == []
        # The same recipient with other content takes the next route.
        result = await transact(b, make_message(), ["bob@example.org"], client=client)
        assert_data_reply(result.data, replies.OK)
    assert received(b) == [api_call("bob@example.org", "E_GENERIC", {})]


@pytest.mark.parametrize(
    ("reply_yaml", "expected"),
    [
        pytest.param("reply: '550 5.7.1 This mailbox is retired'",
                     Reply(550, "5.7.1", "This mailbox is retired"), id="own-reply"),
        pytest.param("reply: '450 4.2.1 Mailbox disabled for now'",
                     Reply(450, "4.2.1", "Mailbox disabled for now"), id="own-4xx-reply"),
        pytest.param("", replies.REJECTED, id="default-reply"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("client", CLIENTS)
async def test_reject_on_envelope_answers_at_rcpt(
    bridge: Any, reply_yaml: str, expected: Reply, client: str
) -> None:
    config = f"""
    routes:
      - name: vip
        match: {{rcpt: 'vip@old.example.com'}}
        template_id: E_VIP
      - name: retired
        match: {{rcpt: '*@old.example.com'}}
        action: reject
        {reply_yaml}
      - name: default
        template_id: E_GENERIC
    """
    rcpts = ["bob@old.example.com", "vip@old.example.com", "alice@example.org"]
    async with bridge(config) as b:
        result = await transact(b, make_message(), rcpts, client=client)
    assert result.rcpt == {
        "bob@old.example.com": rcpt_reply(expected),
        "vip@old.example.com": ACCEPTED,  # an earlier relay route wins
        "alice@example.org": ACCEPTED,
    }
    assert_data_reply(result.data, replies.OK)
    assert by_to(b) == [
        api_call("alice@example.org", "E_GENERIC", {}),
        api_call("vip@old.example.com", "E_VIP", {}),
    ]


async def test_reject_after_a_content_route_waits_for_data(bridge: Any) -> None:
    """At RCPT an earlier content route may still match: the reject is decided at DATA."""
    config = """
    routes:
      - name: urgent
        match: {rcpt: '*@example.com', subject: 're:urgent'}
        template_id: E_URGENT
      - name: everything-else
        match: {rcpt: '*@example.com'}
        action: reject
        reply: '550 5.7.1 Only urgent mail here'
    """
    async with bridge(config) as b:
        result = await transact(b, make_message(subject="URGENT: disk full"), ["ops@example.com"])
        assert result.rcpt == {"ops@example.com": ACCEPTED}
        assert_data_reply(result.data, replies.OK)
        result = await transact(b, make_message(subject="lunch?"), ["ops@example.com"])
        assert result.rcpt == {"ops@example.com": ACCEPTED}
        assert_data_reply(result.data, Reply(550, "5.7.1", "Only urgent mail here"))
    assert received(b) == [api_call("ops@example.com", "E_URGENT", {})]


@pytest.mark.parametrize("client", CLIENTS)
async def test_recipient_no_route_could_match_is_refused_at_rcpt(bridge: Any, client: str) -> None:
    config = """
    routes:
      - name: ours
        match: {rcpt: '*@example.com'}
        template_id: E_OURS
      - name: crm-only
        match: {rcpt: '*@crm.example.org', mail_from: 'crm@*'}
        template_id: E_CRM
      - name: crm-content
        match: {rcpt: '*@crm.example.org', subject: 're:crm'}
        template_id: E_CRM
    """
    rcpts = ["bob@example.org", "bob@example.com", "bob@crm.example.org"]
    async with bridge(config) as b:
        result = await transact(b, make_message(subject="hello"), rcpts[:2], client=client)
        assert result.rcpt == {
            "bob@example.org": rcpt_reply(replies.RCPT_NO_ROUTE),
            "bob@example.com": ACCEPTED,
        }
        assert_data_reply(result.data, replies.OK)
        # Nothing accepted at all: DATA is never reached, nothing is sent.
        result = await transact(b, make_message(), ["nobody@example.net"], client=client)
        assert result == Transaction({"nobody@example.net": rcpt_reply(replies.RCPT_NO_ROUTE)})
        # Wrong sender for crm-only, but crm-content may still match: accepted,
        # then refused at DATA when the subject does not hold.
        result = await transact(b, make_message(subject="hello"), rcpts[2:], client=client)
        assert result.rcpt == {"bob@crm.example.org": ACCEPTED}
        assert_data_reply(result.data, replies.NO_ROUTE_DATA)
    assert received(b) == [api_call("bob@example.com", "E_OURS", {})]


async def test_content_routes_that_fail_answer_550_571_at_data(bridge: Any) -> None:
    config = """
    routes:
      - name: invoices
        match: {rcpt: '*@example.com', subject: 're:invoice'}
        template_id: E_INVOICE
      - name: receipts
        match: {rcpt: '*@example.com', headers: {X-Kind: receipt}}
        template_id: E_RECEIPT
      - name: other-domain
        match: {rcpt: '*@example.org'}
        template_id: E_ORG
    """
    async with bridge(config) as b:
        result = await transact(b, make_message(subject="hello"), ["bob@example.com"])
        assert result.rcpt == {"bob@example.com": ACCEPTED}
        assert_data_reply(result.data, replies.NO_ROUTE_DATA)
        assert received(b) == []
        # Beside a delivered recipient the message is accepted (docs/guarantees.md): 250,
        # the unroutable recipient is a dead letter.
        result = await transact(
            b, make_message(subject="hello"), ["bob@example.com", "alice@example.org"]
        )
        assert_data_reply(result.data, replies.OK)
    assert received(b) == [api_call("alice@example.org", "E_ORG", {})]


@pytest.mark.parametrize(
    "address",
    [
        pytest.param("bob", id="no-at"),
        pytest.param("bob@", id="no-domain"),
        pytest.param("@example.com", id="no-local-part"),
        pytest.param("a b@example.com", id="space"),
        pytest.param(".bob@example.com", id="leading-dot"),
        pytest.param("bob@example..com", id="empty-label"),
        pytest.param("bob@-example.com", id="label-starts-with-hyphen"),
        pytest.param("bob@exa_mple.com", id="underscore-in-domain"),
        pytest.param("", id="null-recipient"),
    ],
)
@pytest.mark.parametrize("client", CLIENTS)
async def test_bad_recipient_syntax_is_553_513(bridge: Any, address: str, client: str) -> None:
    async with bridge() as b:
        result = await transact(b, make_message(), [address, "bob@example.org"], client=client)
    code, text = result.rcpt[address]
    assert (code, text.split(" ", 1)[0]) == (
        replies.RCPT_BAD_SYNTAX.code,
        replies.RCPT_BAD_SYNTAX.status,
    ), result.rcpt
    assert result.rcpt["bob@example.org"] == ACCEPTED
    assert_data_reply(result.data, replies.OK)
    assert received(b) == [
        api_call("bob@example.org", "E_GENERIC", {"subject": "Hello", "body": "Hi there\n"})
    ]


# --- the template context (docs/routing.md) ----------------------------------------------

CONTEXT_MESSAGE = (
    b'From: "Shop Team" <Shop@Example.com>\r\n'
    b'To: "Bob B." <bob@example.org>, alice@example.org\r\n'
    b"Cc: Carol <carol@example.net>\r\n"
    b"Subject: Your receipt\r\n"
    b"Date: Tue, 04 Mar 2025 10:15:00 +0100\r\n"
    b"Message-ID: <receipt-42@example.com>\r\n"
    b"X-App: crm\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Total: 9.50 EUR\r\n"
    b"Thanks!\r\n"
    b"--b1\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<p>Total: <b>9.50 EUR</b></p>\r\n"
    b"--b1--\r\n"
)


async def test_template_context(bridge: Any) -> None:
    config = """
    routes:
      - name: context
        template_id: E_CONTEXT
        data:
          subject: "{{ subject }}"
          sender: "{{ sender }}"
          sender_address: "{{ sender.address }}"
          sender_name: "{{ sender.name }}"
          sender_local: "{{ sender.local }}"
          sender_domain: "{{ sender.domain }}"
          mail_from: "{{ mail_from }}"
          rcpt_address: "{{ rcpt.address }}"
          rcpt_local: "{{ rcpt.local }}"
          rcpt_domain: "{{ rcpt.domain }}"
          to: "{{ to | map(attribute='address') | join(',') }}"
          to_names: "{{ to | map(attribute='name') | join('|') }}"
          to_count: "{{ to | length }}"
          cc: "{{ cc | map(attribute='address') | join(',') }}"
          cc_name: "{{ cc[0].name }} at {{ cc[0].domain }}"
          header_lower: "{{ headers['x-app'] }}"
          header_upper: "{{ headers['X-APP'] }}"
          header_subject: "{{ headers.Subject }}"
          header_get_missing: "{{ headers.get('X-Missing', 'none') }}"
          header_in: "{{ 'x-APP' in headers }}"
          text: "{{ text }}"
          html: "{{ html }}"
          message_id: "{{ message_id }}"
          date: "{{ date }}"
          attachments: "{{ attachments | length }}"
          client_ip: "{{ client.ip }}"
          user: "{{ user }}"
          match: "{{ match | length }}"
    """
    async with bridge(config) as b:
        result = await transact(
            b, CONTEXT_MESSAGE, ["Bob@Example.ORG"], mail_from="bounces+42@mailer.example.com"
        )
    assert_data_reply(result.data, replies.OK)
    data = {
        "subject": "Your receipt",
        "sender": "Shop@Example.com",
        "sender_address": "Shop@Example.com",
        "sender_name": "Shop Team",
        "sender_local": "Shop",
        "sender_domain": "Example.com",
        "mail_from": "bounces+42@mailer.example.com",
        "rcpt_address": "Bob@Example.ORG",
        "rcpt_local": "Bob",
        "rcpt_domain": "Example.ORG",
        "to": "bob@example.org,alice@example.org",
        "to_names": "Bob B.|",
        "to_count": "2",
        "cc": "carol@example.net",
        "cc_name": "Carol at example.net",
        "header_lower": "crm",
        "header_upper": "crm",
        "header_subject": "Your receipt",
        "header_get_missing": "none",
        "header_in": "True",
        "text": "Total: 9.50 EUR\nThanks!",
        "html": "<p>Total: <b>9.50 EUR</b></p>",
        "message_id": "<receipt-42@example.com>",
        "date": "Tue, 04 Mar 2025 10:15:00 +0100",
        "attachments": "0",
        "client_ip": "127.0.0.1",
        "user": "",
        "match": "0",
    }
    assert received(b) == [api_call("Bob@Example.ORG", "E_CONTEXT", data)]


async def test_template_filters(bridge: Any) -> None:
    # Single-quoted YAML keeps backslashes; Jinja then unescapes '\\S' to '\S'.
    config = r"""
    routes:
      - name: filters
        template_id: E_FILTERS
        data:
          link: '{{ text | regex_search("https://\\S+") }}'
          token: '{{ text | regex_search("token=(\\w+)", 1) }}'
          order: '{{ text | regex_search("order (?P<n>\\d+)", "n") }}'
          missing: '{{ text | regex_search("nomatch(\\d+)", 1) }}'
          masked: '{{ rcpt.address | regex_replace("^(.)[^@]*", "\\1***") }}'
          spaces: '{{ subject | regex_replace("\\s+", "-") }}'
          first: "{{ text | first_line }}"
          first_of_html: "{{ html | first_line }}"
    """
    body = (
        "\n  \nHello Bob,\n\n"
        "Your order 42 shipped: https://track.example.com/p?id=42&token=abc123 today.\n"
    )
    message = make_message(subject="Order  42   shipped", body=body)
    async with bridge(config) as b:
        result = await transact(b, message, ["bob@example.org"])
    assert_data_reply(result.data, replies.OK)
    data = {
        "link": "https://track.example.com/p?id=42&token=abc123",
        "token": "abc123",
        "order": "42",
        "missing": "",
        "masked": "b***@example.org",
        "spaces": "Order-42-shipped",
        "first": "Hello Bob,",
        "first_of_html": "",
    }
    assert received(b) == [api_call("bob@example.org", "E_FILTERS", data)]


@pytest.mark.parametrize(
    ("fields", "sender", "expected"),
    [
        pytest.param(
            """
            alias: "{{ sender.name or 'Example' }}"
            reply_to: "support+{{ rcpt.local }}@example.com"
            is_random: true
            """,
            "Jane Shop <jane@example.com>",
            {"alias": "Jane Shop", "reply_to": "support+bob@example.com", "is_random": "1"},
            id="all-set",
        ),
        pytest.param(
            """
            alias: "{{ sender.name or 'Example' }}"
            is_random: false
            """,
            "jane@example.com",
            {"alias": "Example", "reply_to": None, "is_random": "0"},
            id="alias-fallback-not-random",
        ),
        pytest.param("", "Jane Shop <jane@example.com>",
                     {"alias": None, "reply_to": None, "is_random": None}, id="none-set"),
    ],
)  # fmt: skip
async def test_alias_reply_to_is_random_reach_the_api(
    bridge: Any, fields: str, sender: str, expected: dict[str, Any]
) -> None:
    extra = "\n".join(" " * 8 + line.strip() for line in fields.strip().splitlines())
    config = f"""
    routes:
      - name: fields
        template_id: E_FIELDS
{extra}
    """
    async with bridge(config) as b:
        result = await transact(b, make_message(sender=sender), ["bob@example.org"])
    assert_data_reply(result.data, replies.OK)
    assert received(b) == [api_call("bob@example.org", "E_FIELDS", {}, **expected)]


async def test_to_is_a_template(bridge: Any) -> None:
    config = """
    routes:
      - name: archive
        match: {rcpt: '*@example.org'}
        template_id: E_ARCHIVE
        to: "{{ rcpt.local | lower }}@archive.example.com"
        data: {for: "{{ rcpt.address }}"}
    """
    async with bridge(config) as b:
        result = await transact(b, make_message(), ["Bob@example.org"])
    assert_data_reply(result.data, replies.OK)
    expected = api_call("bob@archive.example.com", "E_ARCHIVE", {"for": "Bob@example.org"})
    assert received(b) == [expected]


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param("to: '{{ sender.name }} <{{ rcpt.address }}>'", id="to-not-a-bare-address"),
        pytest.param("data: {file: '{{ attachments[3].filename }}'}", id="undefined-error"),
        pytest.param("data: {mro: \"{{ ''.__class__.__mro__[1].__subclasses__() }}\"}",
                     id="sandbox-security-error"),
        pytest.param("alias: '{{ text | regex_search(\"(\") }}'", id="bad-regex-in-filter"),
    ],
)  # fmt: skip
async def test_template_that_fails_to_render_is_451_435(bridge: Any, fields: str) -> None:
    config = f"""
    routes:
      - name: broken
        template_id: E_BROKEN
        {fields}
    """
    async with bridge(config) as b:
        result = await transact(b, make_message(), ["bob@example.org"])
    assert_data_reply(result.data, replies.TEMPLATE_FAILED)
    assert received(b) == []


@pytest.mark.parametrize("client", CLIENTS)
async def test_user_route_alone_refuses_unauthenticated_client_at_rcpt(
    bridge: Any, client: str
) -> None:
    config = """
    routes:
      - name: crm
        match: {user: crm}
        template_id: E_CRM
    """
    async with bridge(config) as b:
        result = await transact(b, make_message(), ["bob@example.org"], client=client)
    assert result == Transaction({"bob@example.org": rcpt_reply(replies.RCPT_NO_ROUTE)})
    assert received(b) == []


# --- decoding: RFC 2047, HTML-only, 8-bit, attachments ----------------------------

SUBJECT_ROUTES = """
routes:
  - name: subject
    template_id: E_SUBJECT
    data: {subject: "{{ subject }}", name: "{{ sender.name }}", header: "{{ headers.subject }}"}
"""


def _b64(text: str, charset: str) -> str:
    return base64.b64encode(text.encode(charset)).decode()


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        pytest.param(f"=?UTF-8?B?{_b64('Grüße aus Köln ✓', 'utf-8')}?=", "Grüße aus Köln ✓",
                     id="utf8-base64"),
        pytest.param("=?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=", "Grüße aus Köln",
                     id="utf8-quoted-printable"),
        pytest.param("=?ISO-8859-1?Q?Caf=E9_cr=E8me_br=FBl=E9e?=", "Café crème brûlée",
                     id="latin1-quoted-printable"),
        pytest.param(f"=?iso-8859-1?b?{_b64('Ärger über Öl', 'latin-1')}?=", "Ärger über Öl",
                     id="latin1-base64"),
        pytest.param("Order =?UTF-8?Q?=E2=84=96?= 42 shipped", "Order № 42 shipped",
                     id="mixed-plain-and-encoded"),
        pytest.param("=?UTF-8?Q?Hello_?=\r\n =?UTF-8?Q?W=C3=B6rld?=", "Hello Wörld",
                     id="folded-adjacent-words"),
    ],
)  # fmt: skip
async def test_rfc2047_subject(bridge: Any, raw: str, decoded: str) -> None:
    message = make_message(subject=raw, sender="=?UTF-8?Q?J=C3=BCrgen_M=C3=BCller?= <j@example.de>")
    async with bridge(SUBJECT_ROUTES) as b:
        result = await transact(b, message, ["bob@example.org"])
    assert_data_reply(result.data, replies.OK)
    data = {"subject": decoded, "name": "Jürgen Müller", "header": decoded}
    assert received(b) == [api_call("bob@example.org", "E_SUBJECT", data)]


BODY_ROUTES = """
routes:
  - name: body
    template_id: E_BODY
    data: {text: "{{ text }}", html: "{{ html }}", subject: "{{ subject }}"}
"""


@pytest.mark.parametrize("client", CLIENTS)
async def test_html_only_message(bridge: Any, client: str) -> None:
    async with bridge(BODY_ROUTES) as b:
        result = await transact(b, eml("routing_html_only.eml"), ["bob@example.org"], client=client)
    assert_data_reply(result.data, replies.OK)
    data = {
        # From the HTML: script and style dropped, entities decoded, blocks as lines.
        "text": "Order #42\n\nFish & Chips <large> €9.50 – café\n\nThanks,\nThe Shop",
        # The part as sent, quoted-printable undone.
        "html": (
            "<html><head><style>p { color: red; }</style>\n"
            '<script type="text/javascript">var tracking = "secret";</script></head>\n'
            "<body><h1>Order #42</h1>\n"
            "<p>Fish &amp; Chips &lt;large&gt; &euro;9.50 &#8211; café</p>\n"
            "<p>Thanks,<br>The&#32;Shop</p></body></html>\n"
        ),
        "subject": "Your order",
    }
    assert received(b) == [api_call("bob@example.org", "E_BODY", data)]


@pytest.mark.parametrize(
    ("charset", "text"),
    [
        pytest.param("utf-8", "Grüße – 東京 ✓", id="utf8"),
        pytest.param("iso-8859-1", "Café für Jürgen, 5 £ ½", id="latin1"),
        pytest.param(None, "Grüße aus Köln", id="latin1-undeclared"),
    ],
)
@pytest.mark.parametrize("client", CLIENTS)
async def test_8bit_body(bridge: Any, charset: str | None, text: str, client: str) -> None:
    content_type = f"text/plain; charset={charset}" if charset else "text/plain"
    head = make_message(subject="8bit", body="", content_type=content_type)
    message = head + f"{text}\r\n".encode(charset or "latin-1")
    assert any(byte > 0x7F for byte in message)
    async with bridge(BODY_ROUTES) as b:
        result = await transact(
            b, message, ["bob@example.org"], mail_options=["BODY=8BITMIME"], client=client
        )
    assert_data_reply(result.data, replies.OK)
    data = {"text": f"{text}\n", "html": "", "subject": "8bit"}
    assert received(b) == [api_call("bob@example.org", "E_BODY", data)]


async def test_multipart_with_attachments(bridge: Any) -> None:
    config = """
    routes:
      - name: invoice
        match: {subject: 're:invoice (?P<number>\\d+)'}
        template_id: E_INVOICE
        data:
          number: "{{ match.number }}"
          text: "{{ text }}"
          html: "{{ html }}"
          count: "{{ attachments | length }}"
          files: "{{ attachments | map(attribute='filename') | join(',') }}"
          types: "{{ attachments | map(attribute='content_type') | join(',') }}"
          sizes: "{{ attachments | map(attribute='size') | join(',') }}"
          first: "{{ attachments[0].filename }} ({{ attachments[0].size }} bytes)"
    """
    async with bridge(config) as b:
        result = await transact(b, eml("routing_attachment.eml"), ["bob@example.org"])
    assert_data_reply(result.data, replies.OK)
    data = {
        "number": "42",
        "text": "Your invoice 42 is attached.",
        "html": "<p>Your invoice <b>42</b> is attached.</p>",
        "count": "2",
        "files": "invoice-42.pdf,items.csv",
        "types": "application/pdf,text/csv",
        "sizes": "265,21",
        "first": "invoice-42.pdf (265 bytes)",
    }
    assert received(b) == [api_call("bob@example.org", "E_INVOICE", data)]


# --- recipients: fan-out, envelope not headers ---------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
async def test_five_recipients_five_calls_each_with_its_own_rcpt(bridge: Any, client: str) -> None:
    config = """
    routes:
      - name: fanout
        template_id: E_FANOUT
        data:
          address: "{{ rcpt.address }}"
          local: "{{ rcpt.local }}"
          domain: "{{ rcpt.domain }}"
          subject: "{{ subject }}"
    """
    rcpts = [
        "alice@one.example",
        "Bob.Builder@Two.Example",
        "carol+orders@three.example",
        "dave@[192.0.2.1]",
        "erin@sub.four.example",
    ]
    message = make_message(to="Undisclosed recipients:;", subject="Fan out")
    async with bridge(config) as b:
        result = await transact(b, message, rcpts, client=client)
    assert result.rcpt == dict.fromkeys(rcpts, ACCEPTED)
    assert_data_reply(result.data, replies.OK)
    expected = []
    for rcpt in rcpts:
        local, _, domain = rcpt.rpartition("@")
        data = {"address": rcpt, "local": local, "domain": domain, "subject": "Fan out"}
        expected.append(api_call(rcpt, "E_FANOUT", data))
    assert by_to(b) == sorted(expected, key=lambda r: r["to"])


async def test_envelope_recipients_not_header_addresses(bridge: Any) -> None:
    config = """
    routes:
      - name: default
        template_id: E_GENERIC
        data: {rcpt: "{{ rcpt.address }}", to: "{{ to | map(attribute='address') | join(',') }}"}
    """
    message = make_message(
        to='"Visible V." <visible@example.org>, header-only@example.org',
        headers=("Cc: Copy <copy@example.org>",),
    )
    async with bridge(config) as b:
        # hidden@example.net is a Bcc: in the envelope only.
        result = await transact(b, message, ["visible@example.org", "hidden@example.net"])
    assert_data_reply(result.data, replies.OK)
    header_to = "visible@example.org,header-only@example.org"
    assert by_to(b) == [
        api_call(
            "hidden@example.net", "E_GENERIC", {"rcpt": "hidden@example.net", "to": header_to}
        ),
        api_call(
            "visible@example.org", "E_GENERIC", {"rcpt": "visible@example.org", "to": header_to}
        ),
    ]


# --- header overrides ------------------------------------------------------------------

OVERRIDE_HEADERS = (
    "X-Template-Id: E_FROM_HEADER",
    'X-Template-Data: {"plan": "pro", "seats": 5, "greeting": "{{ 7*7 }}"}',
    "X-Alias: Header Alias",
    "X-Reply-To: billing@example.com",
)


def _override_config(allow: str) -> str:
    return f"""
    routes:
      - name: app
        {allow}
        template_id: E_ROUTE
        alias: Route Alias
        reply_to: route@example.com
        data: {{name: "{{{{ rcpt.local }}}}", plan: basic}}
    """


@pytest.mark.parametrize(
    ("allow", "expected"),
    [
        pytest.param(
            "allow_header_overrides: true",
            api_call("bob@example.org", "E_FROM_HEADER",
                     {"name": "bob", "plan": "pro", "seats": 5, "greeting": "{{ 7*7 }}"},
                     alias="Header Alias", reply_to="billing@example.com"),
            id="on",
        ),
        pytest.param(
            "allow_header_overrides: false",
            api_call("bob@example.org", "E_ROUTE", {"name": "bob", "plan": "basic"},
                     alias="Route Alias", reply_to="route@example.com"),
            id="off",
        ),
        pytest.param(
            "",
            api_call("bob@example.org", "E_ROUTE", {"name": "bob", "plan": "basic"},
                     alias="Route Alias", reply_to="route@example.com"),
            id="default-off",
        ),
    ],
)  # fmt: skip
async def test_header_overrides(bridge: Any, allow: str, expected: dict[str, Any]) -> None:
    async with bridge(_override_config(allow)) as b:
        result = await transact(b, make_message(headers=OVERRIDE_HEADERS), ["bob@example.org"])
    assert_data_reply(result.data, replies.OK)
    assert received(b) == [expected]


async def test_header_override_of_data_only(bridge: Any) -> None:
    headers = ('X-Template-Data: {"plan": "team"}',)
    async with bridge(_override_config("allow_header_overrides: true")) as b:
        result = await transact(b, make_message(headers=headers), ["bob@example.org"])
    assert_data_reply(result.data, replies.OK)
    assert received(b) == [
        api_call(
            "bob@example.org",
            "E_ROUTE",
            {"name": "bob", "plan": "team"},
            alias="Route Alias",
            reply_to="route@example.com",
        )
    ]


@pytest.mark.parametrize(
    "value",
    [
        pytest.param('{"plan": pro}', id="not-json"),
        pytest.param('["pro"]', id="json-array"),
        pytest.param('"pro"', id="json-string"),
        pytest.param("", id="empty"),
    ],
)
async def test_malformed_template_data_header(bridge: Any, value: str) -> None:
    message = make_message(headers=(f"X-Template-Data: {value}",))
    async with bridge(_override_config("allow_header_overrides: true")) as b:
        result = await transact(b, message, ["bob@example.org", "alice@example.org"])
    assert_data_reply(result.data, replies.DATA_FORMAT)
    assert received(b) == []


async def test_malformed_template_data_header_ignored_when_overrides_are_off(bridge: Any) -> None:
    message = make_message(headers=('X-Template-Data: {"plan": pro}',))
    async with bridge(_override_config("")) as b:
        result = await transact(b, message, ["bob@example.org"])
    assert_data_reply(result.data, replies.OK)
    assert received(b) == [
        api_call(
            "bob@example.org",
            "E_ROUTE",
            {"name": "bob", "plan": "basic"},
            alias="Route Alias",
            reply_to="route@example.com",
        )
    ]


# --- message content is data, never template code -------------------------------------

INJECTION_BODY = (
    "{% for x in range(3) %}x{% endfor %}\n"
    "{{ ''.__class__.__mro__ }}\n"
    "{{ config }} {# comment #} {%raw%}\n"
)


@pytest.mark.parametrize("client", CLIENTS)
async def test_message_content_is_never_template_code(bridge: Any, client: str) -> None:
    config = """
    routes:
      - name: default
        template_id: "E_{{ headers['X-Kind'] | default('PLAIN') }}"
        alias: "{{ sender.name }}"
        data:
          subject: "{{ subject }}"
          body: "{{ text }}"
          first: "{{ text | first_line }}"
          kind: "{{ headers['X-Kind'] }}"
    """
    message = make_message(
        subject="{{ 7*7 }}",
        sender='"{{ 6*7 }}" <shop@example.com>',
        headers=("X-Kind: {{ 8*8 }}",),
        body=INJECTION_BODY,
    )
    async with bridge(config) as b:
        result = await transact(b, message, ["bob@example.org"], client=client)
    assert_data_reply(result.data, replies.OK)
    data = {
        "subject": "{{ 7*7 }}",
        "body": INJECTION_BODY,
        "first": "{% for x in range(3) %}x{% endfor %}",
        "kind": "{{ 8*8 }}",
    }
    expected = api_call("bob@example.org", "E_{{ 8*8 }}", data, alias="{{ 6*7 }}")
    assert received(b) == [expected]


# --- api.encoding ---------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["form", "json"])
async def test_api_encoding(bridge: Any, encoding: str) -> None:
    config = f"""
    api: {{encoding: {encoding}}}
    routes:
      - name: default
        template_id: E_GENERIC
        alias: Shop
        is_random: true
        data:
          subject: "{{{{ subject }}}}"
          count: 3
          flag: true
          nested: {{items: [1, "{{{{ rcpt.local }}}}"], note: "ünïcode"}}
    """
    async with bridge(config) as b:
        result = await transact(b, make_message(subject="Grüße"), ["bob@example.org"])
    assert_data_reply(result.data, replies.OK)
    data = {
        "subject": "Grüße",
        "count": 3,
        "flag": True,
        "nested": {"items": [1, "bob"], "note": "ünïcode"},
    }
    assert received(b) == [
        api_call(
            "bob@example.org", "E_GENERIC", data, alias="Shop", is_random="1", encoding=encoding
        )
    ]
    # form: data is a string holding JSON; json: an object (the sandbox refuses
    # anything else with 40008, so code 200 above proves the shape).
