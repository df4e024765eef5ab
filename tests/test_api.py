"""ApiClient against the real sandbox on 127.0.0.1, raw sockets for broken servers,
and httpx.MockTransport for the classification details."""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import json
import logging
import socket
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import aiohttp.abc
import httpx
import pytest
import trustme
from httpx_aiohttp import AiohttpTransport
from hypothesis import given, settings
from hypothesis import strategies as st

from smtp_bridge import __version__
from smtp_bridge.api import USER_AGENT, ApiClient, form_encode, request_fields
from smtp_bridge.outcomes import ApiRequest, ApiResult, ResultKind
from smtp_bridge.replies import reply_for
from smtp_bridge.sandbox import Sandbox

KEY = "sk-live-7f3a9c2e51d04b8e"
REQ = ApiRequest(template_id="E_1001", to="jack@example.com", data={"name": "Jäck"})


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    sb = Sandbox(app_key=KEY, templates={"E_1001"})
    await sb.start()
    try:
        yield sb
    finally:
        await sb.stop()


@pytest.fixture
async def client(sandbox: Sandbox) -> AsyncIterator[ApiClient]:
    async with ApiClient(sandbox.url, timeout=5) as c:
        yield c


def assert_no_key(*things: object) -> None:
    for thing in things:
        assert KEY not in repr(thing)
        assert KEY not in str(thing)


# --- the sandbox answering ------------------------------------------------------------


async def test_delivered(client: ApiClient, sandbox: Sandbox) -> None:
    result = await client.send(REQ, KEY)
    assert result.kind is ResultKind.API
    assert (result.code, result.message) == (200, "Request successful")
    assert result.delivered
    assert result.latency > 0
    record = sandbox.sent()[0]
    assert record["to"] == "jack@example.com"
    assert record["data"] == {"name": "Jäck"}
    assert_no_key(result, client)


@pytest.mark.parametrize(
    ("request_", "key", "script", "code", "smtp"),
    [
        (REQ, "", None, 40001, "451 4.3.5"),
        (REQ, "sk-wrong", None, 40002, "451 4.3.5"),
        (ApiRequest("E_404", "jack@example.com"), KEY, None, 40003, "451 4.3.5"),
        (ApiRequest("E_1001", ""), KEY, None, 40004, "451 4.3.0"),
        (ApiRequest("E_1001", "Jack <jack@example.com>"), KEY, None, 40005, "550 5.1.3"),
        (ApiRequest("E_1001", "jack@example.com", reply_to="nope"), KEY, None, 40006, "451 4.3.0"),
        (REQ, KEY, {"code": 40007}, 40007, "451 4.3.2"),
        (REQ, KEY, {"code": 40008}, 40008, "554 5.6.0"),
        (REQ, KEY, {"code": 40099, "message": "new"}, 40099, "451 4.3.0"),
    ],
    ids=[
        "40001-empty-key",
        "40002-wrong-key",
        "40003-template",
        "40004-empty-to",
        "40005-display-name",
        "40006-reply-to",
        "40007-scripted",
        "40008-scripted",
        "unknown-code-scripted",
    ],
)
async def test_api_codes(
    client: ApiClient,
    sandbox: Sandbox,
    request_: ApiRequest,
    key: str,
    script: dict[str, Any] | None,
    code: int,
    smtp: str,
) -> None:
    if script is not None:
        sandbox.script(script)
    result = await client.send(request_, key)
    assert (result.kind, result.code) == (ResultKind.API, code)
    assert not result.delivered
    assert str(reply_for(result)).startswith(smtp + " ")
    assert sandbox.sent()[0]["code"] == code


@pytest.mark.parametrize("encoding", ["form", "json"])
async def test_encodings(sandbox: Sandbox, encoding: Any) -> None:
    request = ApiRequest(
        "E_1001",
        "jack@example.com",
        data={"name": "Jäck", "n": 3, "nested": {"a": [1, 2]}},
        alias="Shop",
        reply_to="help@example.com",
        is_random=False,
    )
    async with ApiClient(sandbox.url, encoding=encoding) as client:
        result = await client.send(request, KEY)
        assert result.delivered
        bare = await client.send(ApiRequest("E_1001", "jill@example.com", alias=""), KEY)
        assert bare.delivered
    full, minimal = sandbox.sent()[1], sandbox.sent()[0]
    assert full["encoding"] == encoding
    assert full["data"] == {"name": "Jäck", "n": 3, "nested": {"a": [1, 2]}}
    assert (full["alias"], full["reply_to"], full["is_random"]) == ("Shop", "help@example.com", "0")
    assert minimal["data"] == {}
    assert (minimal["alias"], minimal["reply_to"], minimal["is_random"]) == (None, None, None)


