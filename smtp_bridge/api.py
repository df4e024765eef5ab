"""ApiClient: one AOTsend call per :class:`ApiRequest`, classified into an :class:`ApiResult`.

The thin IO layer between the delivery policy and the network. Its one hard job
is telling "the request never left" (safe to retry, docs/replies.md ``451 4.4.1``)
from "it left and we got no answer" (outcome unknown, ``451 4.4.2``): the
failure's exception and how far the call got (api_failures.py) decide it, and
what the API answered is read by api_answers.py.

Neither the API key nor exception text ever reaches an ApiResult, a log record
or a repr: failures are described by fixed phrases.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, Self

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from smtp_bridge import __version__
from smtp_bridge.api_answers import parse_api_body, parse_retry_after, read_capped
from smtp_bridge.api_failures import (
    CALL_PROGRESS,
    Progress,
    classify,
    classify_deadline,
    connection_trace,
    origin,
)
from smtp_bridge.outcomes import ApiRequest, ApiResult, ResultKind

__all__ = ["ApiClient", "USER_AGENT", "form_encode", "request_fields"]

log = logging.getLogger(__name__)

USER_AGENT = f"smtp-bridge/{__version__}"

#: Idle keep-alive connections are dropped well before a typical server's own
#: keep-alive timeout, so a POST rarely meets a connection the server is closing
#: (aiohttp never retries a POST, and that race would read as "outcome unknown").
_KEEPALIVE_EXPIRY = 5.0
#: ``application/x-www-form-urlencoded`` as ``urllib.parse.urlencode`` (what httpx
#: uses for ``data=``) writes it, per UTF-8 byte: unreserved bytes as they are,
#: space as ``+``, any other byte as ``%XX``.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")
_FORM_BYTES = [
    chr(b) if b in _UNRESERVED else "+" if b == 0x20 else f"%{b:02X}" for b in range(256)
]


def _redact_url(url: str) -> str:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return "<invalid url>"
    return str(parsed.copy_with(userinfo=b"", query=None))


#: What :meth:`ApiClient._post` found: kind, code, HTTP status, message, Retry-After.
_Answer = tuple[ResultKind, int | None, int | None, str, float | None]


def form_encode(fields: dict[str, str]) -> bytes:
    """``urllib.parse.urlencode(fields).encode()``, by ``str.replace`` or ``str.translate``.

    urlencode quotes byte by byte in a Python list comprehension; for a 2 KiB
    rendered body that was 4% of the daemon's CPU. Same bytes (tests compare the
    two over every code point and on generated text).
    """
    return "&".join(
        [_form_quote(key) + "=" + _form_quote(value) for key, value in fields.items()]
    ).encode()


def _form_quote(text: str) -> str:
    # Latin-1 maps each UTF-8 byte to the code point of the same number.
    text = text.encode().decode("latin-1")
    unsafe = set(text)
    unsafe -= _FORM_SAFE
    if len(unsafe) > _FEW_UNSAFE:
        return text.translate(_FORM_BYTES)  # one lookup per character
    # Few distinct characters to quote (a rendered body in JSON has about 8): one
    # str.replace pass each, half the time of translate on a 2 KiB body. "%" goes
    # first and "+" second, so no replacement is quoted again.
    for char in ("%", "+"):
        if char in unsafe:
            text = text.replace(char, _FORM_BYTES[ord(char)])
            unsafe.discard(char)
    for char in unsafe:
        text = text.replace(char, _FORM_BYTES[ord(char)])
    return text


_FORM_SAFE = frozenset(chr(b) for b in _UNRESERVED)
_FEW_UNSAFE = 16


def _url_authorization(url: httpx.URL | None) -> str | None:
    """The Authorization header httpx.AsyncClient adds for credentials in the URL.

    Kept as it was: aiohttp refuses a request that has both (never sent).
    """
    if url is None or not (url.username or url.password):
        return None
    auth = httpx.BasicAuth(url.username, url.password)
    authorized = next(auth.sync_auth_flow(httpx.Request("POST", url)))
    return authorized.headers["Authorization"]


def request_fields(
    request: ApiRequest, app_key: str, encoding: Literal["form", "json"] = "form"
) -> dict[str, Any]:
    """The request fields (docs/upstream-api.md), as sent; also what ``smtp-bridge route`` prints.

    ValueError if ``data`` is not JSON-serialisable.
    """
    body: dict[str, Any] = {
        "app_key": app_key,
        "template_id": request.template_id,
        "to": request.to,
    }
    try:
        data_json = json.dumps(
            request.data, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        )
    except (TypeError, ValueError):
        raise ValueError("request data is not JSON-serialisable") from None
    body["data"] = data_json if encoding == "form" else request.data
    if request.alias:
        body["alias"] = request.alias
    if request.reply_to:
        body["reply_to"] = request.reply_to
    if request.is_random is not None:
        flag = int(request.is_random)
        body["is_random"] = str(flag) if encoding == "form" else flag
    return body


class ApiClient:
    """Sends :class:`ApiRequest` s to the AOTsend API over one shared HTTP client.

    ``timeout`` bounds the whole call, waiting for a concurrency slot included;
    ``max_concurrency`` caps calls in flight. ``transport`` replaces the default
    aiohttp transport (tests pass ``httpx.MockTransport``). The API key is an
    argument of :meth:`send`, never stored.
    """

    def __init__(
        self,
        url: str,
        *,
        encoding: Literal["form", "json"] = "form",
        timeout: float = 10.0,
        max_concurrency: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if encoding not in ("form", "json"):
            raise ValueError(f"encoding must be 'form' or 'json', got {encoding!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout!r}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency!r}")
        self._url = url
        self._encoding = encoding
        self._timeout = timeout
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self.settings = (url, encoding, timeout, max_concurrency)
        # Calls in flight, so a client replaced on reload closes only once idle.
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        self._traced = transport is None
        if transport is None:
            transport = self._default_transport(max_concurrency)
        # The client owns the transport (aclose, is_closed); calls go straight to the
        # transport with a request built here, because the client's per-call layers
        # (header and cookie merging, auth, redirects, event hooks, cookie extraction)
        # cost more CPU than the rest of the call and do nothing for this client.
        self._transport = transport
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(timeout),
            headers={"User-Agent": USER_AGENT},
            follow_redirects=False,
            trust_env=False,  # no proxies from the environment: the URL is the URL
        )
        self._timeout_extension = httpx.Timeout(timeout).as_dict()
        try:
            self._wire_url: httpx.URL | None = httpx.URL(url)
        except httpx.InvalidURL:
            self._wire_url = None  # each call raises it again, and classifies it
        # What httpx.AsyncClient.build_request would send, in its order: Host, the
        # client's Accept, Accept-Encoding, Connection and User-Agent, then the
        # content headers (form: Content-Length, Content-Type; JSON the other way).
        host = [(b"Host", self._wire_url.netloc)] if self._wire_url is not None else []
        self._base_headers = httpx.Headers(host + self._client.headers.raw)
        self._url_auth = _url_authorization(self._wire_url)

    @staticmethod
    def _default_transport(max_concurrency: int) -> AiohttpTransport:
        trace = connection_trace()
        transport = AiohttpTransport()

        def make_session() -> aiohttp.ClientSession:
            # Called lazily by the transport inside the running loop.
            connector = aiohttp.TCPConnector(
                limit=max_concurrency,
                keepalive_timeout=_KEEPALIVE_EXPIRY,
                ssl=transport.ssl_context,
            )
            return aiohttp.ClientSession(connector=connector, trace_configs=[trace])

        factory: Callable[[], aiohttp.ClientSession] = make_session
        transport.client = factory
        return transport

    def __repr__(self) -> str:
        return f"ApiClient(url={_redact_url(self._url)!r}, encoding={self._encoding!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    @property
    def in_flight(self) -> int:
        """Calls started and not yet finished."""
        return self._in_flight

    async def aclose_when_idle(self) -> None:
        """Close once the calls in flight have finished (a client replaced on reload).

        Each call is bounded by ``timeout``, so this waits at most that long.
        """
        while self._in_flight:
            self._idle = self._idle or asyncio.Event()
            await self._idle.wait()
        await self.aclose()

    def _body(self, request: ApiRequest, app_key: str) -> dict[str, Any]:
        return request_fields(request, app_key, self._encoding)

    async def send(self, request: ApiRequest, app_key: str) -> ApiResult:
        """One API call; always an ApiResult, never an exception for IO failures.

        Raises ValueError only for a caller bug: ``request.data`` that is not
        JSON-serialisable (nothing is sent).
        """
        body = self._body(request, app_key)
        self._in_flight += 1
        try:
            return await self._send(body, app_key)
        finally:
            self._in_flight -= 1
            if not self._in_flight and self._idle is not None:
                self._idle.set()
                self._idle = None

    async def _send(self, body: dict[str, Any], app_key: str) -> ApiResult:
        started = time.perf_counter()
        progress = Progress(traced=self._traced)
        token = CALL_PROGRESS.set(progress)
        deadline = asyncio.timeout(self._timeout)
        try:
            async with deadline, self._semaphore:
                progress.admitted = True
                kind, code, status, message, retry_after = await self._post(body, app_key)
        except Exception as exc:  # CancelledError is a BaseException: it propagates
            if deadline.expired():
                kind, message = classify_deadline(progress)
                log.debug(
                    "API call: %s (whole-call timeout, %.3fs)",
                    message,
                    time.perf_counter() - started,
                )
            else:
                kind, message = classify(exc, progress)
                log.debug("API call: %s (%s)", message, type(origin(exc)).__name__)
            code = status = retry_after = None
        finally:
            CALL_PROGRESS.reset(token)
        return ApiResult(kind, code, status, message, retry_after, time.perf_counter() - started)

    async def _post(self, body: dict[str, Any], app_key: str) -> _Answer:
        request = self._build_request(body)
        response = await self._transport.handle_async_request(request)
        try:
            status = response.status_code
            if status != 200:
                # The body of an error page is not needed and may be large.
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                return ResultKind.HTTP, None, status, f"HTTP {status}", retry_after
            raw = await read_capped(response)
        finally:
            # Back to the pool, or closed if unread; on every path, cancellation included.
            await response.aclose()
        if raw is None:
            return ResultKind.BAD_BODY, None, 200, "response too large", None
        parsed = parse_api_body(raw, app_key)
        if parsed is None:
            return ResultKind.BAD_BODY, None, 200, "HTTP 200 without API JSON", None
        code, message = parsed
        return ResultKind.API, code, 200, message, None

    def _build_request(self, body: dict[str, Any]) -> httpx.Request:
        """The request httpx.AsyncClient.build_request would make, headers in its order."""
        url = self._wire_url if self._wire_url is not None else httpx.URL(self._url)
        headers = httpx.Headers(self._base_headers)
        if self._encoding == "form":
            content = form_encode(body)  # request_fields made every form value a str
            headers["Content-Length"] = str(len(content))
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        else:
            content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
            headers["Content-Length"] = str(len(content))
        if self._url_auth is not None:
            headers["Authorization"] = self._url_auth
        if self._client.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        request = httpx.Request(
            "POST",
            url,
            headers=headers,
            stream=httpx.ByteStream(content),
            extensions={"timeout": self._timeout_extension},
        )
        request.read()  # the transport sends request.content, as for a client-built request
        return request
