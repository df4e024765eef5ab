"""Header fields -> the ParsedMessage's headers, addresses, subject, Message-ID and Date.

Both parse paths (the simple-message one and the stdlib feedparser) end in
:func:`message_from`, so a header reads the same whichever path parsed it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from email.header import decode_header, make_header
from email.headerregistry import AddressHeader, BaseHeader, HeaderRegistry
from email.utils import getaddresses
from typing import Any

from .addresses import mailbox
from .model import EMPTY_ADDRESS, Address, Attachment, HeaderMap, ParsedMessage
from .sanitize import desurrogate, one_line

__all__ = ["CachedHeaderRegistry", "message_from"]


class CachedHeaderRegistry(HeaderRegistry):
    """The stdlib's HeaderRegistry, minus two costs that made parsing 8x slower.

    The stdlib builds a new header class on *every* header it makes, and
    policy.default re-parses a header on every read (``get_content_type()``
    alone reads Content-Type several times per part). Header objects are
    immutable ``str`` subclasses made deterministically from (name, value), so
    the classes are built once per name and recent headers are remembered:
    the same objects, the same values, the same defects (bench/README.md).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._classes: dict[str, type[BaseHeader]] = {}
        self._recent = functools.lru_cache(maxsize=_HEADER_CACHE_SIZE)(self._make)

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = super().__getitem__(name)
        return cls

    def _make(self, name: str, value: str) -> BaseHeader:
        return self[name](name, value)

    def __call__(self, name: str, value: str) -> BaseHeader:
        if len(value) > _HEADER_CACHE_MAX_VALUE:  # do not pin big headers in memory
            return self._make(name, value)
        return self._recent(name, value)


#: Headers remembered per registry, and the longest value remembered.
_HEADER_CACHE_SIZE = 512
_HEADER_CACHE_MAX_VALUE = 998  # RFC 5322 2.1.1's line limit

# Every header decoded as unstructured text: values stay as given (a Date is not
# reformatted, an address list is not re-quoted), only RFC 2047 words decoded.
_UNSTRUCTURED = CachedHeaderRegistry(use_default_map=False)
# The stdlib's address-list parser for From/To/Cc (groups, quoting, RFC 2047 names).
_STRUCTURED = CachedHeaderRegistry()


def message_from(
    fields: Iterable[tuple[str, str]],
    *,
    text: str,
    html: str,
    attachments: list[Attachment],
    defects: int,
) -> ParsedMessage:
    """The ParsedMessage of these header fields and this body.

    ``fields`` are (name, value) in message order, folds removed, 8-bit bytes
    still as the parser's surrogates; ``defects`` those found outside the headers.
    """
    headers: list[tuple[str, str]] = []
    senders: list[Address] = []
    to: list[Address] = []
    cc: list[Address] = []
    given: dict[str, str] = {}  # Message-ID and Date exactly as sent, bar whitespace
    for name, value in fields:
        # The parser keeps 8-bit header bytes as surrogates; read them as UTF-8
        # (or Latin-1) before anything else sees them.
        unfolded = desurrogate(value)
        decoded, failed = _decode_header(name, unfolded)
        defects += failed
        headers.append((name, decoded))
        key = name.lower()
        if key in ("message-id", "date"):
            given.setdefault(key, one_line(unfolded).strip())
        elif key in ("from", "to", "cc"):
            found, failed = _addresses(name, unfolded, decoded)
            defects += failed
            {"from": senders, "to": to, "cc": cc}[key].extend(found)
    header_map = HeaderMap(headers)
    return ParsedMessage(
        subject=header_map.get("subject", ""),
        sender=senders[0] if senders else EMPTY_ADDRESS,
        to=to,
        cc=cc,
        headers=header_map,
        text=text,
        html=html,
        message_id=given.get("message-id", ""),
        date=given.get("date", ""),
        attachments=attachments,
        defects=defects,
    )


def _decode_header(name: str, value: str) -> tuple[str, int]:
    """RFC 2047-decoded one-line value, and how many defects that met."""
    if "=?" not in value:
        # Nothing encoded: the unstructured decoder would return it unchanged.
        return one_line(value).strip(), 0
    try:
        header = _UNSTRUCTURED(name, value)
        return one_line(str(header)).strip(), len(header.defects)
    except Exception:
        pass
    try:
        decoded = str(make_header(decode_header(value)))
    except Exception:
        decoded = value
    return one_line(decoded).strip(), 1


def _addresses(name: str, unfolded: str, decoded: str) -> tuple[tuple[Address, ...], int]:
    """The mailboxes of one address header (groups flattened), and its defect count.

    Remembered for recent headers as the header objects are (an application sends
    the same From on every message): the Address objects are immutable.
    """
    if len(unfolded) > _HEADER_CACHE_MAX_VALUE:
        return _read_addresses(name, unfolded, decoded)
    return _recent_addresses(name, unfolded, decoded)


def _read_addresses(name: str, unfolded: str, decoded: str) -> tuple[tuple[Address, ...], int]:
    try:
        header = _STRUCTURED(name, unfolded)
        if isinstance(header, AddressHeader):
            found = tuple(
                mailbox(box.addr_spec, box.display_name)
                for box in header.addresses
                if box.username or box.domain
            )
            return found, len(header.defects)
    except Exception:
        pass
    # The structured parser gave up: fall back to the lenient legacy one.
    try:
        pairs = getaddresses([decoded])
    except Exception:
        return (), 1
    return tuple(mailbox(addr, display) for display, addr in pairs if addr), 1


_recent_addresses = functools.lru_cache(maxsize=_HEADER_CACHE_SIZE)(_read_addresses)