async def test_user_agent(client: ApiClient, sandbox: Sandbox) -> None:
    await client.send(REQ, KEY)
    assert sandbox.sent()[0]["user_agent"] == f"smtp-bridge/{__version__}" == USER_AGENT


async def test_http_429_with_retry_after(client: ApiClient, sandbox: Sandbox) -> None:
    sandbox.script({"status": 429, "headers": {"Retry-After": "7"}, "body": "slow down"})
    result = await client.send(REQ, KEY)
    assert (result.kind, result.http_status, result.retry_after) == (ResultKind.HTTP, 429, 7.0)
    assert result.code is None
    assert str(reply_for(result)).startswith("451 4.4.5 ")


@pytest.mark.parametrize(("status", "smtp"), [(502, "451 4.4.1"), (413, "552 5.3.4")])
async def test_http_error_status(
    client: ApiClient, sandbox: Sandbox, status: int, smtp: str
) -> None:
    sandbox.script({"status": status, "body": "<html>nginx</html>"})
    result = await client.send(REQ, KEY)
    assert (result.kind, result.http_status, result.retry_after) == (ResultKind.HTTP, status, None)
    assert str(reply_for(result)).startswith(smtp + " ")


@pytest.mark.parametrize(
    "body",
    ["<html>captive portal</html>", '{"code": "200"}', "[200]", '{"code": true}', ""],
    ids=["html", "code-as-string", "array", "code-bool", "empty"],
)
async def test_200_without_api_json(client: ApiClient, sandbox: Sandbox, body: str) -> None:
    sandbox.script({"status": 200, "body": body})
    result = await client.send(REQ, KEY)
    assert result.kind is ResultKind.BAD_BODY
    assert str(reply_for(result)).startswith("451 4.3.0 ")


async def test_reset_after_sending_is_unknown(client: ApiClient, sandbox: Sandbox) -> None:
    sandbox.script({"action": "reset"})
    result = await client.send(REQ, KEY)
    assert result.kind is ResultKind.UNKNOWN
    assert str(reply_for(result)).startswith("451 4.4.2 ")
    assert sandbox.sent()[0]["to"] == "jack@example.com"  # it did arrive
    # The client recovers: the next call gets a fresh connection.
    assert (await client.send(REQ, KEY)).delivered


async def test_hang_is_unknown(sandbox: Sandbox) -> None:
    sandbox.script({"action": "hang"})
    async with ApiClient(sandbox.url, timeout=0.3) as client:
        result = await client.send(REQ, KEY)
    assert result.kind is ResultKind.UNKNOWN
    assert 0.3 <= result.latency < 5
    assert str(reply_for(result)).startswith("451 4.4.2 ")


# --- the request never left --------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_connection_refused_is_never_sent() -> None:
    async with ApiClient(f"http://127.0.0.1:{closed_port()}/index/api/send_email") as client:
        result = await client.send(REQ, KEY)
    assert result.kind is ResultKind.NEVER_SENT
    assert result.message == "connection refused"
    assert str(reply_for(result)).startswith("451 4.4.1 ")
    assert_no_key(result)


class _NoDns(aiohttp.abc.AbstractResolver):
    """Answers every lookup like getaddrinfo for an unknown name, without any network."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[Any]:
        raise OSError(socket.EAI_NONAME, "Name or service not known")

    async def close(self) -> None:
        pass


class _SlowDns(_NoDns):
    """A lookup that never finishes."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_unresolvable_host_is_never_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    # The resolver is replaced so that no DNS query leaves the machine.
    monkeypatch.setattr(aiohttp.connector, "DefaultResolver", _NoDns)
    async with ApiClient("http://nonexistent.invalid/index/api/send_email") as client:
        result = await client.send(REQ, KEY)
    assert (result.kind, result.message) == (ResultKind.NEVER_SENT, "DNS lookup failed")


