"""The SMTP dialogue end to end, byte for byte: smuggling, limits, reply codes.

Raw sockets (``asyncio.open_connection``) where a client library would "fix"
the input (line ends, dot-stuffing, long lines); the real bridge and the real
sandbox API behind it (``bridge`` fixture).
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import aiosmtpd
import pytest
from conftest import RunningBridge, make_config

from smtp_bridge import replies
from smtp_bridge.delivery import Delivery
from smtp_bridge.sandbox import Sandbox
from smtp_bridge.service import BridgeService

#: Upper bound for any single wait on the bridge; never a synchronisation sleep.
WAIT = 15.0

MIB = 1024 * 1024

ROUTES = """
routes:
  - name: default
    template_id: "E_GENERIC"
    data: {subject: "{{ subject }}", body: "{{ text }}"}
"""


def with_smtp(smtp: str) -> str:
    """Bridge config: the given ``smtp:`` settings (a YAML flow mapping) plus ROUTES."""
    return f"smtp: {smtp}\n{ROUTES}"


SIZE_LIMIT = with_smtp("{max_message_size: 1MiB}")

# A reply line with an RFC 3463 enhanced status code whose class matches the code.
ENHANCED_RE = re.compile(r"^(?P<code>[245]\d\d) (?P<cls>[245])\.\d{1,3}\.\d{1,3}( |$)")


class RawSession:
    """An SMTP client that sends exactly the bytes it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def reply(self) -> tuple[int, list[str]]:
        """Read one (possibly multi-line) reply: the code and its lines."""
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), WAIT)
            assert raw.endswith(b"\r\n"), f"reply line not ended by CRLF: {raw!r} after {lines}"
            line = raw[:-2].decode()
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return int(line[:3]), lines

    async def line(self) -> str:
        """One single-line reply, as text."""
        _, lines = await self.reply()
        assert len(lines) == 1, lines
        return lines[0]

    async def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, command: str) -> str:
        """Send one command line; return its single-line reply."""
        await self.send(command + "\r\n")
        return await self.line()

    async def rest(self) -> bytes:
        """Everything the server sends until it closes the connection."""
        return await asyncio.wait_for(self.reader.read(), WAIT)

    async def start_mail(self, rcpts: list[str], mail_from: str = "app@example.com") -> None:
        assert (await self.cmd(f"MAIL FROM:<{mail_from}>")).startswith("250 ")
        for rcpt in rcpts:
            reply = await self.cmd(f"RCPT TO:<{rcpt}>")
            assert reply.startswith("250 "), (rcpt, reply)
        assert (await self.cmd("DATA")).startswith("354 ")

    async def transaction(
        self, content: bytes, rcpts: list[str], mail_from: str = "app@example.com"
    ) -> str:
        """MAIL, RCPT..., DATA, then ``content`` sent verbatim (it must carry the
        terminator); return the reply to the message."""
        await self.start_mail(rcpts, mail_from)
        await self.send(content)
        return await self.line()


@asynccontextmanager
async def raw_session(b, *, ehlo: bool = True) -> AsyncIterator[RawSession]:
    reader, writer = await asyncio.open_connection(b.host, b.port)
    session = RawSession(reader, writer)
    try:
        code, _ = await session.reply()
        assert code == 220
        if ehlo:
            await session.send("EHLO client.test\r\n")
            code, _ = await session.reply()
            assert code == 250
        yield session
    finally:
        writer.close()
        with suppress(OSError):  # the server may already have reset it
            await writer.wait_closed()


async def open_raw(b) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(b.host, b.port)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with suppress(OSError):
        await writer.wait_closed()


def message(body: bytes = b"Hello there\r\n", subject: bytes = b"Hello") -> bytes:
    """A small CRLF message, not yet terminated."""
    return (
        b"From: Shop <shop@example.com>\r\n"
        b"To: bob@example.org\r\n"
        b"Subject: " + subject + b"\r\n"
        b"Message-ID: <p1@example.com>\r\n"
        b"\r\n" + body
    )


def ended(content: bytes) -> bytes:
    """``content`` (ending with CRLF) followed by the end-of-data line."""
    assert content.endswith(b"\r\n")
    return content + b".\r\n"


# ---------------------------------------------------------------- SMTP smuggling

