"""Raw bytes -> ParsedMessage: the fast path when it can, the stdlib email package else.

The full parse uses policy.default with a caching header factory and feeds the
feedparser straight from the bytes; whatever it cannot read is left empty and
counted in ``defects``.
"""

from __future__ import annotations

import re
from email import policy
from email.feedparser import BytesFeedParser
from email.message import Message

from .attachments import scan_parts
from .body import body_part, decode_text
from .headers import CachedHeaderRegistry, message_from
from .html_text import html_to_text
from .model import Attachment, ParsedMessage
from .simple import parse_simple

__all__ = ["parse_full", "parse_message"]

# policy.default with a caching header factory; each parse has its own FeedParser,
# so sharing it between threads is safe (so is the registry: lru_cache locks).
_POLICY = policy.default.clone(header_factory=CachedHeaderRegistry())
_FOLD = re.compile(r"\r\n|\r|\n")
_FEED_CHUNK = 8192


def parse_message(raw: bytes) -> ParsedMessage:
    """Parse raw RFC 5322 bytes with the stdlib email package (policy.default).

    Never raises, whatever the bytes: mail from the wild is often broken and must
    still be routed. What could not be read is left empty and counted in ``defects``.
    """
    try:
        simple = parse_simple(raw)
    except Exception:
        simple = None  # belt and braces: the full parser decides
    if simple is not None:
        return simple
    try:
        return parse_full(raw, headers_only=False)
    except Exception:
        # The stdlib has rare failure paths (RecursionError on deeply nested
        # multiparts, say): keep the headers so the message can still be routed.
        pass
    try:
        return parse_full(raw, headers_only=True)
    except Exception:
        return ParsedMessage(defects=1)


def parse_full(raw: bytes, *, headers_only: bool) -> ParsedMessage:
    """The stdlib feedparser's reading of ``raw``; with ``headers_only``, one defect more
    and no body. May raise: :func:`parse_message` is the caller that never does."""
    msg = _parse_bytes(raw, headers_only=headers_only)
    defects = 1 if headers_only else 0
    text = html = ""
    attachments: list[Attachment] = []
    if not headers_only:
        plain_part = body_part(msg, "plain")
        html_part = body_part(msg, "html")
        text = decode_text(plain_part) if plain_part is not None else ""
        html = decode_text(html_part) if html_part is not None else ""
        # An empty text/plain beside an HTML body is as good as none at all.
        if not text.strip() and html:
            text = html_to_text(html)
        defects += scan_parts(msg, (plain_part, html_part), attachments, depth=0)
    else:
        defects += len(msg.defects)
    # raw_items(), not items(): one malformed header must not cost us all the others.
    return message_from(
        ((name, "".join(_FOLD.split(str(value)))) for name, value in msg.raw_items()),
        text=text,
        html=html,
        attachments=attachments,
        defects=defects,
    )


def _parse_bytes(raw: bytes, *, headers_only: bool) -> Message:
    """``BytesParser(policy=_POLICY).parsebytes(raw)``, without its whole-message copies.

    parsebytes() decodes all of ``raw`` to a str and wraps that in a StringIO
    (4 bytes a character) before feeding the parser 8192 characters at a time;
    feeding it the same chunks straight from ``raw`` gives the same message
    (ASCII with surrogateescape decodes byte by byte) for a fraction of the
    peak memory of a large one (bench/README.md).
    """
    parser = BytesFeedParser(policy=_POLICY)
    if headers_only:
        parser._set_headersonly()  # type: ignore[attr-defined]  # as Parser.parse does
    for start in range(0, len(raw), _FEED_CHUNK):
        parser.feed(raw[start : start + _FEED_CHUNK])
    return parser.close()