async def test_timeout_before_connecting_is_never_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiohttp.connector, "DefaultResolver", _SlowDns)
    async with ApiClient("http://slow.invalid/index/api/send_email", timeout=0.2) as client:
        result = await client.send(REQ, KEY)
    assert result.kind is ResultKind.NEVER_SENT


async def test_untrusted_tls_certificate_is_never_sent() -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(65536))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        async with ApiClient(f"https://127.0.0.1:{port}/index/api/send_email") as client:
            result = await client.send(REQ, KEY)
    finally:
        server.close()
        await server.wait_closed()
    assert (result.kind, result.message) == (ResultKind.NEVER_SENT, "TLS certificate rejected")
    assert not any(received)  # not one byte of the request reached the server


# --- broken servers ---------------------------------------------------------------------


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[bytes], Awaitable[str]]]:
    """A TCP server on 127.0.0.1 that reads one request and answers fixed bytes."""
    servers: list[asyncio.Server] = []

    async def start(answer: bytes) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                writer.write(answer)
                await writer.drain()
            finally:
                writer.close()
                await writer.wait_closed()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/index/api/send_email"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"garbage\r\n\r\n", "malformed response"),
        (b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"code"', "response body incomplete"),
        (b"", "server disconnected after sending"),
    ],
    ids=["garbage-status-line", "truncated-body", "closed-without-answer"],
)
async def test_broken_answers_are_unknown(
    raw_server: Callable[[bytes], Awaitable[str]], answer: bytes, message: str
) -> None:
    url = await raw_server(answer)
    async with ApiClient(url) as client:
        result = await client.send(REQ, KEY)
    assert (result.kind, result.message) == (ResultKind.UNKNOWN, message)


# --- secrets ---------------------------------------------------------------------------


async def test_key_never_in_results_reprs_or_logs(
    sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    results: list[ApiResult] = []
    sandbox.script({"action": "reset"}, {"status": 503}, {"code": 40002})
    async with ApiClient(sandbox.url, timeout=2) as client:
        for _ in range(4):
            results.append(await client.send(REQ, KEY))
        assert_no_key(client)
    async with ApiClient(f"http://127.0.0.1:{closed_port()}/") as client:
        results.append(await client.send(REQ, KEY))
    assert [r.kind for r in results] == [
        ResultKind.UNKNOWN,
        ResultKind.HTTP,
        ResultKind.API,
        ResultKind.API,
        ResultKind.NEVER_SENT,
    ]
    assert_no_key(*results)
    for record in caplog.records:
        assert KEY not in record.getMessage()
        assert KEY not in repr(record.args)
        assert record.exc_info is None


def test_repr_hides_url_credentials() -> None:
    client = ApiClient("https://user:pw@api.example.com/send?token=abc")
    try:
        assert "pw" not in repr(client)
        assert "token" not in repr(client)
    finally:
        # Never used, so there is no session to close; aclose is still safe.
        asyncio.run(client.aclose())


# --- MockTransport unit tests ------------------------------------------------------------


def mock(handler: Callable[[httpx.Request], Any], **kwargs: Any) -> ApiClient:
    return ApiClient(
        "https://api.test/index/api/send_email", transport=httpx.MockTransport(handler), **kwargs
    )


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"code": 200, "message": "Request successful"})


@pytest.mark.parametrize("block", range(0, 0x110000, 0x10000))
def test_form_encode_is_urlencode_for_every_code_point(block: int) -> None:
    text = "".join(chr(c) for c in range(block, block + 0x10000) if not 0xD800 <= c < 0xE000)
    fields = {"data": text, "k y&=": "a b+c%", "": "", "app_key": "K\u00e9/?#"}
    assert form_encode(fields) == urllib.parse.urlencode(fields).encode()


_FORM_TEXT = st.text(
    alphabet=st.sampled_from(list('aZ09_.-~ +%&=?/#{}":,\\\r\n\x00\x7fé€😀')), max_size=40
)


@settings(max_examples=500)
@given(st.dictionaries(_FORM_TEXT, _FORM_TEXT, max_size=4))
def test_form_encode_is_urlencode_on_generated_text(fields: dict[str, str]) -> None:
    assert form_encode(fields) == urllib.parse.urlencode(fields).encode()


@pytest.mark.parametrize(
    "text", ["%2B", "+ %", "a b+c%d", "%%++  ", "100% + 1", "+", "%", " ", "", "é+%"]
)
def test_form_encode_never_quotes_a_replacement_again(text: str) -> None:
    fields = {"data": text}
    assert form_encode(fields) == urllib.parse.urlencode(fields).encode()


