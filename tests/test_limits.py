"""Limits against hostile and broken clients: connections, idle and session
time, command floods, line and address lengths, declared sizes.

Every test waits on the bridge (a reply, a close, a counter) with an upper
bound; none sleeps to synchronise. Loopback only: 127.0.0.1 plays the
attacker, ::1 the other client.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
from smtp_raw import RawSmtp

from smtp_bridge import replies
from smtp_bridge.sandbox import Sandbox

WAIT = 15.0

ROUTES = """
routes:
  - name: default
    template_id: "E_GENERIC"
    data: {subject: "{{ subject }}"}
"""

MESSAGE = b"From: app@example.com\r\nSubject: Limits\r\n\r\nHello\r\n.\r\n"


def config(smtp: str, api: str = "") -> str:
    return f"smtp: {smtp}\n" + (f"api: {api}\n" if api else "") + ROUTES


class Conn(RawSmtp):
    async def cmd(self, command: str | bytes) -> str:
        """One command; the last line of its reply."""
        return (await self.command(command))[-1]


@asynccontextmanager
async def connect(b, source: str = "127.0.0.1", *, banner: bool = True) -> AsyncIterator[Conn]:
    """A connection from ``source`` to the bridge's listener of the same family."""
    host, port = next(
        (h, p) for h, p in b.service.listeners.addresses if (":" in h) == (":" in source)
    )
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    conn = Conn(reader, writer)
    try:
        if banner:
            assert (await conn.line()).startswith("220 ")
        yield conn
    finally:
        await conn.close()


async def wait_sessions(b, count: int) -> None:
    async def settle() -> None:
        while b.service.tracker.total != count:
            await asyncio.sleep(0)

    await asyncio.wait_for(settle(), WAIT)


# ---------------------------------------------------------------- connections


@pytest.fixture
def ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback (::1) here")


async def test_idle_flood_from_one_address_is_refused_while_others_are_served(
    bridge, ipv6_loopback
) -> None:
    limit = 5
    # 127.0.0.1 is an outside client here; ::1 a trusted app server.
    smtp = (
        f'{{listen: ["127.0.0.1:0", "[::1]:0"], max_connections_per_ip: {limit}, '
        'trusted_networks: ["::1/128"]}'
    )
    async with bridge(config(smtp)) as b, AsyncExitStack() as held:
        for _ in range(limit):  # idle sessions filling the per-IP budget
            await held.enter_async_context(connect(b))

        async def flood() -> bytes:
            async with connect(b, banner=False) as conn:
                return await conn.rest()

        refused = await asyncio.gather(*(flood() for _ in range(30)))
        assert refused == [f"{replies.TOO_MANY_CONNECTIONS}\r\n".encode()] * 30
        assert b.service.tracker.per_ip[ipaddress.ip_address("127.0.0.1")] == limit

        # Meanwhile the other client sends mail.
        async with connect(b, "::1") as app:
            await app.cmd("EHLO app.test")
            assert (await app.cmd("MAIL FROM:<app@example.com>")).startswith("250 ")
            assert (await app.cmd("RCPT TO:<bob@example.org>")).startswith("250 ")
            assert (await app.cmd("DATA")).startswith("354 ")
            assert (await app.cmd(MESSAGE[:-2])).startswith(f"{replies.OK} id=")
        await wait_sessions(b, limit)  # the flood and the app left nothing behind
    assert len(b.delivered()) == 1


# ---------------------------------------------------------------- time limits


async def test_idle_session_is_closed_after_the_timeout(bridge, log_lines) -> None:
    async with bridge(config("{timeout: 0.3s}", "{timeout: 0.2s}")) as b:
        async with connect(b) as conn:
            await conn.cmd("EHLO client.test")
            started = time.monotonic()
            closing = await conn.rest()  # the server closes; we only wait for it
            idle = time.monotonic() - started
        assert closing == f"{replies.IDLE_TIMEOUT}\r\n".encode()
        assert idle >= 0.25
        await wait_sessions(b, 0)
    assert any(line["event"] == "idle_timeout" for line in log_lines())


async def test_silent_client_is_closed_after_the_timeout(bridge) -> None:
    async with bridge(config("{timeout: 0.3s}", "{timeout: 0.2s}")) as b:
        async with connect(b) as conn:
            assert await conn.rest() == f"{replies.IDLE_TIMEOUT}\r\n".encode()
        await wait_sessions(b, 0)


async def _transaction(conn: Conn, message_id: str = "1@test") -> str:
    assert (await conn.cmd("MAIL FROM:<app@example.com>")).startswith("250 ")
    assert (await conn.cmd("RCPT TO:<bob@example.org>")).startswith("250 ")
    assert (await conn.cmd("DATA")).startswith("354 ")
    # Its own Message-ID: not a retry of the message before (no dedup skip).
    return await conn.cmd(f"Message-ID: <{message_id}>\r\n".encode() + MESSAGE[:-2])


async def test_session_time_cap_closes_a_busy_session(bridge, log_lines) -> None:
    # The API takes 1 s a call (the sandbox's own latency), so the client is
    # never idle: the first message is handled from 0 to 1 s, the second from
    # 1 to 2 s, and the cap (1.5 s) falls inside the second, with half a second
    # to spare on either side for a busy machine.
    async with Sandbox(latency=1.0) as slow_api:
        async with bridge(config("{max_session_time: 1.5s}"), api_url=slow_api.url) as b:
            async with connect(b) as conn:
                await conn.cmd("EHLO client.test")
                assert (await _transaction(conn, "1@test")).startswith(f"{replies.OK} id=")
                assert (await _transaction(conn, "2@test")).startswith(f"{replies.OK} id=")
                # Answered, then closed: the cap is wall-clock, not idle time.
                assert await conn.rest() == f"{replies.SESSION_TIME_LIMIT}\r\n".encode()
            await wait_sessions(b, 0)
        assert len(slow_api.sent()) == 2
    [event] = [line for line in log_lines() if line["event"] == "session_time_limit"]
    assert event["limit"] == 1.5


