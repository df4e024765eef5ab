"""Why an API call failed, in the terms a retry needs: never sent, or outcome unknown.

"Never sent" is safe to retry (docs/replies.md ``451 4.4.1``); "unknown" may
have reached the API (``451 4.4.2``). httpx_aiohttp maps aiohttp's exceptions
lossily (``ServerDisconnectedError``, a ``ClientConnectionError``, surfaces as
``httpx.ConnectTimeout``), so the original aiohttp exception is looked up in the
exception chain first. When :class:`~smtp_bridge.api.ApiClient` owns its aiohttp
session, :func:`connection_trace` records whether a connection was ever
obtained (:class:`Progress`), which proves "never sent" for anything else that
goes wrong earlier, including the whole-call timeout.

Failures are described by fixed phrases, never by the exception's text.
"""

from __future__ import annotations

import contextvars
import errno
from dataclasses import dataclass
from types import SimpleNamespace

import aiohttp
import httpx

from smtp_bridge.outcomes import ResultKind

__all__ = [
    "CALL_PROGRESS",
    "Progress",
    "classify",
    "classify_deadline",
    "connection_trace",
    "origin",
]


@dataclass(slots=True)
class Progress:
    """How far the current call got; proves "never sent" when nothing was connected."""

    traced: bool = False  # our own aiohttp session reports connections below
    admitted: bool = False  # a concurrency slot was acquired
    connected: bool = False  # a connection was created or reused: bytes may have left


#: The :class:`Progress` of the call running in this task (set around each call).
CALL_PROGRESS: contextvars.ContextVar[Progress | None] = contextvars.ContextVar(
    "smtp_bridge_api_progress", default=None
)


async def _on_connection(
    session: aiohttp.ClientSession, ctx: SimpleNamespace, params: object
) -> None:
    progress = CALL_PROGRESS.get()
    if progress is not None:
        progress.connected = True


def connection_trace() -> aiohttp.TraceConfig:
    """An aiohttp trace that marks the current call connected once a connection is
    created or reused: from then on, bytes may have left."""
    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(_on_connection)
    trace.on_connection_reuseconn.append(_on_connection)
    return trace


_Table = tuple[tuple[type[BaseException], ResultKind, str], ...]


def _optional(name: str, kind: ResultKind, text: str) -> _Table:
    """An entry for an aiohttp exception that older aiohttp releases lack."""
    cls = getattr(aiohttp, name, None)
    return ((cls, kind, text),) if isinstance(cls, type) else ()


# Order matters: subclasses before their bases. (exception type, kind, description)
_AIOHTTP_CLASSES: _Table = (
    *_optional("ClientConnectorDNSError", ResultKind.NEVER_SENT, "DNS lookup failed"),
    (aiohttp.ClientConnectorCertificateError, ResultKind.NEVER_SENT, "TLS certificate rejected"),
    (aiohttp.ClientSSLError, ResultKind.NEVER_SENT, "TLS handshake failed"),
    (aiohttp.ClientProxyConnectionError, ResultKind.NEVER_SENT, "proxy connection failed"),
    (aiohttp.ClientConnectorError, ResultKind.NEVER_SENT, "connection failed"),
    (aiohttp.ConnectionTimeoutError, ResultKind.NEVER_SENT, "connect timed out"),
    (aiohttp.ServerFingerprintMismatch, ResultKind.NEVER_SENT, "TLS fingerprint mismatch"),
    (aiohttp.ClientHttpProxyError, ResultKind.NEVER_SENT, "proxy refused the connection"),
    (aiohttp.InvalidURL, ResultKind.NEVER_SENT, "invalid API URL"),
    (aiohttp.NonHttpUrlClientError, ResultKind.NEVER_SENT, "invalid API URL"),
    (aiohttp.SocketTimeoutError, ResultKind.UNKNOWN, "timed out after sending"),
    (aiohttp.ServerTimeoutError, ResultKind.UNKNOWN, "timed out after sending"),
    (aiohttp.ServerDisconnectedError, ResultKind.UNKNOWN, "server disconnected after sending"),
    (aiohttp.ClientConnectionResetError, ResultKind.UNKNOWN, "connection reset after sending"),
    (aiohttp.ClientPayloadError, ResultKind.UNKNOWN, "response body incomplete"),
    (aiohttp.ClientResponseError, ResultKind.UNKNOWN, "malformed response"),
    *_optional("UploadAbortedError", ResultKind.UNKNOWN, "request body not fully sent"),
    (aiohttp.ClientOSError, ResultKind.UNKNOWN, "connection error after sending"),
)

_HTTPX_CLASSES: _Table = (
    (httpx.ConnectTimeout, ResultKind.NEVER_SENT, "connect timed out"),
    (httpx.PoolTimeout, ResultKind.NEVER_SENT, "timed out waiting for a connection"),
    (httpx.ConnectError, ResultKind.NEVER_SENT, "connection failed"),
    (httpx.ProxyError, ResultKind.NEVER_SENT, "proxy connection failed"),
    (httpx.UnsupportedProtocol, ResultKind.NEVER_SENT, "invalid API URL"),
    (httpx.InvalidURL, ResultKind.NEVER_SENT, "invalid API URL"),
    (httpx.ReadTimeout, ResultKind.UNKNOWN, "timed out after sending"),
    (httpx.WriteTimeout, ResultKind.UNKNOWN, "timed out while sending"),
    (httpx.ReadError, ResultKind.UNKNOWN, "connection error after sending"),
    (httpx.WriteError, ResultKind.UNKNOWN, "connection error while sending"),
    (httpx.RemoteProtocolError, ResultKind.UNKNOWN, "malformed response"),
    (httpx.DecodingError, ResultKind.UNKNOWN, "malformed response body"),
)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes/contexts, outermost first, without cycles."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and not any(cur is s for s in seen):
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def origin(exc: BaseException) -> BaseException:
    """The innermost exception behind ``exc``: what the debug log names."""
    return _chain(exc)[-1]


def _lookup(exc: BaseException, table: _Table) -> tuple[ResultKind, str] | None:
    for cls, kind, text in table:
        if isinstance(exc, cls):
            if cls is aiohttp.ClientConnectorError and _is_refused(exc):
                return kind, "connection refused"
            return kind, text
    return None


def _is_refused(exc: BaseException) -> bool:
    os_error = getattr(exc, "os_error", None)
    return isinstance(os_error, ConnectionRefusedError) or (
        isinstance(os_error, OSError) and os_error.errno == errno.ECONNREFUSED
    )


def classify(exc: BaseException, progress: Progress) -> tuple[ResultKind, str]:
    """Never sent or unknown, and a fixed description; never the exception's text."""
    chain = _chain(exc)
    # The original aiohttp exception is authoritative: httpx_aiohttp's mapping is lossy.
    for link in chain:
        found = _lookup(link, _AIOHTTP_CLASSES)
        if found is not None:
            return found
    for link in chain:
        found = _lookup(link, _HTTPX_CLASSES)
        if found is not None:
            return found
    if progress.traced and not progress.connected:
        return ResultKind.NEVER_SENT, "failed before connecting"
    return ResultKind.UNKNOWN, "request failed"


def classify_deadline(progress: Progress) -> tuple[ResultKind, str]:
    """The whole-call timeout: never sent while waiting for a slot or a connection."""
    if not progress.admitted:
        return ResultKind.NEVER_SENT, "timed out waiting for a free API slot"
    if progress.traced and not progress.connected:
        return ResultKind.NEVER_SENT, "timed out before connecting"
    return ResultKind.UNKNOWN, "timed out after sending"