async def test_form_body_exactly() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return ok(request)

    request = ApiRequest("E_1", "a@example.com", data={"name": "Jäck"}, is_random=True)
    async with mock(handler) as client:
        assert (await client.send(request, KEY)).delivered
    sent = seen[0]
    assert sent.headers["content-type"] == "application/x-www-form-urlencoded"
    assert sent.headers["user-agent"] == USER_AGENT
    form = urllib.parse.parse_qs(sent.content.decode(), keep_blank_values=True)
    assert form == {
        "app_key": [KEY],
        "template_id": ["E_1"],
        "to": ["a@example.com"],
        "data": ['{"name":"Jäck"}'],  # compact, not ASCII-escaped
        "is_random": ["1"],
    }


async def test_json_body_exactly() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return ok(request)

    request = ApiRequest("E_1", "a@example.com", data={"n": 1}, alias="Shop", is_random=False)
    async with mock(handler, encoding="json") as client:
        assert (await client.send(request, KEY)).delivered
    assert seen[0].headers["content-type"] == "application/json"
    assert json.loads(seen[0].content) == {
        "app_key": KEY,
        "template_id": "E_1",
        "to": "a@example.com",
        "data": {"n": 1},
        "alias": "Shop",
        "is_random": 0,
    }


async def test_message_is_cleaned_truncated_and_redacted() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        text = f"bad\r\nkey {KEY}\x1b[31m \u202e" + "x" * 500
        return httpx.Response(200, json={"code": 40002, "message": text})

    async with mock(handler) as client:
        result = await client.send(REQ, KEY)
    assert result.code == 40002
    assert result.message.startswith("badkey ***[31m x")
    assert len(result.message) == 200
    assert_no_key(result)


async def test_oversized_200_body_is_bad_body() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b" " * 70_000 + b'{"code": 200}')

    async with mock(handler) as client:
        result = await client.send(REQ, KEY)
    assert result.kind is ResultKind.BAD_BODY


@pytest.mark.parametrize(
    ("header", "low", "high"),
    [
        ("120", 120, 120),
        ("0", 0, 0),
        ("soon", None, None),
        ("-5", None, None),
        # HTTP dates are written when the test runs (see below), not at collection.
        ("date:+60", 50, 61),
        ("date:-3600", 0, 0),
    ],
    ids=["delta", "zero", "garbage", "negative", "http-date-future", "http-date-past"],
)
async def test_retry_after_parsing(header: str, low: float | None, high: float | None) -> None:
    if header.startswith("date:"):
        when = datetime.now(UTC) + timedelta(seconds=int(header.removeprefix("date:")))
        header = email.utils.format_datetime(when, True)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": header})

    async with mock(handler) as client:
        result = await client.send(REQ, KEY)
    if low is None:
        assert result.retry_after is None
    else:
        assert result.retry_after is not None
        assert low <= result.retry_after <= (high or 0)


def test_retry_after_of_any_length_stays_finite_with_the_time_passed_in() -> None:
    from smtp_bridge.api_answers import parse_retry_after

    assert parse_retry_after("3600") == 3600.0
    assert parse_retry_after("99999999999999999999") == 1e12  # was 1e20; cut by the gate
    assert parse_retry_after("9" * 400) == 1e12  # float(int()) would overflow
    now = datetime(2026, 1, 1, tzinfo=UTC)
    later = email.utils.format_datetime(now + timedelta(hours=2), True)
    assert parse_retry_after(later, now) == 7200.0
    assert parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now) is not None


def _raise(exc: BaseException) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


