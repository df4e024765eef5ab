"""SMTP AUTH end to end: no open relay, per-user API keys, throttled guessing."""

from __future__ import annotations

import asyncio
import base64
import ipaddress

import aiosmtplib
import pytest
from conftest import TEST_KEY, TlsFiles

from smtp_bridge import replies
from smtp_bridge.auth import hash_password
from smtp_bridge.auth_throttle import AuthThrottle
from smtp_bridge.sandbox import fingerprint

CRM_PASSWORD = "crm-pa55word-xyz"
OPS_PASSWORD = "ops-pa55word-abc"
CRM_KEY = "crm-own-key-77777"

# Small scrypt cost keeps the suite fast; the format and checks are the real ones.
CRM_HASH = hash_password(CRM_PASSWORD, n=2**10)
OPS_HASH = hash_password(OPS_PASSWORD, n=2**10)

MESSAGE = b"From: crm@example.com\r\nSubject: Invoice 7\r\nMessage-ID: <a1@x>\r\n\r\nHello\r\n"


def auth_config(
    require_tls: bool = False, trusted: str = "10.0.0.0/8", tls: TlsFiles | None = None
) -> str:
    tls_line = f"  tls: {tls.yaml(implicit=True)}\n" if tls is not None else ""
    return f"""
smtp:
{tls_line}  trusted_networks: ["{trusted}"]
  auth:
    require_tls: {str(require_tls).lower()}
    users:
      crm: {{password_hash: "{CRM_HASH}", app_key: "{CRM_KEY}"}}
      ops: {{password_hash: "{OPS_HASH}"}}
routes:
  - name: crm-route
    match: {{user: crm}}
    template_id: E_CRM
  - name: default
    template_id: E_GENERIC
    data: {{subject: "{{{{ subject }}}}"}}
"""


async def _send_as(b, user: str | None, password: str | None) -> tuple[int, str]:
    async with b.client() as smtp:
        await smtp.ehlo()
        if user is not None:
            await smtp.login(user, password)
        await smtp.mail("crm@example.com")
        await smtp.rcpt("bob@example.org")
        code, text = await smtp.data(MESSAGE)
        return code, text


async def test_unauthenticated_untrusted_client_cannot_relay(bridge) -> None:
    async with bridge(auth_config()) as b:
        async with b.client() as smtp:
            await smtp.ehlo()
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as caught:
                await smtp.mail("crm@example.com")
        assert f"{caught.value.code} {caught.value.message}" == str(replies.AUTH_REQUIRED)
        assert b.sandbox.sent() == []


async def test_auth_over_plaintext_is_refused_when_tls_required(bridge) -> None:
    async with bridge(auth_config(require_tls=True)) as b:
        async with b.client() as smtp:
            await smtp.ehlo()
            assert not smtp.supports_extension("auth")
            plain = base64.b64encode(f"\0crm\0{CRM_PASSWORD}".encode()).decode()
            code, text = await smtp.execute_command(b"AUTH", b"PLAIN", plain.encode())
        assert code == 538
        assert text.startswith("5.7.11")
        assert b.sandbox.sent() == []


async def test_trusted_network_may_auth_without_tls(bridge) -> None:
    async with bridge(auth_config(require_tls=True, trusted="127.0.0.0/8")) as b:
        code, _ = await _send_as(b, "crm", CRM_PASSWORD)
        assert code == 250
        assert b.delivered()[0]["template_id"] == "E_CRM"


async def test_wrong_password_gets_535_and_no_relay(bridge) -> None:
    async with bridge(auth_config()) as b:
        async with b.client() as smtp:
            await smtp.ehlo()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as caught:
                await smtp.login("crm", "wrong")
            assert caught.value.code == 535
            assert caught.value.message.startswith("5.7.8")
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await smtp.mail("crm@example.com")
            assert refused.value.code == 530
        assert b.sandbox.sent() == []


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_user_with_own_key_sends_with_it(bridge, mechanism: str) -> None:
    async with bridge(auth_config()) as b:
        async with b.client() as smtp:
            await smtp.ehlo()
            code, _ = await getattr(smtp, f"auth_{mechanism.lower()}")("crm", CRM_PASSWORD)
            assert code == 235
            await smtp.mail("crm@example.com")
            await smtp.rcpt("bob@example.org")
            code, _ = await smtp.data(MESSAGE)
        assert code == 250
        (record,) = b.delivered()
        assert record["key"] == fingerprint(CRM_KEY)
        assert record["template_id"] == "E_CRM"  # match.user routes by user


