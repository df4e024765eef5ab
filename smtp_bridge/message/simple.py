"""The fast path: a simple single-part text/plain message read without the feedparser.

For such a message the full parser's answer is known without running it, at a
third of its cost (bench/README.md, item 12); tests/test_fast_parse.py checks
that the two agree wherever this path answers.
"""

from __future__ import annotations

import re

from .body import decode_bytes
from .headers import message_from
from .line_ends import has_bare_line_end
from .model import ParsedMessage

__all__ = ["parse_simple"]


# A header line as the feedparser reads one: a name of printable ASCII other than
# ":" (its headerRE, minus the empty name and the "From " envelope line), a colon.
_HEADER_LINE = re.compile(r"[\x21-\x39\x3b-\x7e]+:")
# Content-Type values the fast path reads itself: text/plain and plain parameters.
_SIMPLE_TYPE = re.compile(
    r"text/plain(?:[ \t]*;[ \t]*[A-Za-z0-9-]+=(?:[A-Za-z0-9_.+-]+|\"[A-Za-z0-9_.+-]+\"))*[ \t]*;?",
    re.IGNORECASE,
)
_CHARSET_PARAM = re.compile(r';[ \t]*charset=("?)([A-Za-z0-9_.+-]+)\1', re.IGNORECASE)
# Transfer encodings that get_payload(decode=True) leaves as they are.
_IDENTITY_CTE = re.compile(r"[ \t]*(?:7bit|8bit|binary)[ \t]*", re.IGNORECASE)
# Headers whose presence sends a message to the full parser (or that it must read).
_MIME_KEYS = frozenset({"content-type", "content-transfer-encoding", "content-disposition"})


def parse_simple(raw: bytes) -> ParsedMessage | None:
    """The ParsedMessage of a simple message without the stdlib's feedparser, or None.

    Simple: CRLF line ends throughout the header block, every header line a
    ``Name: value`` or a continuation, a blank line before the body, at most one
    Content-Type (text/plain with plain parameters) and Content-Transfer-Encoding
    (7bit, 8bit, binary), no Content-Disposition. For such a message the full
    parser's answer is known without it: the message is its own text body, its
    payload the bytes after the blank line, no attachments and no parser defects.
    Headers are decoded by the same function as the full path. Anything else
    returns None and goes to the full parse (tests/test_fast_parse.py compares them).
    """
    end = raw.find(b"\r\n\r\n")
    if end <= 0:
        return None
    head = raw[: end + 2]
    if has_bare_line_end(head):
        return None
    lines = head.decode("ascii", "surrogateescape").split("\r\n")
    lines.pop()  # "" after the last CRLF
    raw_headers: list[tuple[str, str]] = []
    for line in lines:
        if not line:
            return None  # a blank line before this one: the header block ended there
        if line[0] in " \t":
            if not raw_headers:
                return None  # the feedparser's FirstHeaderLineIsContinuationDefect
            name, value = raw_headers[-1]
            raw_headers[-1] = (name, value + line)  # header_source_parse drops the CRLFs
            continue
        if not _HEADER_LINE.match(line):
            return None
        name, value = line.split(":", 1)
        raw_headers.append((name, value.lstrip(" \t")))
    charset: str | None = None
    seen: set[str] = set()
    for name, value in raw_headers:
        key = name.lower()
        if key not in _MIME_KEYS:
            continue
        if key in seen or key == "content-disposition":
            return None
        seen.add(key)
        if key == "content-type":
            if not _SIMPLE_TYPE.fullmatch(value):
                return None
            found = _CHARSET_PARAM.search(value)
            charset = found.group(2).lower() if found else None
        elif not _IDENTITY_CTE.fullmatch(value):
            return None
    text = decode_bytes(raw[end + 4 :], charset).replace("\r\n", "\n").replace("\r", "\n")
    return message_from(raw_headers, text=text, html="", attachments=[], defects=0)
