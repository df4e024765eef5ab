"""Issue 13, the SMTP side, end to end against the running bridge: replies
quote client bytes escaped, a connection may carry thousands of messages
(smtp.max_commands_per_session), and ``[::]`` listens on IPv4 too."""

from __future__ import annotations

import asyncio
import socket

import aiosmtplib
import pytest
from smtp_raw import RawSmtp
from test_limits import ROUTES, config

from smtp_bridge import replies
from smtp_bridge.smtp.wording import escape_client_text
from smtp_bridge.sockets import ipv6_only

WAIT = 15.0
MESSAGE = b"From: app@example.com\r\nSubject: Many\r\n\r\nHello\r\n"


async def raw_connection(port: int, host: str = "127.0.0.1") -> RawSmtp:
    reader, writer = await asyncio.open_connection(host, port)
    conn = RawSmtp(reader, writer)
    assert (await conn.line()).startswith("220 ")
    return conn


# ---------------------------------------------------------------- escaped replies


async def test_nul_bytes_in_a_command_come_back_escaped(bridge) -> None:
    async with bridge(ROUTES) as b:
        conn = await raw_connection(b.port)
        try:
            conn.writer.write(b"\x00\x00\x00\r\n")
            raw = await asyncio.wait_for(conn.reader.readline(), WAIT)
            assert raw == b'500 5.5.2 command "\\x00\\x00\\x00" not recognized\r\n'
            # An escape sequence and DEL (uppercased as aiosmtpd reads commands).
            conn.writer.write(b"X\x1b[2J\x7f\r\n")
            raw = await asyncio.wait_for(conn.reader.readline(), WAIT)
            assert raw == b'500 5.5.2 command "X\\x1b[2J\\x7f" not recognized\r\n'
            # Quoted arguments too, bytes that are not UTF-8 included.
            conn.writer.write(b"EHLO client.test\r\n")
            await conn.reply()
            conn.writer.write(b"VRFY @\x01bad\xff\r\n")
            raw = await asyncio.wait_for(conn.reader.readline(), WAIT)
            assert raw == b"502 5.5.1 Could not VRFY @\\x01bad\\xff\r\n"
            assert all(0x20 <= c < 0x7F for c in raw[:-2]), raw
        finally:
            await conn.close()


@pytest.mark.parametrize(
    ("text", "wire"),
    [
        ("250 2.0.0 Ok", "250 2.0.0 Ok"),
        ('500 5.5.2 command "\x00" not recognized', '500 5.5.2 command "\\x00" not recognized'),
        ("x\r\ny\tz\x85", "x\\x0d\\x0ay\\x09z\\x85"),
        ("J\u00fcrgen \u2713", "J\u00fcrgen \u2713"),  # printable UTF-8 stays
        ("bad \udcff\udc80", "bad \\xff\\x80"),  # surrogateescape'd bytes
    ],
    ids=["plain", "nul", "controls", "utf-8", "not utf-8"],
)
def test_escape_client_text(text: str, wire: str) -> None:
    assert escape_client_text(text) == wire


# ---------------------------------------------------------------- commands per session


async def test_a_connection_carries_250_messages_and_more(bridge) -> None:
    """aiosmtpd's hidden 200-per-command budget cut clients at their 200th message;
    with PHPMailer's keep-alive (RSET after each message) and a NOOP probe too."""
    count = 260
    async with bridge(ROUTES) as b, b.client(timeout=WAIT) as smtp:
        await smtp.ehlo()
        for i in range(count):
            await smtp.noop()
            code, _ = await smtp.mail("app@example.com")
            assert code == 250, i
            code, _ = await smtp.rcpt(f"user{i}@example.org")
            assert code == 250, i
            code, text = await smtp.data(MESSAGE)
            assert code == 250, (i, text)
            await smtp.rset()
        assert len(b.delivered()) == count


async def test_max_commands_per_session_is_the_setting(bridge) -> None:
    async with bridge(config("{max_commands_per_session: 3, max_recipients: 2}")) as b:
        conn = await raw_connection(b.port)
        try:
            await conn.command("EHLO client.test")
            for i in range(3):
                assert (await conn.command("MAIL FROM:<app@example.com>"))[-1].startswith("250")
                # RCPT's budget is the setting times max_recipients: 6 here.
                for n in range(2):
                    reply = await conn.command(f"RCPT TO:<u{i}{n}@example.org>")
                    assert reply[-1].startswith("250")
                assert (await conn.command("DATA"))[-1].startswith("354")
                assert (await conn.command(MESSAGE + b"."))[-1].startswith(f"{replies.OK} id=")
            conn.writer.write(b"MAIL FROM:<app@example.com>\r\n")
            closing = await asyncio.wait_for(conn.reader.read(), WAIT)
            assert closing == b"421 4.7.0 MAIL sent too many times\r\n"
        finally:
            await conn.close()
        assert len(b.delivered()) == 6


# ---------------------------------------------------------------- dual stack


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback here")


async def _send(host: str, port: int) -> tuple[int, str]:
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=WAIT) as smtp:
        await smtp.ehlo()
        await smtp.mail("app@example.com")
        await smtp.rcpt("bob@example.org")
        return await smtp.data(MESSAGE)


@needs_ipv6
async def test_the_ipv6_wildcard_takes_ipv4_clients_too(bridge, log_lines) -> None:
    async with bridge(config('{listen: ["[::]:0"]}')) as b:
        [(host, port)] = b.service.listeners.addresses
        assert host == "::"
        # From 127.0.0.1, seen as 127.0.0.1 (a trusted network: no AUTH needed).
        code, text = await _send("127.0.0.1", port)
        assert code == 250, text
        code, text = await _send("::1", port)
        assert code == 250, text
    [listening] = [line for line in log_lines() if line["event"] == "listening"]
    assert listening["address"] == f"[::]:{port}" and listening["ipv4"] is True
    connects = [line["client"] for line in log_lines() if line["event"] == "connect"]
    assert connects == ["127.0.0.1", "::1"]


@needs_ipv6
async def test_dual_stack_false_keeps_the_wildcard_ipv6_only(bridge, log_lines) -> None:
    async with bridge(config('{listen: ["[::]:0"], dual_stack: false}')) as b:
        [(_, port)] = b.service.listeners.addresses
        with pytest.raises((aiosmtplib.SMTPConnectError, OSError)):
            await _send("127.0.0.1", port)
        code, text = await _send("::1", port)
        assert code == 250, text
    [listening] = [line for line in log_lines() if line["event"] == "listening"]
    assert listening["address"] == f"[::]:{port}" and listening["ipv4"] is False


def test_ipv4_wildcard_on_the_same_port_keeps_the_ipv6_one_ipv6_only() -> None:
    listen = ["0.0.0.0:25", "[::]:25", "[::]:587"]
    assert ipv6_only(25, True, listen) is True  # 0.0.0.0:25 takes IPv4 itself
    assert ipv6_only(587, True, listen) is False
    assert ipv6_only(587, False, listen) is True
    assert ipv6_only(0, True, ["0.0.0.0:0", "[::]:0"]) is False  # two different ports
