"""Pure: the dedup key that tells a client's retry of a message from a new message.

A retry carries the same ``Idempotency-Key``, or the same Message-ID *and* the
same content. Content is compared without the trace headers a relaying MTA adds
on the way (``Received`` and the like), with line ends normalised to CRLF, so a
retry that took another path still matches. Two messages that share a
Message-ID but differ in content are two messages (legacy apps reuse
Message-IDs). A message with neither header is known by its content alone, and
such keys (``sha:``) are remembered only for ``delivery.anonymous_dedup_ttl``:
the same alert text sent twice an hour apart is two alerts.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

from .message import ParsedMessage, normalize_line_ends
from .store.records import ANONYMOUS_KEY_PREFIX

__all__ = ["TRACE_HEADERS", "message_key", "retry_content_hash"]

#: Header fields a relay adds or rewrites in transit (RFC 5321 4.4, RFC 8601,
#: RFC 6376, RFC 8617): not part of what the client sent.
TRACE_HEADERS: Final = frozenset(
    {
        "received",
        "return-path",
        "delivered-to",
        "x-received",
        "x-original-to",
        "received-spf",
        "authentication-results",
        "arc-seal",
        "arc-message-signature",
        "arc-authentication-results",
        "dkim-signature",
        "x-google-dkim-signature",
    }
)

_FIELD_NAME: Final = re.compile(rb"^([!-9;-~]+)[ \t]*:")


def retry_content_hash(raw: bytes) -> str:
    """Hex SHA-256 of ``raw`` (line ends CRLF) without its trace header fields."""
    data = normalize_line_ends(raw)
    end = data.find(b"\r\n\r\n")
    head_end = len(data) if end < 0 else end + 2
    head = data[:head_end]
    kept: list[bytes] = []
    dropping = False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)  # continuation of a kept field
            continue
        match = _FIELD_NAME.match(line)
        dropping = match is not None and match[1].decode("ascii").lower() in TRACE_HEADERS
        if not dropping:
            kept.append(line)
    digest = hashlib.sha256(b"\r\n".join(kept))
    # The body hashed where it lies: slicing and joining it cost two copies of a
    # 10 MiB message (bench/README.md, change 18).
    digest.update(memoryview(data)[head_end:])
    return digest.hexdigest()


def message_key(parsed: ParsedMessage, raw: bytes) -> str:
    """The dedup identity: ``idem:`` Idempotency-Key, else ``mid:`` Message-ID with
    content, else ``sha:`` content alone."""
    idem = parsed.headers.get("Idempotency-Key", "").strip()
    if idem:
        return "idem:" + hashlib.sha256(idem.encode("utf-8", "surrogateescape")).hexdigest()
    content = retry_content_hash(raw)
    if parsed.message_id:
        mid = parsed.message_id.encode("utf-8", "surrogateescape")
        return "mid:" + hashlib.sha256(mid + b"\0" + content.encode("ascii")).hexdigest()
    return ANONYMOUS_KEY_PREFIX + content