async def test_user_without_own_key_uses_global_key(bridge) -> None:
    async with bridge(auth_config()) as b:
        code, _ = await _send_as(b, "ops", OPS_PASSWORD)
        assert code == 250
        (record,) = b.delivered()
        assert record["key"] == fingerprint(TEST_KEY)
        assert record["template_id"] == "E_GENERIC"


async def test_repeated_failures_disconnect_with_421(bridge) -> None:
    async with bridge(auth_config()) as b:
        assert b.service.handler is not None
        # Same policy, no tarpit delay, so the test runs in milliseconds.
        b.service.handler.throttle = AuthThrottle(base_delay=0.0, max_delay=0.0,
                                                  disconnect_after=3)  # fmt: skip
        async with b.client() as smtp:
            await smtp.ehlo()
            for _ in range(3):
                with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                    await smtp.auth_plain("crm", "guess")
        # Locked out from this address, even with the right password now; the
        # reply is 421 and the server closes the connection (read raw: client
        # libraries turn a 421 into an exception without the text).
        right = base64.b64encode(f"\0crm\0{CRM_PASSWORD}".encode())
        reader, writer = await asyncio.open_connection(b.host, b.port)
        try:
            await reader.readline()
            writer.write(b"EHLO test\r\n")
            while not (await reader.readline()).startswith(b"250 "):
                pass
            writer.write(b"AUTH PLAIN " + right + b"\r\n")
            reply = (await reader.readline()).decode()
            assert reply == f"{replies.AUTH_TOO_MANY_FAILURES}\r\n"
            assert await reader.read() == b""  # closed by the server
        finally:
            writer.close()
        assert b.sandbox.sent() == []


async def test_passwords_and_keys_never_logged(bridge, log_lines) -> None:
    async with bridge(auth_config()) as b:
        await _send_as(b, "crm", CRM_PASSWORD)
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await _send_as(b, "ops", "not-" + OPS_PASSWORD)
    text = log_lines.text()
    assert "auth_ok" in text and "auth_failed" in text
    for secret in (CRM_PASSWORD, OPS_PASSWORD, CRM_KEY, TEST_KEY, CRM_HASH, OPS_HASH):
        assert secret not in text


# ---------------------------------------------------------------- with real TLS


async def test_starttls_then_right_password_sends_with_users_key(bridge, tls: TlsFiles) -> None:
    async with bridge(auth_config(require_tls=True, tls=tls)) as b:
        async with b.client() as smtp:
            await smtp.ehlo()
            assert not smtp.supports_extension("auth")  # not before TLS
            plain = base64.b64encode(f"\0crm\0{CRM_PASSWORD}".encode())
            code, text = await smtp.execute_command(b"AUTH", b"PLAIN", plain)
            assert f"{code} {text}" == str(replies.AUTH_NEEDS_TLS)
            await smtp.starttls(tls_context=tls.client_context())
            await smtp.ehlo()
            assert smtp.supports_extension("auth")
            code, _ = await smtp.login("crm", CRM_PASSWORD)
            assert code == 235
            await smtp.mail("crm@example.com")
            await smtp.rcpt("bob@example.org")
            code, _ = await smtp.data(MESSAGE)
        assert code == 250
        (record,) = b.delivered()
        assert record["key"] == fingerprint(CRM_KEY)
        assert record["template_id"] == "E_CRM"


async def test_tls_alone_does_not_open_the_relay(bridge, tls: TlsFiles) -> None:
    async with bridge(auth_config(require_tls=True, tls=tls)) as b:
        async with b.client() as smtp:
            await smtp.ehlo()
            await smtp.starttls(tls_context=tls.client_context())
            await smtp.ehlo()
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await smtp.mail("crm@example.com")
            assert f"{refused.value.code} {refused.value.message}" == str(replies.AUTH_REQUIRED)
        assert b.sandbox.sent() == []