def _lossy(original: BaseException, mapped: type[Exception]) -> BaseException:
    """What httpx_aiohttp raises: ``mapped(str(original)) from original``."""
    try:
        raise mapped(str(original)) from original
    except Exception as exc:
        return exc


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (httpx.ConnectError("refused"), ResultKind.NEVER_SENT),
        (httpx.ConnectTimeout("slow"), ResultKind.NEVER_SENT),
        (httpx.PoolTimeout("full"), ResultKind.NEVER_SENT),
        (httpx.ReadTimeout("slow"), ResultKind.UNKNOWN),
        (httpx.WriteTimeout("slow"), ResultKind.UNKNOWN),
        (httpx.RemoteProtocolError("bad"), ResultKind.UNKNOWN),
        (httpx.ReadError("reset"), ResultKind.UNKNOWN),
        # httpx_aiohttp turns a disconnect (a ClientConnectionError) into ConnectTimeout.
        (
            _lossy(aiohttp.ServerDisconnectedError(), httpx.ConnectTimeout),
            ResultKind.UNKNOWN,
        ),
        (
            _lossy(aiohttp.ClientOSError(104, "reset"), httpx.ConnectTimeout),
            ResultKind.UNKNOWN,
        ),
        (
            _lossy(aiohttp.ConnectionTimeoutError("slow"), httpx.TimeoutException),
            ResultKind.NEVER_SENT,
        ),
        (
            _lossy(aiohttp.SocketTimeoutError("slow"), httpx.ReadTimeout),
            ResultKind.UNKNOWN,
        ),
        (RuntimeError("something odd"), ResultKind.UNKNOWN),
    ],
    ids=[
        "connect-error",
        "connect-timeout",
        "pool-timeout",
        "read-timeout",
        "write-timeout",
        "protocol-error",
        "read-error",
        "lossy-disconnect",
        "lossy-os-error",
        "lossy-connection-timeout",
        "lossy-socket-timeout",
        "unrecognised",
    ],
)
async def test_exception_classification(exc: BaseException, kind: ResultKind) -> None:
    async with mock(_raise(exc)) as client:
        result = await client.send(REQ, KEY)
    assert result.kind is kind
    assert str(exc) not in result.message or not str(exc)


async def test_concurrency_is_capped() -> None:
    in_flight = 0
    peak = 0
    gate = asyncio.Event()
    two_in = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        if in_flight >= 2:
            two_in.set()
        await gate.wait()
        in_flight -= 1
        return ok(request)

    async with mock(handler, max_concurrency=2) as client:
        calls = [asyncio.create_task(client.send(REQ, KEY)) for _ in range(6)]
        await two_in.wait()
        gate.set()
        results = await asyncio.gather(*calls)
    assert all(r.delivered for r in results)
    assert peak == 2


async def test_timeout_waiting_for_a_slot_is_never_sent() -> None:
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        entered.set()
        await gate.wait()
        return ok(request)

    async with mock(handler, max_concurrency=1, timeout=0.2) as client:
        first = asyncio.create_task(client.send(REQ, KEY))
        await entered.wait()
        second = await client.send(REQ, KEY)
        # The first call holds the only slot; it was admitted and the backstop fired.
        first_result = await first
        gate.set()
    assert (second.kind, second.message) == (
        ResultKind.NEVER_SENT,
        "timed out waiting for a free API slot",
    )
    assert first_result.kind is ResultKind.UNKNOWN


async def test_backstop_without_proof_is_unknown() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async with mock(handler, timeout=0.2) as client:
        result = await client.send(REQ, KEY)
    assert (result.kind, result.message) == (ResultKind.UNKNOWN, "timed out after sending")


async def test_unserialisable_data_raises_without_sending() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return ok(request)

    async with mock(handler) as client:
        with pytest.raises(ValueError, match="not JSON-serialisable") as info:
            await client.send(ApiRequest("E_1", "a@example.com", data={"x": {1, 2}}), KEY)
        with pytest.raises(ValueError):
            await client.send(ApiRequest("E_1", "a@example.com", data={"x": float("nan")}), KEY)
    assert calls == []
    assert KEY not in str(info.value)
    assert info.value.__cause__ is None


@pytest.mark.parametrize(
    "kwargs",
    [{"encoding": "xml"}, {"timeout": 0}, {"max_concurrency": 0}],
    ids=["encoding", "timeout", "concurrency"],
)
def test_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ApiClient("http://127.0.0.1:1/", **kwargs)


async def test_cancellation_propagates() -> None:
    entered = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async with mock(handler) as client:
        call = asyncio.create_task(client.send(REQ, KEY))
        await entered.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call


# --- the request as httpx.AsyncClient sent it, and the response always closed -----------


def reference_client(transport: httpx.AsyncBaseTransport) -> httpx.AsyncClient:
    """Configured as ApiClient's own client: what its ``post`` sends is the standard."""
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(5),
        headers={"User-Agent": USER_AGENT},
        follow_redirects=False,
        trust_env=False,
    )


