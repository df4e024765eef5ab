"""PROXY protocol (v1 and v2) behind a load balancer: only from ``proxy_from``.

127.0.0.1 plays the load balancer; the addresses it announces (192.0.2.0/24,
198.51.100.0/24, 2001:db8::/32, documentation ranges) play the real clients.
::1 plays someone who is not an allowed proxy.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import ipaddress
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import pytest
from conftest import TlsFiles, run_on_uvloop
from smtp_raw import RawSmtp

from smtp_bridge import replies
from smtp_bridge.auth import hash_password
from smtp_bridge.auth_throttle import AuthThrottle
from smtp_bridge.config import ConfigError, parse_config

WAIT = 15.0

#: haproxy proxy-protocol.txt 2.2: the v2 signature.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

PASSWORD = "proxy-pa55word"
PASSWORD_HASH = hash_password(PASSWORD, n=2**10)


def v1(client: str, port: int = 40000) -> bytes:
    family = "TCP4" if ipaddress.ip_address(client).version == 4 else "TCP6"
    server = "203.0.113.25" if family == "TCP4" else "2001:db8:ffff::25"
    return f"PROXY {family} {client} {server} {port} 25\r\n".encode()


def v2(client: str | None, port: int = 40000) -> bytes:
    """A v2 header; ``client=None`` makes a LOCAL one (a load balancer's health check)."""
    if client is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    source = ipaddress.ip_address(client)
    if source.version == 4:
        family, dest = 0x11, ipaddress.ip_address("203.0.113.25")
    else:
        family, dest = 0x21, ipaddress.ip_address("2001:db8:ffff::25")
    body = source.packed + dest.packed + struct.pack("!HH", port, 25)
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def proxy_config(smtp_extra: str = "") -> str:
    return f"""
smtp:
  proxy_protocol: true
  proxy_from: ["127.0.0.1/32"]
  trusted_networks: ["192.0.2.0/24", "2001:db8::/32"]
  auth:
    require_tls: false
    users:
      app: {{password_hash: "{PASSWORD_HASH}"}}
{smtp_extra}
routes:
  - name: office
    match: {{client: ["192.0.2.0/24", "2001:db8::/32"]}}
    template_id: E_OFFICE
    data: {{ip: "{{{{ client.ip }}}}"}}
  - name: default
    template_id: E_GENERIC
    data: {{ip: "{{{{ client.ip }}}}"}}
"""


class Conn(RawSmtp):
    async def cmd(self, command: str | bytes) -> str:
        """One command; the last line of its reply."""
        return (await self.command(command))[-1]

    async def send_mail(self) -> str:
        await self.cmd("EHLO client.test")
        reply = await self.cmd("MAIL FROM:<app@example.com>")
        if not reply.startswith("250 "):
            return reply
        assert (await self.cmd("RCPT TO:<bob@example.org>")).startswith("250 ")
        assert (await self.cmd("DATA")).startswith("354 ")
        return await self.cmd("Subject: via the balancer\r\n\r\nHello\r\n.")


@asynccontextmanager
async def through_proxy(
    b, header: bytes | None, *, source: str = "127.0.0.1", port: int | None = None
) -> AsyncIterator[Conn]:
    host, port = next(
        (h, port or p) for h, p in b.service.listeners.addresses if (":" in h) == (":" in source)
    )
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    if header is not None:
        writer.write(header)
    try:
        yield Conn(reader, writer)
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()


async def wait_sessions(b, count: int) -> None:
    async def settle() -> None:
        while b.service.tracker.total != count:
            await asyncio.sleep(0)

    await asyncio.wait_for(settle(), WAIT)


# ---------------------------------------------------------------- the client's address


@pytest.mark.parametrize(
    ("header", "client"),
    [
        pytest.param(v1("192.0.2.10"), "192.0.2.10", id="v1-tcp4"),
        pytest.param(v1("2001:db8::7"), "2001:db8::7", id="v1-tcp6"),
        pytest.param(v2("192.0.2.10"), "192.0.2.10", id="v2-inet"),
        pytest.param(v2("2001:db8::7"), "2001:db8::7", id="v2-inet6"),
    ],
)
async def test_header_from_allowed_proxy_sets_the_client(
    bridge, log_lines, header: bytes, client: str
) -> None:
    async with bridge(proxy_config()) as b, through_proxy(b, header) as conn:
        assert (await conn.line()).startswith("220 ")
        # Trusted by its own address (the proxy's, 127.0.0.1, is not trusted),
        # and routed by it: `client` CIDR matches the announced address.
        assert (await conn.send_mail()).startswith(f"{replies.OK} id=")
    [sent] = b.delivered()
    assert sent["template_id"] == "E_OFFICE"
    assert sent["data"] == {"ip": client}
    connects = [line for line in log_lines() if line["event"] == "connect"]
    assert [(c["client"], c["proxy"]) for c in connects] == [(client, "127.0.0.1")]
    [message] = [line for line in log_lines() if line["event"] == "message"]
    assert message["client"] == client


async def test_untrusted_client_behind_the_proxy_needs_auth(bridge) -> None:
    async with bridge(proxy_config()) as b, through_proxy(b, v1("198.51.100.7")) as conn:
        assert (await conn.line()).startswith("220 ")
        assert await conn.send_mail() == str(replies.AUTH_REQUIRED)
    assert b.sandbox.sent() == []


async def test_health_check_local_header_is_the_proxy_itself(bridge, log_lines) -> None:
    async with bridge(proxy_config()) as b, through_proxy(b, v2(None)) as conn:
        assert (await conn.line()).startswith("220 ")
        assert (await conn.cmd("QUIT")).startswith("221 ")
    [connect] = [line for line in log_lines() if line["event"] == "connect"]
    assert connect["client"] == connect["proxy"] == "127.0.0.1"


# ---------------------------------------------------------------- who may send it


async def test_connection_from_a_non_proxy_is_refused(bridge, log_lines) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback (::1) here")
    listen = '  listen: ["127.0.0.1:0", "[::1]:0"]'
    async with bridge(proxy_config(listen)) as b:
        async with through_proxy(b, v1("192.0.2.10"), source="::1") as conn:
            assert await conn.rest() == b""  # closed, not a byte of SMTP
        assert b.service.tracker.total == 0
    [refused] = [line for line in log_lines() if line["event"] == "proxy_refused"]
    assert refused["client"] == "::1"
    assert refused["level"] == "warning"
    assert b.sandbox.sent() == []


@pytest.mark.parametrize(
    "header",
    [
        b"EHLO client.test\r\n",
        b"PROXY TCP4 192.0.2.10\r\n",
        b"PROXY TCP4 300.0.2.10 203.0.113.25 40000 25\r\n",
        b"PROXY " + b"x" * 2000 + b"\r\n",
        V2_SIGNATURE + b"\x21\x11\x00\x0c\x01",  # truncated, then EOF
    ],
    ids=["smtp-instead", "v1-short", "v1-bad-ip", "v1-huge", "v2-truncated"],
)
async def test_bad_header_from_allowed_proxy_closes(bridge, log_lines, header: bytes) -> None:
    async with bridge(proxy_config()) as b:
        async with through_proxy(b, header) as conn:
            conn.writer.write_eof()
            assert await conn.rest() == b""
        await wait_sessions(b, 0)
    assert [line["event"] for line in log_lines() if line["level"] != "info"] == [
        "proxy_header_invalid"
    ]


# ---------------------------------------------------------------- limits by real client


async def test_per_ip_limit_counts_the_real_client(bridge) -> None:
    async with (
        bridge(proxy_config("  max_connections_per_ip: 2")) as b,
        through_proxy(b, v1("198.51.100.7")) as first,
        through_proxy(b, v1("198.51.100.7")) as second,
    ):
        for conn in (first, second):
            assert (await conn.line()).startswith("220 ")
        async with through_proxy(b, v1("198.51.100.7")) as third:
            assert await third.rest() == f"{replies.TOO_MANY_CONNECTIONS}\r\n".encode()
        # Another client through the same balancer has its own budget.
        async with through_proxy(b, v2("198.51.100.8")) as other:
            assert (await other.line()).startswith("220 ")


async def test_auth_throttle_is_per_real_client(bridge) -> None:
    async with bridge(proxy_config()) as b:
        assert b.service.handler is not None
        b.service.handler.throttle = AuthThrottle(base_delay=0.0, max_delay=0.0,
                                                  disconnect_after=2)  # fmt: skip
        wrong = base64.b64encode(b"\0app\0guess").decode()
        right = base64.b64encode(f"\0app\0{PASSWORD}".encode()).decode()
        async with through_proxy(b, v1("198.51.100.7")) as guesser:
            await guesser.line()
            await guesser.cmd("EHLO guesser.test")
            for _ in range(2):
                assert (await guesser.cmd(f"AUTH PLAIN {wrong}")).startswith("535 5.7.8")
            locked = await guesser.cmd(f"AUTH PLAIN {right}")
            assert locked == str(replies.AUTH_TOO_MANY_FAILURES)
        # The balancer's other clients are not locked out with the guesser.
        async with through_proxy(b, v1("198.51.100.8")) as honest:
            await honest.line()
            await honest.cmd("EHLO honest.test")
            assert (await honest.cmd(f"AUTH PLAIN {right}")).startswith("235 ")


# ---------------------------------------------------------------- with implicit TLS


async def test_proxy_header_then_tls_in_the_same_packet(bridge, tls: TlsFiles) -> None:
    """A balancer forwards the client's ClientHello right behind the header."""
    body = proxy_config(f"  tls: {tls.yaml(implicit=True)}")
    async with bridge(body) as b, through_proxy(b, None, port=b.tls_port) as conn:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = tls.client_context().wrap_bio(incoming, outgoing, server_hostname="bridge.test")
        with pytest.raises(ssl.SSLWantReadError):
            client.do_handshake()
        conn.writer.write(v2("192.0.2.10") + outgoing.read())  # one write, one packet

        async def pump() -> None:
            data = await asyncio.wait_for(conn.reader.read(65536), WAIT)
            assert data, "closed during the handshake"
            incoming.write(data)

        while True:
            await pump()
            try:
                client.do_handshake()
                break
            except ssl.SSLWantReadError:
                conn.writer.write(outgoing.read())
        conn.writer.write(outgoing.read())
        banner = b""
        while not banner.endswith(b"\r\n"):
            try:
                banner += client.read()
            except ssl.SSLWantReadError:
                await pump()
        assert banner.startswith(b"220 bridge.test ")
    assert client.version() in ("TLSv1.2", "TLSv1.3")


# ---------------------------------------------------------------- config


def test_proxy_protocol_requires_proxy_from() -> None:
    text = "smtp:\n  proxy_protocol: true\nroutes: [{template_id: X}]\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, filename="c.yaml", env={})
    [issue] = caught.value.issues
    assert issue.path == "smtp.proxy_from"
    assert "required with proxy_protocol" in issue.message


def test_proxy_from_takes_cidrs() -> None:
    text = (
        "smtp:\n  proxy_protocol: true\n  proxy_from: [10.0.0.0/24, '::1']\n"
        "routes: [{template_id: X}]\n"
    )
    config = parse_config(text, filename="c.yaml", env={})
    assert config.smtp.proxy_from == [
        ipaddress.ip_network("10.0.0.0/24"),
        ipaddress.ip_network("::1/128"),
    ]


# ---------------------------------------------------------------- the daemon's loop


@pytest.mark.parametrize(
    ("case", "kwargs"),
    [
        pytest.param(
            test_header_from_allowed_proxy_sets_the_client,
            {"header": v2("192.0.2.10"), "client": "192.0.2.10"},
            id="v2",
        ),
        pytest.param(test_proxy_header_then_tls_in_the_same_packet, {}, id="header-then-tls"),
    ],
)
def test_on_uvloop(case, kwargs, tmp_path, tls: TlsFiles, log_lines) -> None:
    wanted = inspect.signature(case).parameters
    extra = {"tls": tls, "log_lines": log_lines}
    run_on_uvloop(case, tmp_path, **kwargs, **{k: v for k, v in extra.items() if k in wanted})