SMUGGLED = (
    b"MAIL FROM:<evil@attacker.example>\r\n"
    b"RCPT TO:<victim@example.org>\r\n"
    b"DATA\r\n"
    b"From: ceo@example.com\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"wire the money\r\n"
)


@pytest.mark.parametrize(
    "separator",
    [b"\n.\r\n", b"\r.\r\n", b"\n.\n", b"\r\n.\n", b"\r\n.\r"],
    ids=["LF.CRLF", "CR.CRLF", "LF.LF", "CRLF.LF", "CRLF.CR"],
)
async def test_smuggling_does_not_end_data(bridge, separator: bytes) -> None:
    async with bridge() as b, raw_session(b) as s:
        content = message(b"first part" + separator + SMUGGLED)
        reply = await s.transaction(ended(content), ["bob@example.org"])
        assert reply.startswith(f"{replies.OK} id=")
        # Exactly one reply to the whole thing: the next one answers QUIT.
        await s.send("QUIT\r\n")
        assert (await s.rest()).decode().startswith("221 ")
    sent = b.sandbox.sent()
    assert len(sent) == 1, sent
    assert sent[0]["to"] == "bob@example.org"
    body = sent[0]["data"]["body"]
    assert "first part" in body
    assert "MAIL FROM:<evil@attacker.example>" in body
    assert "RCPT TO:<victim@example.org>" in body
    assert "wire the money" in body
    assert sent[0]["data"]["subject"] == "Hello"


@pytest.mark.parametrize(
    "separator", [b"\n.\r\n", b"\r.\r\n", b"\n.\n"], ids=["LF.CRLF", "CR.CRLF", "LF.LF"]
)
async def test_smuggling_with_bare_lf_reject(bridge, separator: bytes) -> None:
    async with bridge(with_smtp("{bare_lf: reject}")) as b, raw_session(b) as s:
        content = message(b"first part" + separator + SMUGGLED)
        reply = await s.transaction(ended(content), ["bob@example.org"])
        assert reply.startswith(f"{replies.BARE_LF} id=")
        assert reply.startswith("550 5.5.2 ")
        await s.send("QUIT\r\n")
        assert (await s.rest()).decode().startswith("221 ")
    assert b.sandbox.sent() == []


async def test_bare_lf_reject(bridge) -> None:
    async with bridge(with_smtp("{bare_lf: reject}")) as b, raw_session(b) as s:
        reply = await s.transaction(ended(message(b"one\ntwo\r\n")), ["bob@example.org"])
        assert reply.startswith("550 5.5.2 ")
        # The session stays usable; a clean message goes through.
        reply = await s.transaction(ended(message(b"one\r\ntwo\r\n")), ["bob@example.org"])
        assert reply.startswith(f"{replies.OK} id=")
    assert len(b.delivered()) == 1


async def test_bare_lf_normalized_into_lines(bridge) -> None:
    content = (
        b"From: Shop <shop@example.com>\n"
        b"To: bob@example.org\n"
        b"Subject: Bare LF\n"
        b"\n"
        b"line one\nline two\r\nline three\n"
    )
    async with bridge() as b, raw_session(b) as s:
        reply = await s.transaction(content + b"\r\n.\r\n", ["bob@example.org"])
        assert reply.startswith(f"{replies.OK} id=")
    [sent] = b.delivered()
    assert sent["data"]["subject"] == "Bare LF"
    assert sent["data"]["body"].splitlines() == ["line one", "line two", "line three", ""]


# ---------------------------------------------------------------- banner and EHLO


async def test_banner_has_no_version(bridge) -> None:
    async with bridge() as b:
        reader, writer = await open_raw(b)
        try:
            banner = (await asyncio.wait_for(reader.readline(), WAIT)).decode()
        finally:
            await close(writer)
    assert banner.startswith("220 bridge.test ")
    assert "Python" not in banner
    assert aiosmtpd.__version__ not in banner
    assert re.search(r"\d", banner[4:]) is None, banner


async def test_ehlo_advertises_extensions(bridge) -> None:
    async with bridge(SIZE_LIMIT) as b, raw_session(b, ehlo=False) as s:
        await s.send("EHLO client.test\r\n")
        code, lines = await s.reply()
    assert code == 250
    assert lines[0] == "250-bridge.test"
    keywords = [line[4:] for line in lines[1:]]
    assert "ENHANCEDSTATUSCODES" in keywords
    assert f"SIZE {MIB}" in keywords
    assert "8BITMIME" in keywords
    assert all(line.startswith("250-") for line in lines[:-1])
    assert lines[-1].startswith("250 ")