async def test_session_time_cap_answers_the_message_in_flight(bridge) -> None:
    async with Sandbox(latency=0.6) as slow_api:
        body = config("{max_session_time: 0.3s}")
        async with bridge(body, api_url=slow_api.url) as b, connect(b) as conn:
            await conn.cmd("EHLO client.test")
            # The cap passes while the API call runs: the client still gets the truth.
            assert (await _transaction(conn)).startswith(f"{replies.OK} id=")
            assert await conn.rest() == f"{replies.SESSION_TIME_LIMIT}\r\n".encode()
        assert len(slow_api.sent()) == 1


async def test_session_time_cap_ends_a_slow_upload_unanswered(bridge) -> None:
    async with bridge(config("{max_session_time: 0.5s}")) as b, connect(b) as conn:
        await conn.cmd("EHLO client.test")
        await conn.cmd("MAIL FROM:<app@example.com>")
        await conn.cmd("RCPT TO:<bob@example.org>")
        assert (await conn.cmd("DATA")).startswith("354 ")
        conn.writer.write(b"Subject: slow\r\n\r\nfirst line of many\r\n")
        # The message is never accepted: 421, closed, no API call.
        assert await conn.rest() == f"{replies.SESSION_TIME_LIMIT}\r\n".encode()
    assert b.sandbox.sent() == []


# ---------------------------------------------------------------- command floods


@pytest.mark.parametrize("command", ["NOOP", "RSET"])
async def test_command_flood_gets_421(bridge, command: str) -> None:
    # smtp.max_commands_per_session (default 10,000: a budget per message) at 50.
    async with bridge(config("{max_commands_per_session: 50}")) as b, connect(b) as conn:
        await conn.cmd("EHLO client.test")
        conn.writer.write(f"{command}\r\n".encode() * 60)
        replies_seen = [await conn.line() for _ in range(50)]
        assert all(line.startswith("250 ") for line in replies_seen)
        closing = await conn.rest()
        assert closing.startswith(f"421 4.7.0 {command} sent too many times\r\n".encode())


async def test_unknown_command_flood_is_cut_off(bridge) -> None:
    async with bridge(config("{}")) as b, connect(b) as conn:
        for i in range(4):
            assert (await conn.cmd(f"XBOGUS{i}")).startswith("500 5.5.")
        assert (await conn.cmd("XBOGUS4")).startswith("502 5.5.1 ")
        assert await conn.rest() == b""


# ---------------------------------------------------------------- lengths


async def test_overlong_command_lines_are_refused_and_the_session_goes_on(bridge) -> None:
    async with bridge(config("{}")) as b, connect(b) as conn:
        await conn.cmd("EHLO client.test")
        # RFC 5321 4.5.3.1.4: a command line is at most 512 octets.
        assert (await conn.cmd("NOOP " + "x" * 600)).startswith("500 5.5.2 ")
        # Far past the reader's buffer, in pieces: read and refused, not buffered.
        conn.writer.write(b"y" * 100_000)
        assert (await conn.cmd("")).startswith("500 5.5.2 ")
        assert (await conn.cmd("NOOP")).startswith("250 ")
        assert (await conn.cmd("MAIL FROM:<app@example.com>")).startswith("250 ")


async def test_repeated_ehlo_does_not_widen_the_mail_line_limit(bridge) -> None:
    mail = "MAIL FROM:<app@example.com> SIZE=" + "0" * 560 + "1"  # 594 octets
    async with bridge(config("{}")) as b, connect(b) as conn:
        for _ in range(5):
            await conn.cmd("EHLO client.test")
        # 512 + SIZE (26) + SMTPUTF8 (10) = 548, however many EHLOs came before.
        assert (await conn.cmd(mail)).startswith("500 5.5.2 ")
        fits = "MAIL FROM:<app@example.com> SIZE=" + "0" * 500 + "1"
        assert (await conn.cmd(fits)).startswith("250 ")


@pytest.mark.parametrize(
    ("length", "expected"), [(64, "250 "), (65, "553 5.1.3 ")], ids=["64", "65"]
)
async def test_local_part_limit(bridge, length: int, expected: str) -> None:
    address = "a" * length + "@example.org"
    async with bridge(config("{}")) as b, connect(b) as conn:
        await conn.cmd("EHLO client.test")
        assert (await conn.cmd(f"MAIL FROM:<{address}>")).startswith(expected)
        await conn.cmd("RSET")
        await conn.cmd("MAIL FROM:<app@example.com>")
        reply = await conn.cmd(f"RCPT TO:<{address}>")
        assert reply.startswith(expected), reply
        assert "Error" not in reply


@pytest.mark.parametrize(
    ("size", "expected"),
    [("1048576", "250 2.1.0"), ("1048577", str(replies.TOO_LARGE)), ("lots", "501 5.5.4")],
    ids=["at-limit", "over", "not-a-number"],
)
async def test_size_declared_at_mail(bridge, size: str, expected: str) -> None:
    async with bridge(config("{max_message_size: 1MiB}")) as b, connect(b) as conn:
        await conn.cmd("EHLO client.test")
        reply = await conn.cmd(f"MAIL FROM:<app@example.com> SIZE={size}")
        assert reply.startswith(expected), reply
    assert b.sandbox.sent() == []
