"""TLS end to end: STARTTLS, implicit TLS, TLS 1.2 minimum, certificate reload.

Certificates come from ``trustme`` (the ``tls`` fixture); clients verify them
against its CA, so a test passes only with the certificate the bridge should
be serving. Raw sockets where a client library would hide the bytes.
"""

from __future__ import annotations

import asyncio
import inspect
import ssl
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest
import trustme
from conftest import RunningBridge, TlsFiles, run_on_uvloop

from smtp_bridge import replies
from smtp_bridge.config import ConfigError, parse_config
from smtp_bridge.tls import MINIMUM_VERSION, TlsError, server_context

#: Upper bound for any single wait on the bridge; never a synchronisation sleep.
WAIT = 15.0

ROUTES = """
routes:
  - name: default
    template_id: "E_GENERIC"
    data: {subject: "{{ subject }}"}
"""

MESSAGE = b"From: app@example.com\r\nSubject: Over TLS\r\n\r\nHello\r\n"


def tls_config(tls: TlsFiles, *, implicit: bool = False, starttls: bool = True) -> str:
    return f"smtp: {{tls: {tls.yaml(implicit=implicit, starttls=starttls)}}}\n{ROUTES}"


class Raw:
    """An SMTP client that sends exactly the bytes it is given, TLS on demand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def reply(self) -> list[str]:
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), WAIT)
            assert raw.endswith(b"\r\n"), (raw, lines)
            lines.append(raw[:-2].decode())
            if len(lines[-1]) < 4 or lines[-1][3] != "-":
                return lines

    async def cmd(self, line: bytes) -> list[str]:
        self.writer.write(line + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def rest(self) -> bytes:
        """Everything until the server closes the connection."""
        return await asyncio.wait_for(self.reader.read(), WAIT)

    async def start_tls(self, context: ssl.SSLContext) -> None:
        await asyncio.wait_for(self.writer.start_tls(context, server_hostname="bridge.test"), WAIT)


@asynccontextmanager
async def raw(host: str, port: int, **kwargs: object) -> AsyncIterator[Raw]:
    reader, writer = await asyncio.open_connection(host, port, **kwargs)  # type: ignore[arg-type]
    try:
        yield Raw(reader, writer)
    finally:
        writer.close()
        with suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def wait_no_sessions(b: RunningBridge) -> None:
    """Yield to the loop until the bridge counts no open session."""

    async def settle() -> None:
        while b.service.tracker.total:
            await asyncio.sleep(0)

    await asyncio.wait_for(settle(), WAIT)


# ---------------------------------------------------------------- STARTTLS


async def test_starttls_offered_and_mail_flows(bridge, tls: TlsFiles, log_lines) -> None:
    async with bridge(tls_config(tls)) as b:
        async with b.client() as smtp:
            await smtp.ehlo()
            assert smtp.supports_extension("starttls")
            await smtp.starttls(tls_context=tls.client_context())
            await smtp.ehlo()
            assert not smtp.supports_extension("starttls")  # once is enough
            errors, reply = await smtp.sendmail("app@example.com", ["bob@example.org"], MESSAGE)
        assert errors == {}
        assert reply.startswith(f"{replies.OK.status} {replies.OK.text} id=")
        assert [r["to"] for r in b.delivered()] == ["bob@example.org"]
    [started] = [line for line in log_lines() if line["event"] == "tls"]
    assert started["implicit"] is False
    assert started["version"] in ("TLSv1.2", "TLSv1.3")


async def test_starttls_twice_is_refused(bridge, tls: TlsFiles) -> None:
    async with bridge(tls_config(tls)) as b, raw(b.host, b.port) as s:
        await s.reply()
        await s.cmd(b"EHLO client.test")
        assert (await s.cmd(b"STARTTLS"))[0].startswith("220 ")
        await s.start_tls(tls.client_context())
        await s.cmd(b"EHLO client.test")
        assert await s.cmd(b"STARTTLS") == [str(replies.TLS_ALREADY_ACTIVE)]
        assert (await s.cmd(b"NOOP"))[0].startswith("250 ")


@pytest.mark.parametrize("config", ["none", "starttls-off"])
async def test_starttls_not_offered(bridge, tls: TlsFiles, config: str) -> None:
    body = ROUTES if config == "none" else tls_config(tls, starttls=False, implicit=True)
    async with bridge(body) as b, raw(b.host, b.port) as s:
        await s.reply()
        ehlo = await s.cmd(b"EHLO client.test")
        assert not any("STARTTLS" in line for line in ehlo)
        assert await s.cmd(b"STARTTLS") == [str(replies.TLS_NOT_AVAILABLE)]


@pytest.mark.parametrize(
    "injected",
    [b"RSET\r\n", b"MAIL FROM:<evil@attacker.example>\r\n", b"EHLO evil\r\nNOOP\r\n"],
    ids=["RSET", "MAIL", "EHLO-NOOP"],
)
async def test_starttls_command_injection_is_discarded(
    bridge, tls: TlsFiles, injected: bytes
) -> None:
    """RFC 3207 5: plaintext sent behind STARTTLS, in the same packet, must not be
    acted on after the handshake (CVE-2011-0411 and its kin)."""
    async with bridge(tls_config(tls)) as b, raw(b.host, b.port) as s:
        await s.reply()
        await s.cmd(b"EHLO client.test")
        s.writer.write(b"STARTTLS\r\n" + injected)  # one write: one packet on loopback
        await s.writer.drain()
        assert (await s.reply())[0].startswith("220 ")
        await s.start_tls(tls.client_context())
        # Had the injected commands run, their replies would come first.
        s.writer.write(b"QUIT\r\n")
        await s.writer.drain()
        after = await s.rest()
        assert after.startswith(b"221 "), after
        assert after.count(b"\r\n") == 1, after
    assert b.sandbox.sent() == []


async def test_session_is_reset_by_starttls(bridge, tls: TlsFiles) -> None:
    """RFC 3207 4.2: the client must EHLO again; nothing from before TLS survives."""
    async with bridge(tls_config(tls)) as b, raw(b.host, b.port) as s:
        await s.reply()
        await s.cmd(b"EHLO client.test")
        await s.cmd(b"STARTTLS")
        await s.start_tls(tls.client_context())
        assert (await s.cmd(b"MAIL FROM:<app@example.com>"))[0].startswith("503 5.5.1 ")


async def test_failed_handshake_frees_the_slot(bridge, tls: TlsFiles, log_lines) -> None:
    async with bridge(tls_config(tls)) as b:
        async with raw(b.host, b.port) as s:
            await s.reply()
            await s.cmd(b"EHLO client.test")
            await s.cmd(b"STARTTLS")
            s.writer.write(b"this is not a TLS ClientHello\r\n" * 4)
            await s.writer.drain()
            assert await s.rest() == b""
        await wait_no_sessions(b)
    failed = [line for line in log_lines() if line["event"] == "tls_failed"]
    assert len(failed) == 1
    assert failed[0]["level"] == "warning"
    assert not [line for line in log_lines() if line["level"] == "error"]


@pytest.mark.parametrize("where", ["implicit", "starttls"])
async def test_client_silent_in_the_handshake_is_timed_out(
    bridge, tls: TlsFiles, where: str
) -> None:
    body = f"smtp: {{timeout: 0.3s, tls: {tls.yaml(implicit=True)}}}\napi: {{timeout: 0.2s}}\n"
    async with bridge(body + ROUTES) as b:
        port = b.tls_port if where == "implicit" else b.port
        async with raw(b.host, port) as s:
            if where == "starttls":
                await s.reply()
                await s.cmd(b"EHLO client.test")
                assert (await s.cmd(b"STARTTLS"))[0].startswith("220 ")
            # No ClientHello: the idle timeout ends it, without a plaintext reply
            # in the middle of what should have been TLS.
            assert await s.rest() == b""
        await wait_no_sessions(b)


# ---------------------------------------------------------------- implicit TLS


async def test_implicit_tls_listener(bridge, tls: TlsFiles, log_lines) -> None:
    async with bridge(tls_config(tls, implicit=True)) as b:
        assert b.tls_port != b.port
        async with b.tls_client(tls.client_context()) as smtp:
            code, _ = await smtp.ehlo()
            assert code == 250
            assert not smtp.supports_extension("starttls")
            errors, reply = await smtp.sendmail("app@example.com", ["bob@example.org"], MESSAGE)
        assert errors == {}
        assert reply.startswith("2.0.0 Ok id=")
        assert len(b.delivered()) == 1
    [started] = [line for line in log_lines() if line["event"] == "tls"]
    assert started["implicit"] is True


async def test_implicit_tls_refuses_plaintext(bridge, tls: TlsFiles) -> None:
    async with bridge(tls_config(tls, implicit=True)) as b:
        async with raw(b.host, b.tls_port) as s:
            s.writer.write(b"EHLO client.test\r\n")
            await s.writer.drain()
            # No banner, no SMTP reply in plaintext: at most a TLS alert, then EOF.
            rest = await s.rest()
            assert b"250" not in rest and b"220" not in rest
        await wait_no_sessions(b)
    assert b.sandbox.sent() == []


def _old_tls(version: ssl.TLSVersion, ca: trustme.CA | None = None) -> ssl.SSLContext:
    """A context limited to ``version`` (deprecated ones too, at OpenSSL's SECLEVEL 0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if ca is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ca.issue_cert("bridge.test").configure_cert(context)
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = version
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
async def test_tls_below_1_2_is_refused(bridge, tls: TlsFiles, version: str) -> None:
    client = _old_tls(ssl.TLSVersion[version])

    # Control: this client does complete a handshake with a server that allows it,
    # so the refusal below is the bridge's doing, not the local OpenSSL's.
    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 old\r\n")
        writer.close()

    old_server = _old_tls(ssl.TLSVersion[version], trustme.CA())
    control = await asyncio.start_server(hello, "127.0.0.1", 0, ssl=old_server)
    async with control:
        port = control.sockets[0].getsockname()[1]
        async with raw("127.0.0.1", port, ssl=client) as s:
            assert (await s.reply()) == ["220 old"]

    async with bridge(tls_config(tls, implicit=True)) as b:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.wait_for(asyncio.open_connection(b.host, b.tls_port, ssl=client), WAIT)
        await wait_no_sessions(b)
        # TLS 1.2 exactly is fine.
        context = tls.client_context()
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        async with raw(b.host, b.tls_port, ssl=context, server_hostname="bridge.test") as s:
            assert (await s.reply())[0].startswith("220 ")


def test_server_context_minimum_version(tls: TlsFiles) -> None:
    context = server_context(tls.cert, tls.key)
    assert context.minimum_version is MINIMUM_VERSION is ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_RENEGOTIATION


# ---------------------------------------------------------------- reload (SIGHUP)


async def _served_by(host: str, port: int, tls: TlsFiles, *, starttls: bool) -> bool:
    """True when the bridge's certificate verifies against ``tls``'s CA."""
    try:
        if starttls:
            async with raw(host, port) as s:
                await s.reply()
                await s.cmd(b"EHLO client.test")
                await s.cmd(b"STARTTLS")
                await s.start_tls(tls.client_context())
                return (await s.cmd(b"NOOP"))[0].startswith("250 ")
        async with raw(host, port, ssl=tls.client_context(), server_hostname="bridge.test") as s:
            return (await s.reply())[0].startswith("220 ")
    except ssl.SSLCertVerificationError:
        return False


async def test_reload_serves_the_renewed_certificate(bridge, tls: TlsFiles, tmp_path: Path) -> None:
    async with bridge(tls_config(tls, implicit=True), config_file=tmp_path / "c.yaml") as b:
        assert await _served_by(b.host, b.port, tls, starttls=True)
        assert await _served_by(b.host, b.tls_port, tls, starttls=False)
        # A session established before the reload keeps working on its own TLS.
        async with b.tls_client(tls.client_context()) as before:
            await before.ehlo()
            renewed = TlsFiles.issue(tmp_path / "tls")  # new CA, same file names
            assert await b.service.reload()
            for starttls, port in ((True, b.port), (False, b.tls_port)):
                assert await _served_by(b.host, port, renewed, starttls=starttls)
                assert not await _served_by(b.host, port, tls, starttls=starttls)
            code, _ = await before.noop()
            assert code == 250


async def test_reload_refuses_a_key_that_does_not_fit(
    bridge, tls: TlsFiles, tmp_path: Path, log_lines
) -> None:
    async with bridge(tls_config(tls, implicit=True), config_file=tmp_path / "c.yaml") as b:
        other = TlsFiles.issue(tmp_path / "other")
        tls.key.write_bytes(other.key.read_bytes())
        assert not await b.service.reload()
        # The running certificate stays.
        assert await _served_by(b.host, b.tls_port, tls, starttls=False)
    [refused] = [line for line in log_lines() if line["event"] == "reload_refused"]
    assert any(
        "smtp.tls.cert" in error and "does not belong" in error for error in refused["errors"]
    )


# ---------------------------------------------------------------- config


def test_check_config_refuses_a_bad_pair(tmp_path: Path, tls: TlsFiles) -> None:
    other = TlsFiles.issue(tmp_path / "other")
    text = (
        f"smtp:\n  tls:\n    cert: {tls.cert}\n    key: {other.key}\nroutes: [{{template_id: X}}]\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, filename="c.yaml", env={})
    [issue] = caught.value.issues
    assert (issue.line, issue.path) == (3, "smtp.tls.cert")
    assert "does not belong" in issue.message


def test_garbage_pem_is_explained(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    with pytest.raises(TlsError, match="expected a PEM certificate chain"):
        server_context(cert, key)


# ---------------------------------------------------------------- the daemon's loop

UVLOOP_CASES = [
    pytest.param(test_starttls_offered_and_mail_flows, {}, id="starttls"),
    pytest.param(
        test_starttls_command_injection_is_discarded, {"injected": b"RSET\r\n"}, id="injection"
    ),
    pytest.param(test_failed_handshake_frees_the_slot, {}, id="failed-handshake"),
    pytest.param(
        test_client_silent_in_the_handshake_is_timed_out,
        {"where": "implicit"},
        id="silent-implicit",
    ),  # fmt: skip
    pytest.param(test_implicit_tls_listener, {}, id="implicit"),
    pytest.param(test_implicit_tls_refuses_plaintext, {}, id="implicit-plaintext"),
]


@pytest.mark.parametrize(("case", "kwargs"), UVLOOP_CASES)
def test_on_uvloop(case, kwargs, tmp_path: Path, tls: TlsFiles, log_lines) -> None:
    wanted = inspect.signature(case).parameters
    extra = {"tls": tls, "log_lines": log_lines}
    run_on_uvloop(case, tmp_path, **kwargs, **{k: v for k, v in extra.items() if k in wanted})