async def reference_post(
    client: httpx.AsyncClient, url: str, request: ApiRequest, encoding: Any
) -> httpx.Response:
    fields = request_fields(request, KEY, encoding)
    if encoding == "form":
        return await client.post(url, data=fields)
    content = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()
    return await client.post(url, content=content, headers={"Content-Type": "application/json"})


#: Every UTF-8 byte value occurs in the form body: all of U+0001..U+07FF, three-
#: and four-byte characters, and the characters the form encoding treats specially.
EVERY_BYTE = "".join(map(chr, range(1, 0x800))) + "\u0800\uffff😀\U0010ffff +&=%"
WIDE = ApiRequest(
    "E_1001",
    "jäck+1@example.com",
    data={"name": "Jäck", "text": EVERY_BYTE, "n": [1, 2.5, None, True]},
    alias=EVERY_BYTE,
    reply_to="help@example.com",
    is_random=True,
)


@pytest.mark.parametrize("encoding", ["form", "json"])
@pytest.mark.parametrize(
    "url",
    [
        "https://api.test/index/api/send_email",
        "http://api.test:8080/index/api/send_email?token=a%20b&x=1",
        "https://us%40r:p%C3%A4ss@api.test/index/api/send_email",
    ],
    ids=["plain", "port-and-query", "credentials"],
)
async def test_request_is_what_httpx_client_built(encoding: Any, url: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return ok(request)

    async with ApiClient(
        url, encoding=encoding, timeout=5, transport=httpx.MockTransport(handler)
    ) as client:
        for request in (WIDE, REQ):
            assert (await client.send(request, KEY)).delivered
    async with reference_client(httpx.MockTransport(handler)) as reference:
        for request in (WIDE, REQ):
            await reference_post(reference, url, request, encoding)
    ours, theirs = seen[:2], seen[2:]
    for a, b in zip(ours, theirs, strict=True):
        assert (a.method, a.url) == (b.method, b.url)
        assert a.headers.raw == b.headers.raw  # names, values and order
        assert a.content == b.content
        assert a.extensions["timeout"] == b.extensions["timeout"]
    assert ours[0].content != ours[1].content


@pytest.mark.parametrize("encoding", ["form", "json"])
async def test_bytes_on_the_socket_are_unchanged(encoding: Any) -> None:
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.partition(b":")[2])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        received.append(head + await reader.readexactly(length))
        body = b'{"code":200,"message":"Request successful"}'
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/index/api/send_email"
    try:
        async with ApiClient(url, encoding=encoding) as client:
            assert (await client.send(WIDE, KEY)).delivered
        async with reference_client(AiohttpTransport()) as reference:
            assert (await reference_post(reference, url, WIDE, encoding)).status_code == 200
    finally:
        server.close()
        await server.wait_closed()
    ours, theirs = received
    assert ours == theirs
    assert ours.startswith(b"POST /index/api/send_email HTTP/1.1\r\n")
    assert b"\r\nuser-agent: " + USER_AGENT.encode() + b"\r\n" in ours.lower()


@pytest.mark.parametrize("encoding", ["form", "json"])
async def test_unencodable_text_is_never_sent(sandbox: Sandbox, encoding: Any) -> None:
    # A lone surrogate (undecodable SMTP input, say) has no UTF-8 form.
    request = ApiRequest("E_1001", "jack@example.com", alias="J\udce4ck")
    async with ApiClient(sandbox.url, encoding=encoding) as client:
        result = await client.send(request, KEY)
    assert (result.kind, result.message) == (ResultKind.NEVER_SENT, "failed before connecting")
    assert sandbox.sent() == []


async def test_invalid_url_is_never_sent() -> None:
    async with ApiClient("http://[::1/index/api/send_email") as client:
        result = await client.send(REQ, KEY)
    assert (result.kind, result.message) == (ResultKind.NEVER_SENT, "invalid API URL")


@pytest.mark.parametrize("used", [True, False], ids=["used", "never-used"])
async def test_closed_client_sends_nothing(sandbox: Sandbox, used: bool) -> None:
    client = ApiClient(sandbox.url)
    if used:
        assert (await client.send(REQ, KEY)).delivered
    await client.aclose()
    result = await client.send(REQ, KEY)
    assert result.kind is ResultKind.NEVER_SENT
    assert len(sandbox.sent()) == int(used)


