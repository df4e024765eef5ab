"""What the AOTsend API answered: the body read under a cap, its JSON code and
message, and Retry-After.

A provider's message reaches logs and records only cleaned: control and format
characters stripped, the API key (a misbehaving proxy echoing the form back)
masked, and cut to :data:`MAX_MESSAGE` characters.
"""

from __future__ import annotations

import email.utils
import json
import unicodedata
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx

__all__ = ["MAX_BODY", "MAX_MESSAGE", "parse_api_body", "parse_retry_after", "read_capped"]

#: The API answers a few dozen bytes; anything far larger is not the API.
MAX_BODY = 64 * 1024
MAX_MESSAGE = 200
#: Characters stripped from provider messages before they reach logs and records:
#: controls, format characters (bidi overrides), lone surrogates, line separators.
_STRIP_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
#: What a Retry-After of more digits than that reads as (some 30 000 years);
#: the gate cuts every Retry-After to ``api.max_retry_after`` anyway.
_RETRY_AFTER_HUGE = 1e12


def _clean_message(text: str, app_key: str) -> str:
    cleaned = text
    if not text.isprintable():  # printable text has none of those categories
        cleaned = "".join(c for c in text if unicodedata.category(c) not in _STRIP_CATEGORIES)
    if app_key and app_key in cleaned:  # a misbehaving proxy echoing the form back
        cleaned = cleaned.replace(app_key, "***")
    return cleaned[:MAX_MESSAGE]


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """RFC 9110 10.2.3: delta-seconds or an HTTP-date; clamped to >= 0.

    Not capped here (:func:`smtp_bridge.breaker.cap_retry_after` is, with a log
    line), only kept finite: ``float()`` of a 400-digit number would overflow.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(int(value)) if len(value) <= 12 else _RETRY_AFTER_HUGE
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC by RFC 5322 3.3
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def parse_api_body(body: bytes, app_key: str) -> tuple[int, str] | None:
    """The API's ``code`` and cleaned ``message``; None for anything else."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    code = doc.get("code")
    # bool is an int subclass; true/false is not an API code.
    if not isinstance(code, int) or isinstance(code, bool):
        return None
    message = doc.get("message")
    return code, _clean_message(message if isinstance(message, str) else "", app_key)


async def read_capped(response: httpx.Response) -> bytes | None:
    """The decoded body, or None if it is larger than :data:`MAX_BODY`."""
    headers = response.headers
    stream = response.stream
    chunks: AsyncIterator[bytes]
    if "Content-Encoding" in headers or not isinstance(stream, httpx.AsyncByteStream):
        # httpx decodes (gzip, deflate...), and the cap applies to the decoded bytes.
        chunks = response.aiter_bytes()
    else:
        length = headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            return None  # refused before reading a byte of it
        # Not encoded, the raw stream is the body: read without httpx's per-chunk
        # decoding and bookkeeping layers (the caller's aclose() still closes it).
        chunks = aiter(stream)
    raw = b""
    async for chunk in chunks:
        raw += chunk
        if len(raw) > MAX_BODY:
            return None
    return raw