async def test_wrong_password_over_tls_gets_535(bridge, tls: TlsFiles) -> None:
    async with bridge(auth_config(require_tls=True, tls=tls)) as b:
        async with b.client() as smtp:
            await smtp.ehlo()
            await smtp.starttls(tls_context=tls.client_context())
            await smtp.ehlo()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as caught:
                await smtp.login("crm", "wrong")
            assert caught.value.code == 535
            assert caught.value.message.startswith("5.7.8")
        assert b.sandbox.sent() == []


async def test_implicit_tls_user_without_key_uses_global_key(bridge, tls: TlsFiles) -> None:
    async with bridge(auth_config(require_tls=True, tls=tls)) as b:
        async with b.tls_client(tls.client_context()) as smtp:
            await smtp.ehlo()
            assert smtp.supports_extension("auth")  # TLS from the first byte
            code, _ = await smtp.login("ops", OPS_PASSWORD)
            assert code == 235
            errors, _ = await smtp.sendmail("ops@example.com", ["bob@example.org"], MESSAGE)
        assert errors == {}
        (record,) = b.delivered()
        assert record["key"] == fingerprint(TEST_KEY)
        assert record["template_id"] == "E_GENERIC"


async def test_trusted_network_still_exempt_with_real_tls(bridge, tls: TlsFiles) -> None:
    config = auth_config(require_tls=True, trusted="127.0.0.0/8", tls=tls)
    async with bridge(config) as b:
        code, _ = await _send_as(b, "crm", CRM_PASSWORD)  # plaintext, from loopback
        assert code == 250
        assert b.delivered()[0]["key"] == fingerprint(CRM_KEY)


# ---------------------------------------------------------------- parallel guessing


async def _raw_auth(host: str, port: int, login: bytes, start: asyncio.Event) -> str:
    """One connection: EHLO, wait for ``start``, AUTH PLAIN; the reply line."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await reader.readline()
        writer.write(b"EHLO test\r\n")
        while not (await reader.readline()).startswith(b"250 "):
            pass
        await start.wait()
        writer.write(b"AUTH PLAIN " + base64.b64encode(login) + b"\r\n")
        await writer.drain()
        return (await reader.readline()).decode().rstrip("\r\n")
    finally:
        writer.close()


async def test_parallel_guesses_get_no_more_checks_than_one_connection(bridge) -> None:
    # The real scrypt cost, so checks overlap on the hashing threads, and a
    # short tarpit, so connections wait past each other's checks as they did
    # when 20 connections got 23 checks.
    slow = hash_password(CRM_PASSWORD)
    async with bridge(auth_config().replace(CRM_HASH, slow)) as b:
        assert b.service.handler is not None
        throttle = AuthThrottle(base_delay=0.01, max_delay=0.04)
        b.service.handler.throttle = throttle
        start = asyncio.Event()
        tasks = [
            asyncio.create_task(_raw_auth(b.host, b.port, f"\0crm\0guess-{i}".encode(), start))
            for i in range(20)
        ]
        await asyncio.sleep(0)  # let the connections queue up their EHLO
        start.set()
        answers = await asyncio.gather(*tasks)
        sample = b.service.metrics.registry.get_sample_value
        checked = sample("smtp_bridge_auth_checks_total", {"result": "failed"})
        invalid = [a for a in answers if a.startswith("535 ")]
        locked = [a for a in answers if a == str(replies.AUTH_TOO_MANY_FAILURES)]
        # Exactly the guesses one connection gets in sequence, and each was a check.
        assert len(invalid) == throttle.disconnect_after == checked
        assert len(locked) == 20 - throttle.disconnect_after
        assert throttle.in_progress(ipaddress.ip_address("127.0.0.1")) == 0
        # Locked out now, even with the right password.
        right = await _raw_auth(b.host, b.port, f"\0crm\0{CRM_PASSWORD}".encode(), start)
        assert right == str(replies.AUTH_TOO_MANY_FAILURES)
        assert sample("smtp_bridge_auth_checks_total", {"result": "ok"}) is None
    assert b.sandbox.sent() == []