class _Body(httpx.AsyncByteStream):
    """A response body that counts the chunks read and records being closed."""

    def __init__(self, *chunks: bytes, then: Callable[[], Awaitable[None]] | None = None):
        self.chunks = chunks
        self.then = then
        self.read = 0
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.read += 1
            yield chunk
        if self.then is not None:
            await self.then()

    async def aclose(self) -> None:
        self.closed = True


async def _broken() -> None:
    raise httpx.ReadError("connection reset")


async def _stalled() -> None:
    await asyncio.Event().wait()


BIG = b" " * 16384


@pytest.mark.parametrize(
    ("status", "headers", "body", "result", "read"),
    [
        (200, {}, _Body(b'{"code":200,', b'"message":"ok"}'), (ResultKind.API, "ok"), 2),
        (503, {}, _Body(b"<html>" * 1000), (ResultKind.HTTP, "HTTP 503"), 0),
        (
            200,
            {"Content-Length": "70000"},
            _Body(BIG, BIG, BIG, BIG, BIG),
            (ResultKind.BAD_BODY, "response too large"),
            0,
        ),
        (200, {}, _Body(*[BIG] * 10), (ResultKind.BAD_BODY, "response too large"), 5),
        (
            200,
            {},
            _Body(b'{"code"', then=_broken),
            (ResultKind.UNKNOWN, "connection error after sending"),
            1,
        ),
        (
            200,
            {},
            _Body(b'{"code"', then=_stalled),
            (ResultKind.UNKNOWN, "timed out after sending"),
            1,
        ),
    ],
    ids=["answer", "http-error", "too-large-by-length", "too-large-read", "broken", "stalled"],
)
async def test_response_is_always_closed(
    status: int,
    headers: dict[str, str],
    body: _Body,
    result: tuple[ResultKind, str],
    read: int,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers=headers, stream=body)

    async with mock(handler, timeout=0.3) as client:
        answer = await client.send(REQ, KEY)
    assert (answer.kind, answer.message) == result
    assert body.read == read  # an unwanted body is not read, a large one not to the end
    assert body.closed


async def test_response_is_closed_on_cancellation() -> None:
    body = _Body(b'{"code"', then=_stalled)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=body)

    async with mock(handler) as client:
        call = asyncio.create_task(client.send(REQ, KEY))
        while not body.read:
            await asyncio.sleep(0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    assert body.closed


@pytest.mark.parametrize(
    ("payload", "result"),
    [
        (b'{"code": 200, "message": "ok"}', (ResultKind.API, "ok")),
        (b" " * 200_000 + b'{"code": 200}', (ResultKind.BAD_BODY, "response too large")),
    ],
    ids=["small", "large-once-decoded"],
)
async def test_compressed_body_is_decoded_and_capped(
    payload: bytes, result: tuple[ResultKind, str]
) -> None:
    compressed = gzip.compress(payload)
    assert len(compressed) < 2048  # the cap applies to the decoded body

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=compressed)

    async with mock(handler) as client:
        answer = await client.send(REQ, KEY)
    assert (answer.kind, answer.message) == result


async def test_one_connection_serves_every_kind_of_answer(sandbox: Sandbox) -> None:
    # Each response must go back to the pool (or be closed) before the next call:
    # with a single connection allowed, one left open stalls every later call.
    scripts: list[dict[str, Any]] = [
        # Bodies larger than aiohttp buffers, so they never complete on their own.
        {"status": 503, "body": "x" * 1_000_000},
        {"status": 200, "body": " " * 1_000_000},
        {"status": 429, "headers": {"Retry-After": "3"}},
        {"status": 200, "body": "<html>"},
        {"code": 40007},
    ]
    sandbox.script(*scripts * 4)
    kinds = [ResultKind.HTTP, ResultKind.BAD_BODY, ResultKind.HTTP, ResultKind.BAD_BODY]
    expected = (kinds + [ResultKind.API]) * 4 + [ResultKind.API] * 20
    results: list[ApiResult] = []
    async with ApiClient(sandbox.url, max_concurrency=1, timeout=2) as client:
        for kind in expected:
            results.append(await client.send(REQ, KEY))
            # A stalled pool shows as "timed out before connecting".
            assert results[-1].kind is kind, (len(results), results[-1])
    assert all(r.delivered for r in results[-20:])