# ---------------------------------------------------------------- size limits


async def test_declared_size_too_big_refused_at_mail(bridge) -> None:
    async with bridge(SIZE_LIMIT) as b, raw_session(b) as s:
        reply = await s.cmd(f"MAIL FROM:<app@example.com> SIZE={MIB + 1}")
        assert reply == str(replies.TOO_LARGE)
        # A size under the limit is accepted.
        assert (await s.cmd(f"MAIL FROM:<app@example.com> SIZE={MIB // 2}")).startswith("250 ")
    assert b.sandbox.sent() == []


HUGE_LINE = b"y" * (MIB + 200_000) + b"\r\n"


def _many_lines(total: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    return line * (total // len(line) + 1)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(_many_lines(MIB + 4096), id="many-short-lines"),
        pytest.param(HUGE_LINE, id="one-huge-line"),
        pytest.param((b"z" * 70 + b"\n") * (MIB // 71 + 100) + b"\r\n", id="bare-lf-lines"),
    ],
)
async def test_message_over_size_limit(bridge, body: bytes) -> None:
    async with bridge(SIZE_LIMIT) as b, raw_session(b) as s:
        await s.start_mail(["bob@example.org"])
        await s.send(ended(message(body)))
        # A reply to DATA, so it carries the queue id like every other (docs/replies.md).
        assert re.fullmatch(rf"{re.escape(str(replies.TOO_LARGE))} id=[0-9A-F]+", await s.line())
        # The session stays usable.
        assert (await s.cmd("NOOP")).startswith("250 ")
        reply = await s.transaction(ended(message()), ["bob@example.org"])
        assert reply.startswith(f"{replies.OK} id=")
    [sent] = b.sandbox.sent()
    assert sent["code"] == 200
    assert sent["data"]["body"] == "Hello there\n"


async def test_long_line_under_limit_accepted(bridge) -> None:
    long_line = "".join(chr(ord("a") + i % 26) for i in range(5000))
    async with bridge(SIZE_LIMIT) as b, raw_session(b) as s:
        content = message(b"before\r\n" + long_line.encode() + b"\r\nafter\r\n")
        reply = await s.transaction(ended(content), ["bob@example.org"])
        assert reply.startswith(f"{replies.OK} id=")
    [sent] = b.delivered()
    assert sent["data"]["body"].splitlines() == ["before", long_line, "after"]


@pytest.mark.parametrize(("excess", "expected"), [(0, "250 2.0.0 "), (1, "552 5.3.4 ")],
                         ids=["at-limit", "one-over"])  # fmt: skip
async def test_size_limit_boundary(bridge, excess: int, expected: str) -> None:
    # 300 KiB, not 1 MiB: the API request must stay under the sandbox's 1 MiB
    # request cap; this still takes the parse-in-a-thread path.
    limit = 300 * 1024
    async with bridge(with_smtp("{max_message_size: 300KiB}")) as b, raw_session(b) as s:
        head = message(b"")
        body = b"a" * (limit + excess - len(head) - 2) + b"\r\n"
        assert len(head + body) == limit + excess
        reply = await s.transaction(ended(head + body), ["bob@example.org"])
        assert reply.startswith(expected)
    assert len(b.delivered()) == (1 if excess == 0 else 0)


# ---------------------------------------------------------------- recipients and relay


async def test_too_many_recipients(bridge) -> None:
    async with bridge(with_smtp("{max_recipients: 3}")) as b, raw_session(b) as s:
        assert (await s.cmd("MAIL FROM:<app@example.com>")).startswith("250 ")
        for i in range(3):
            assert (await s.cmd(f"RCPT TO:<r{i}@example.org>")).startswith("250 ")
        reply = await s.cmd("RCPT TO:<r3@example.org>")
        assert reply == str(replies.TOO_MANY_RECIPIENTS)
        assert reply.startswith("452 4.5.3 ")
        assert (await s.cmd("DATA")).startswith("354 ")
        await s.send(ended(message()))
        assert (await s.line()).startswith(f"{replies.OK} id=")
    assert sorted(r["to"] for r in b.delivered()) == [f"r{i}@example.org" for i in range(3)]


async def test_untrusted_client_needs_auth(bridge) -> None:
    async with bridge(with_smtp('{trusted_networks: ["10.0.0.0/8"]}')) as b, raw_session(b) as s:
        reply = await s.cmd("MAIL FROM:<app@example.com>")
        assert reply == str(replies.AUTH_REQUIRED)
        assert reply.startswith("530 5.7.0 ")
        assert (await s.cmd("RCPT TO:<bob@example.org>")).startswith("503 5.5.1 ")
        assert (await s.cmd("DATA")).startswith("503 5.5.1 ")
    assert b.sandbox.sent() == []


async def test_dot_stuffing_removed(bridge) -> None:
    body = b"..leading dot\r\n...two dots\r\n..\r\nmiddle . dot\r\n"
    async with bridge() as b, raw_session(b) as s:
        reply = await s.transaction(ended(message(body)), ["bob@example.org"])
        assert reply.startswith(f"{replies.OK} id=")
    [sent] = b.delivered()
    assert sent["data"]["body"].splitlines() == [".leading dot", "..two dots", ".", "middle . dot"]


# ---------------------------------------------------------------- connection limits


async def _banner(reader: asyncio.StreamReader) -> str:
    return (await asyncio.wait_for(reader.readline(), WAIT)).decode()


async def _wait_sessions(b, count: int) -> None:
    """Yield to the loop until the bridge counts ``count`` open sessions."""

    async def settle() -> None:
        while b.service.tracker.total != count:
            await asyncio.sleep(0)

    await asyncio.wait_for(settle(), WAIT)


async def test_per_ip_limit(bridge) -> None:
    config = with_smtp('{max_connections_per_ip: 2, trusted_networks: ["10.0.0.0/8"]}')
    async with bridge(config) as b:
        first, second = await open_raw(b), await open_raw(b)
        try:
            for reader, _ in (first, second):
                assert (await _banner(reader)).startswith("220 ")
            reader, writer = await open_raw(b)
            try:
                refused = await asyncio.wait_for(reader.read(), WAIT)
            finally:
                await close(writer)
            assert refused.decode() == f"{replies.TOO_MANY_CONNECTIONS}\r\n"
            assert refused.startswith(b"421 4.7.0 ")
            # A freed slot can be used again.
            await close(first[1])
            await _wait_sessions(b, 1)
            reader, writer = await open_raw(b)
            try:
                assert (await _banner(reader)).startswith("220 ")
            finally:
                await close(writer)
        finally:
            await close(first[1])
            await close(second[1])


async def test_trusted_networks_exempt_from_per_ip_limit(bridge) -> None:
    config = with_smtp('{max_connections_per_ip: 2, trusted_networks: ["127.0.0.0/8"]}')
    async with bridge(config) as b:
        conns = [await open_raw(b) for _ in range(4)]
        try:
            for reader, _ in conns:
                assert (await _banner(reader)).startswith("220 ")
            # And they are real sessions.
            reader, writer = conns[-1]
            writer.write(b"NOOP\r\n")
            assert (await _banner(reader)).startswith("250 2.0.0")
        finally:
            for _, writer in conns:
                await close(writer)


async def test_total_limit_applies_to_trusted(bridge) -> None:
    config = with_smtp('{max_connections: 2, trusted_networks: ["127.0.0.0/8"]}')
    async with bridge(config) as b:
        conns = [await open_raw(b) for _ in range(2)]
        try:
            for reader, _ in conns:
                assert (await _banner(reader)).startswith("220 ")
            reader, writer = await open_raw(b)
            try:
                refused = await asyncio.wait_for(reader.read(), WAIT)
            finally:
                await close(writer)
            assert refused.decode() == f"{replies.TOO_MANY_CONNECTIONS}\r\n"
        finally:
            for _, writer in conns:
                await close(writer)


# ---------------------------------------------------------------- internal errors


async def test_internal_error_does_not_leak(bridge, monkeypatch, log_lines) -> None:
    async def explode(self, *args, **kwargs):
        raise RuntimeError("secret detail")

    monkeypatch.setattr(Delivery, "deliver", explode)
    async with bridge() as b, raw_session(b) as s:
        reply = await s.transaction(ended(message()), ["bob@example.org"])
        assert reply.startswith("451 4.3.0 ")
        assert "RuntimeError" not in reply
        assert "secret detail" not in reply
        # The failed transaction is over; the session goes on.
        assert (await s.cmd("NOOP")).startswith("250 ")
        assert (await s.cmd("MAIL FROM:<app@example.com>")).startswith("250 ")
        assert (await s.cmd("RSET")).startswith("250 ")
    assert b.sandbox.sent() == []
    assert any(line.get("exception") == "RuntimeError" for line in log_lines())


# ---------------------------------------------------------------- aiosmtpd's own replies


async def test_engine_replies_have_enhanced_codes(bridge) -> None:
    async with bridge() as b, raw_session(b, ehlo=False) as s:
        before_helo = await s.cmd("MAIL FROM:<app@example.com>")
        await s.send("EHLO client.test\r\n")
        assert (await s.reply())[0] == 250
        rcpt_first = await s.cmd("RCPT TO:<bob@example.org>")
        unknown = await s.cmd("FROBNICATE now")
        noop = await s.cmd("NOOP")
        data_first = await s.cmd("DATA")
        bad_mail = await s.cmd("MAIL TO:<x@example.org>")
        assert (await s.cmd("MAIL FROM:<app@example.com>")).startswith("250 2.1.0")
        nested = await s.cmd("MAIL FROM:<app@example.com>")
        rset = await s.cmd("RSET")
        vrfy = await s.cmd("VRFY bob")
        await s.send("QUIT\r\n")
        quit_reply = (await s.rest()).decode()
    assert before_helo.startswith("503 5.5.1 ")
    assert rcpt_first.startswith("503 5.5.1 ")
    assert re.match(r"500 5\.5\.\d+ ", unknown), unknown
    assert noop.startswith("250 2.0.0")
    assert data_first.startswith("503 5.5.1 ")
    assert bad_mail.startswith("501 5.5.")
    assert nested.startswith("503 5.5.1 ")
    assert rset.startswith("250 2.0.0")
    assert vrfy.startswith("252 2.")
    assert quit_reply.startswith("221 2.0.0")
    for line in (before_helo, rcpt_first, unknown, noop, data_first, bad_mail, nested, rset,
                 vrfy, quit_reply.strip()):  # fmt: skip
        m = ENHANCED_RE.match(line)
        assert m is not None, line
        assert m["code"][0] == m["cls"], line
        assert "Error:" not in line, line


# ---------------------------------------------------------------- the daemon's loop

# The daemon runs on uvloop (commands.common.run), whose transports are not asyncio's own
# classes; the tests above run on the default loop. Run a cross-section of them
# on uvloop too, through the same bridge factory.


def _bridge_factory(tmp_path: Path, sandbox: Sandbox):
    @asynccontextmanager
    async def run(body: str = ROUTES) -> AsyncIterator[RunningBridge]:
        service = BridgeService(make_config(tmp_path, sandbox.url, body))
        await service.startup()
        try:
            yield RunningBridge(service, sandbox)
        finally:
            service.stop()
            await service.shutdown()

    return run


UVLOOP_CASES = [
    pytest.param(test_smuggling_does_not_end_data, {"separator": b"\n.\r\n"}, id="smuggling"),
    pytest.param(test_bare_lf_normalized_into_lines, {}, id="bare-lf"),
    pytest.param(test_ehlo_advertises_extensions, {}, id="ehlo"),
    pytest.param(test_message_over_size_limit, {"body": HUGE_LINE}, id="huge-line"),
    pytest.param(test_dot_stuffing_removed, {}, id="dot-stuffing"),
    pytest.param(test_per_ip_limit, {}, id="per-ip-limit"),
    pytest.param(test_total_limit_applies_to_trusted, {}, id="total-limit"),
    pytest.param(test_internal_error_does_not_leak, {}, id="internal-error"),
    pytest.param(test_engine_replies_have_enhanced_codes, {}, id="engine-replies"),
]


@pytest.mark.parametrize(("case", "kwargs"), UVLOOP_CASES)
def test_on_uvloop(case, kwargs, tmp_path: Path, monkeypatch, log_lines) -> None:
    uvloop = pytest.importorskip("uvloop")
    wanted = inspect.signature(case).parameters
    extra = {"monkeypatch": monkeypatch, "log_lines": log_lines}
    kwargs = {**kwargs, **{name: value for name, value in extra.items() if name in wanted}}

    async def main() -> None:
        async with Sandbox() as sandbox:
            await case(_bridge_factory(tmp_path, sandbox), **kwargs)

    uvloop.run(main())
