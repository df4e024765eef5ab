"""Pure: raw RFC 5322 bytes -> ParsedMessage, the values templates see (docs/routing.md).

Nothing here touches a socket or the disk, and :func:`parse_message` never
raises: a message the stdlib cannot make sense of still gets routed, with
whatever could be read and a defect count for the log line.

The parts: :mod:`.parse` (the entry point and the stdlib parse), :mod:`.simple`
(the fast path for simple mail), :mod:`.headers` (header decoding, shared by
both), :mod:`.body` and :mod:`.attachments` (what the parts hold),
:mod:`.addresses` (envelope syntax, mailboxes), :mod:`.sanitize`,
:mod:`.html_text`, :mod:`.line_ends` and :mod:`.model` (the values themselves).
"""

from __future__ import annotations

from .addresses import is_valid_address, parse_address
from .html_text import html_to_text
from .line_ends import content_hash, has_bare_line_end, normalize_line_ends
from .model import EMPTY_ADDRESS, Address, Attachment, HeaderMap, ParsedMessage
from .parse import parse_message

__all__ = [
    "EMPTY_ADDRESS",
    "Address",
    "Attachment",
    "HeaderMap",
    "ParsedMessage",
    "content_hash",
    "has_bare_line_end",
    "html_to_text",
    "is_valid_address",
    "normalize_line_ends",
    "parse_address",
    "parse_message",
]
