"""Pure: raw RFC 5322 bytes -> ParsedMessage, the values templates see (docs/routing.md).

Nothing here touches a socket or the disk, and :func:`parse_message` never
raises: a message the stdlib cannot make sense of still gets routed, with
whatever could be read and a defect count for the log line.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import hashlib
import ipaddress
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from email import policy
from email.feedparser import BytesFeedParser
from email.header import decode_header, make_header
from email.headerregistry import AddressHeader, BaseHeader, HeaderRegistry
from email.message import EmailMessage, Message
from email.utils import getaddresses
from html.parser import HTMLParser
from typing import Any

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


@dataclass(frozen=True, slots=True)
class Address:
    """One mailbox, split so templates can use ``.local`` and ``.domain`` directly."""

    address: str
    name: str
    local: str
    domain: str

    def __str__(self) -> str:
        return self.address


#: What a missing or unreadable address becomes, so templates never meet ``None``.
EMPTY_ADDRESS = Address("", "", "", "")


@dataclass(frozen=True, slots=True)
class Attachment:
    """What templates may know about an attached file: never its content."""

    filename: str
    content_type: str
    size: int


class HeaderMap(Mapping[str, str]):
    """Case-insensitive, read-only view of decoded header values (first occurrence wins for [])."""

    __slots__ = ("_items", "_names", "_values")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items = tuple(items)
        values: dict[str, list[str]] = {}
        names: dict[str, str] = {}
        for name, value in self._items:
            key = name.lower()
            values.setdefault(key, []).append(value)
            names.setdefault(key, name)
        self._values = {key: tuple(found) for key, found in values.items()}
        self._names = tuple(names.values())

    def __getitem__(self, name: str) -> str:
        try:
            return self._values[name.lower()][0]
        except (KeyError, AttributeError):
            raise KeyError(name) from None

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name`` in message order (Received, say); [] if absent."""
        return list(self._values.get(name.lower(), ()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"HeaderMap({list(self._items)!r})"


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """Everything the template context takes from the message itself (docs/routing.md)."""

    subject: str = ""
    sender: Address = EMPTY_ADDRESS
    to: list[Address] = field(default_factory=list)
    cc: list[Address] = field(default_factory=list)
    headers: HeaderMap = field(default_factory=HeaderMap)
    text: str = ""
    html: str = ""
    message_id: str = ""
    date: str = ""
    attachments: list[Attachment] = field(default_factory=list)
    defects: int = 0


class _CachedHeaderRegistry(HeaderRegistry):
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

# policy.default with a caching header factory; each parse has its own FeedParser,
# so sharing it between threads is safe (so is the registry: lru_cache locks).
_POLICY = policy.default.clone(header_factory=_CachedHeaderRegistry())
# Every header decoded as unstructured text: values stay as given (a Date is not
# reformatted, an address list is not re-quoted), only RFC 2047 words decoded.
_UNSTRUCTURED = _CachedHeaderRegistry(use_default_map=False)
# The stdlib's address-list parser for From/To/Cc (groups, quoting, RFC 2047 names).
_STRUCTURED = _CachedHeaderRegistry()
# Serialising an attached message for its size: CRLF, headers left as they came.
_WIRE = policy.SMTP.clone(max_line_length=None)
# Defensive bound on our own recursion; the parser gives up well before this.
_MAX_DEPTH = 100

_LINE_END = re.compile(rb"\r\n|\r|\n")
_FOLD = re.compile(r"\r\n|\r|\n")
# Everything str.splitlines() splits on: a header value must stay one line.
_LINE_BREAKS = re.compile(r"[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]+")
_SURROGATES = re.compile(r"[\udc80-\udcff]+")


def parse_message(raw: bytes) -> ParsedMessage:
    """Parse raw RFC 5322 bytes with the stdlib email package (policy.default).

    Never raises, whatever the bytes: mail from the wild is often broken and must
    still be routed. What could not be read is left empty and counted in ``defects``.
    """
    try:
        simple = _parse_simple(raw)
    except Exception:
        simple = None  # belt and braces: the full parser decides
    if simple is not None:
        return simple
    try:
        return _parse(raw, headers_only=False)
    except Exception:
        # The stdlib has rare failure paths (RecursionError on deeply nested
        # multiparts, say): keep the headers so the message can still be routed.
        pass
    try:
        return _parse(raw, headers_only=True)
    except Exception:
        return ParsedMessage(defects=1)


def parse_address(value: str) -> Address:
    """Split an envelope address (MAIL FROM / RCPT TO) into an Address for templates.

    Accepts ``a@b``, ``<a@b>`` and ``''`` (the null sender, giving EMPTY_ADDRESS).
    """
    address = value.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    # RFC 5321 4.1.2: a source route (<@relay:user@domain>) MUST be accepted, SHOULD be ignored.
    if address.startswith("@") and ":" in address:
        address = address.split(":", 1)[1]
    return _address(address, "")


def is_valid_address(value: str) -> bool:
    """Syntax check for an envelope recipient, so RCPT can answer ``553 5.1.3`` early.

    Exactly one addr-spec ``local@domain``: no display name, no spaces, control
    characters or angle brackets; local part (dot-atom or quoted, UTF-8 allowed)
    at most 64 octets, the whole at most 254; the domain dot-separated labels of
    letters, digits and hyphens (IDNA/UTF-8 letters allowed) or an address
    literal ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]``.
    """
    if not value or _FORBIDDEN.search(value):
        return False
    # RFC 5321 4.5.3.1.3: a path is at most 256 octets including the angle brackets.
    if len(value.encode()) > 254:
        return False
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain:
        return False
    # RFC 5321 4.5.3.1.1: local part at most 64 octets.
    if len(local.encode()) > 64:
        return False
    return _valid_local(local) and _valid_domain(domain)


def html_to_text(html: str) -> str:
    """Readable text from HTML, for ``text`` when a message has no text part.

    Tags removed, <script> and <style> contents dropped, entities decoded, block
    elements (p, br, div, li, tr, h1-h6, ...) become line breaks, table cells are
    separated by a space, runs of blank lines collapse to one; the result is stripped.
    """
    parser = _TextExtractor()
    try:
        parser.feed(html)
        parser.close()
    except Exception:
        # Belt and braces: HTMLParser has asserts for odd markup; keep what was read.
        pass
    return parser.text()


def normalize_line_ends(raw: bytes) -> bytes:
    """Every line end (bare LF, bare CR, CRLF) becomes CRLF."""
    if not has_bare_line_end(raw):
        return raw
    return _LINE_END.sub(b"\r\n", raw)


def has_bare_line_end(raw: bytes) -> bool:
    """True if raw holds an LF not preceded by CR, or a CR not followed by LF."""
    # Every CRLF holds one CR and one LF, so any other CR or LF is bare. Three
    # C-speed counts: 20x faster than a look-around regex (bench/README.md).
    crlf = raw.count(b"\r\n")
    return raw.count(b"\n") != crlf or raw.count(b"\r") != crlf


def content_hash(raw: bytes) -> str:
    """Hex SHA-256 of the message, line ends normalised to CRLF (docs/guarantees.md)."""
    return hashlib.sha256(normalize_line_ends(raw)).hexdigest()


# --- parsing -----------------------------------------------------------------


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


_FEED_CHUNK = 8192


def _parse(raw: bytes, *, headers_only: bool) -> ParsedMessage:
    msg = _parse_bytes(raw, headers_only=headers_only)
    defects = 1 if headers_only else 0

    headers: list[tuple[str, str]] = []
    senders: list[Address] = []
    to: list[Address] = []
    cc: list[Address] = []
    given: dict[str, str] = {}  # Message-ID and Date exactly as sent, bar whitespace
    # raw_items(), not items(): one malformed header must not cost us all the others.
    for name, value in msg.raw_items():
        # The parser keeps 8-bit header bytes as surrogates; read them as UTF-8
        # (or Latin-1) before anything else sees them.
        unfolded = _desurrogate("".join(_FOLD.split(str(value))))
        decoded, failed = _decode_header(name, unfolded)
        defects += failed
        headers.append((name, decoded))
        key = name.lower()
        if key in ("message-id", "date"):
            given.setdefault(key, _one_line(unfolded).strip())
        elif key in ("from", "to", "cc"):
            found, failed = _addresses(name, unfolded, decoded)
            defects += failed
            {"from": senders, "to": to, "cc": cc}[key].extend(found)
    header_map = HeaderMap(headers)

    text = html = ""
    attachments: list[Attachment] = []
    if not headers_only:
        plain_part = _body(msg, "plain")
        html_part = _body(msg, "html")
        text = _decode_text(plain_part) if plain_part is not None else ""
        html = _decode_text(html_part) if html_part is not None else ""
        # An empty text/plain beside an HTML body is as good as none at all.
        if not text.strip() and html:
            text = html_to_text(html)
        defects += _scan(msg, (plain_part, html_part), attachments, depth=0)
    else:
        defects += len(msg.defects)

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


# --- the simple-message fast path -----------------------------------------------

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


def _parse_simple(raw: bytes) -> ParsedMessage | None:
    """The ParsedMessage of a simple message without the stdlib's feedparser, or None.

    Simple: CRLF line ends throughout the header block, every header line a
    ``Name: value`` or a continuation, a blank line before the body, at most one
    Content-Type (text/plain with plain parameters) and Content-Transfer-Encoding
    (7bit, 8bit, binary), no Content-Disposition. For such a message the full
    parser's answer is known without it: the message is its own text body, its
    payload the bytes after the blank line, no attachments and no parser defects.
    Headers are decoded by the same functions as the full path. Anything else
    returns None and goes to :func:`_parse` (tests/test_fast_paths.py compares them).
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
    return _parsed(raw_headers, raw[end + 4 :], charset)


def _parsed(
    raw_headers: list[tuple[str, str]], payload: bytes, charset: str | None
) -> ParsedMessage:
    """What :func:`_parse` makes of these headers and this single text/plain body."""
    defects = 0
    headers: list[tuple[str, str]] = []
    senders: list[Address] = []
    to: list[Address] = []
    cc: list[Address] = []
    given: dict[str, str] = {}
    for name, value in raw_headers:
        unfolded = _desurrogate(value)
        decoded, failed = _decode_header(name, unfolded)
        defects += failed
        headers.append((name, decoded))
        key = name.lower()
        if key in ("message-id", "date"):
            given.setdefault(key, _one_line(unfolded).strip())
        elif key in ("from", "to", "cc"):
            found, failed = _addresses(name, unfolded, decoded)
            defects += failed
            {"from": senders, "to": to, "cc": cc}[key].extend(found)
    header_map = HeaderMap(headers)
    text = _decode_bytes(payload, charset).replace("\r\n", "\n").replace("\r", "\n")
    return ParsedMessage(
        subject=header_map.get("subject", ""),
        sender=senders[0] if senders else EMPTY_ADDRESS,
        to=to,
        cc=cc,
        headers=header_map,
        text=text,
        message_id=given.get("message-id", ""),
        date=given.get("date", ""),
        defects=defects,
    )


def _decode_header(name: str, value: str) -> tuple[str, int]:
    """RFC 2047-decoded one-line value, and how many defects that met."""
    if "=?" not in value:
        # Nothing encoded: the unstructured decoder would return it unchanged.
        return _one_line(value).strip(), 0
    try:
        header = _UNSTRUCTURED(name, value)
        return _one_line(str(header)).strip(), len(header.defects)
    except Exception:
        pass
    try:
        decoded = str(make_header(decode_header(value)))
    except Exception:
        decoded = value
    return _one_line(decoded).strip(), 1


def _addresses(name: str, unfolded: str, decoded: str) -> tuple[list[Address], int]:
    """The mailboxes of one address header (groups flattened), and its defect count."""
    try:
        header = _STRUCTURED(name, unfolded)
        if isinstance(header, AddressHeader):
            found = [
                _address(mailbox.addr_spec, mailbox.display_name)
                for mailbox in header.addresses
                if mailbox.username or mailbox.domain
            ]
            return found, len(header.defects)
    except Exception:
        pass
    # The structured parser gave up: fall back to the lenient legacy one.
    try:
        pairs = getaddresses([decoded])
    except Exception:
        return [], 1
    return [_address(addr, display) for display, addr in pairs if addr], 1


def _address(address: str, name: str) -> Address:
    address = _one_line(_desurrogate(address)).strip()
    name = _one_line(_desurrogate(name)).strip()
    if not address:
        return EMPTY_ADDRESS
    local, at, domain = address.rpartition("@")
    if not at:
        return Address(address, name, address, "")
    return Address(address, name, local, domain)


def _body(msg: Message, subtype: str) -> Message | None:
    if not isinstance(msg, EmailMessage):
        return None
    try:
        return msg.get_body(preferencelist=(subtype,))
    except Exception:
        return None


def _decode_text(part: Message) -> str:
    """The text of one part, with line ends normalised to \\n."""
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        return ""
    if not isinstance(payload, bytes):
        return ""
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    return _decode_bytes(payload, charset).replace("\r\n", "\n").replace("\r", "\n")


# Python codecs a sender could name that are no mail charset: punycode takes
# seconds per megabyte, the escape codecs warn and interpret backslashes.
_NOT_MAIL_CHARSETS = frozenset(
    {"punycode", "idna", "unicode-escape", "raw-unicode-escape", "undefined"}
)


def _decode_bytes(payload: bytes, charset: str | None) -> str:
    """Declared charset, else UTF-8; bytes that fit neither never make us fail.

    When a real charset was declared, its undecodable bytes become U+FFFD; with
    no usable declaration (none, us-ascii, unknown) the bytes are most likely
    legacy 8-bit text, and Latin-1 reads every byte.
    """
    codec = None
    if charset:
        with contextlib.suppress(LookupError, ValueError):
            codec = codecs.lookup(charset).name
        if codec in _NOT_MAIL_CHARSETS:
            codec = None
    if codec:
        try:
            return payload.decode(codec)
        except (LookupError, UnicodeError, ValueError):
            pass
    try:
        return payload.decode("utf-8")
    except UnicodeError:
        pass
    if codec and codec != "ascii":
        try:
            return payload.decode(codec, errors="replace")
        except (LookupError, UnicodeError, ValueError):
            pass
    return payload.decode("latin-1")


def _scan(
    part: Message, bodies: tuple[Message | None, ...], out: list[Attachment], depth: int
) -> int:
    """Collect attachments below ``part`` and count defects, in one pass over the tree.

    A leaf counts when it is not a chosen body and is marked attachment, has a
    filename, or is something iter_attachments() lists that is not itself body
    text (an inline image of a multipart/related, say). Parts of an attached
    message/rfc822 are that message's business, not ours.
    """
    defects = 0
    if depth == 0 and not _is_container(part) and not any(part is body for body in bodies):
        # A whole message that is one non-body part (a bare PDF, say) is an attachment.
        defects += not _add_attachment(part, True, out)
    defects += len(part.defects)
    if depth >= _MAX_DEPTH or not _is_container(part):
        return defects
    try:
        listed = (
            {id(sub) for sub in part.iter_attachments()}
            if isinstance(part, EmailMessage)
            else set()
        )
    except Exception:
        listed = set()
        defects += 1
    for sub in part.get_payload():
        if not isinstance(sub, Message):
            continue
        leaf = not _is_container(sub) and not any(sub is body for body in bodies)
        if leaf and not _add_attachment(sub, id(sub) in listed, out):
            defects += 1
        defects += _scan(sub, bodies, out, depth + 1)
    return defects


def _is_container(part: Message) -> bool:
    # A multipart whose boundary is missing keeps its body as a str payload.
    return part.get_content_maintype() == "multipart" and part.is_multipart()


def _add_attachment(part: Message, listed: bool, out: list[Attachment]) -> bool:
    """Append ``part`` to ``out`` if it is an attachment; False if it could not be read."""
    try:
        content_type = part.get_content_type()
        if content_type.startswith("multipart/"):
            return True
        filename = _one_line(_desurrogate(part.get_filename() or "")).strip()
        attached = part.get_content_disposition() == "attachment"
        if not (attached or filename or (listed and content_type not in _BODY_TYPES)):
            return True
        out.append(Attachment(filename, content_type, _payload_size(part)))
        return True
    except Exception:
        return False


_BODY_TYPES = frozenset({"text/plain", "text/html"})


def _payload_size(part: Message) -> int:
    try:
        if part.is_multipart():
            # message/rfc822: the attached message as it would go over the wire.
            inner = part.get_payload(0)
            return len(inner.as_bytes(policy=_WIRE)) if isinstance(inner, Message) else 0
        size = _base64_size(part)
        if size is not None:
            return size
        payload = part.get_payload(decode=True)
    except Exception:
        return 0
    return len(payload) if isinstance(payload, bytes) else 0


# A base64 body get_payload(decode=True) decodes without a defect: alphabet
# characters and line breaks, at most two "=" at the very end (a multiple of 4
# characters, checked apart).
_BASE64_BODY = re.compile(r"[A-Za-z0-9+/\r\n]*={0,2}[\r\n]*")


def _base64_size(part: Message) -> int | None:
    """What ``len(part.get_payload(decode=True))`` would be, for a well-formed base64
    body, without decoding it; None for anything else (then decode, defects and all).

    Decoding an attachment only to learn its size held three copies of it at once
    (bench/README.md: a 10 MiB message); this reads the body where it lies.
    """
    if str(part.get("content-transfer-encoding", "")).lower() != "base64":
        return None
    payload = part.get_payload()
    if not isinstance(payload, str) or not _BASE64_BODY.fullmatch(payload):
        return None
    length = len(payload) - payload.count("\r") - payload.count("\n")
    if length % 4:
        return None  # get_payload pads it and records a defect: let it
    end = len(payload)
    while end and payload[end - 1] in "\r\n":
        end -= 1
    padding = 0
    while padding < 2 and end > padding and payload[end - 1 - padding] == "=":
        padding += 1
    return length // 4 * 3 - padding


def _desurrogate(text: str) -> str:
    """Bytes the parser smuggled in as surrogates, read as UTF-8, else Latin-1."""
    if not _SURROGATES.search(text):
        return text
    return _SURROGATES.sub(_undo_surrogates, text)


def _undo_surrogates(match: re.Match[str]) -> str:
    raw = match.group().encode("utf-8", "surrogateescape")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _one_line(text: str) -> str:
    return _LINE_BREAKS.sub(" ", text)


# --- envelope address syntax (RFC 5321 4.1.2, RFC 6531 3.3) -------------------

# Whitespace, controls (C0, DEL, C1), lone surrogates, angle brackets.
_FORBIDDEN = re.compile(r"[\s<>\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
_LDH = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")


def _utf8_char_ok(char: str) -> bool:
    # RFC 6531 UTF8-non-ascii, minus format characters and separators (spoofing).
    return unicodedata.category(char)[0] not in "CZ"


def _valid_local(local: str) -> bool:
    if len(local) >= 2 and local[0] == '"' and local[-1] == '"':
        return _valid_quoted(local[1:-1])
    return all(
        atom and all(c in _ATEXT or (c > "\x7f" and _utf8_char_ok(c)) for c in atom)
        for atom in local.split(".")
    )


def _valid_quoted(inner: str) -> bool:
    escaped = False
    for char in inner:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"' or (char > "\x7f" and not _utf8_char_ok(char)):
            return False
    return not escaped


def _valid_domain(domain: str) -> bool:
    if domain[0] == "[" and domain[-1] == "]":
        return _valid_literal(domain[1:-1])
    return all(_valid_label(label) for label in domain.split("."))


def _valid_literal(literal: str) -> bool:
    try:
        if literal[:5].lower() == "ipv6:":
            # ipaddress accepts a %scope suffix; an address literal has none.
            return "%" not in literal and bool(ipaddress.IPv6Address(literal[5:]))
        return bool(ipaddress.IPv4Address(literal))
    except ValueError:
        return False


def _valid_label(label: str) -> bool:
    if not label or label[0] == "-" or label[-1] == "-":
        return False
    if label.isascii():
        return len(label) <= 63 and all(c in _LDH for c in label)
    if not all(c in _LDH or (c > "\x7f" and unicodedata.category(c)[0] in "LMN") for c in label):
        return False
    # RFC 5890: the A-label ("xn--" + punycode) must fit in 63 octets.
    return len(label.encode("punycode")) + 4 <= 63


# --- HTML to text ----------------------------------------------------------------

_LINE_TAGS = frozenset({"div", "li", "tr", "dt", "dd", "section", "article", "header", "footer"})
_PARAGRAPH_TAGS = frozenset(
    {"p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl", "table", "blockquote", "pre", "hr"}
)
_CELL_TAGS = frozenset({"td", "th"})
# <title> repeats the subject; browsers never show it in the page either.
_DROPPED_TAGS = frozenset({"script", "style", "title"})
_HTML_SPACE = re.compile(r"[ \t\n\r\f\v\xa0]+")
# Zero-width characters newsletters pad their preview text with.
_INVISIBLE = re.compile(r"[\u00ad\u034f\u200b-\u200d\u2060\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")


class _TextExtractor(HTMLParser):
    """Collects text; line ends owed by block tags are written just before the next text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._out: list[str] = []
        self._pending = 0  # line ends owed before the next text
        self._dropped = 0  # depth inside <script>, <style>, <title>
        self._pre = 0  # depth inside <pre>
        self._last = "\n"  # last character written; "\n" at the start

    def parse_marked_section(self, i: int, report: bool = True) -> int:
        try:
            return super().parse_marked_section(i, report)
        except AssertionError:
            # An unknown "<![keyword" (Outlook's conditionals gone wrong) would end
            # the parse; skip it up to its ">" as a browser does a bogus comment.
            end = self.rawdata.find(">", i + 3)
            return -1 if end < 0 else end + 1

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag(tag, opening=True)

    def handle_endtag(self, tag: str) -> None:
        self._tag(tag, opening=False)

    def _tag(self, tag: str, *, opening: bool) -> None:
        step = 1 if opening else -1
        if tag in _DROPPED_TAGS:
            self._dropped = max(self._dropped + step, 0)
        elif tag == "br":
            if opening:
                self._pending += 1
        elif tag in _PARAGRAPH_TAGS:
            self._pending = max(self._pending, 2)
            if tag == "pre":
                self._pre = max(self._pre + step, 0)
        elif tag in _LINE_TAGS:
            self._pending = max(self._pending, 1)
        elif tag in _CELL_TAGS and opening:
            self.handle_data(" ")

    def handle_data(self, data: str) -> None:
        if self._dropped:
            return
        data = _INVISIBLE.sub("", data)
        if self._pre:
            data = data.replace("\r\n", "\n").replace("\r", "\n")
        else:
            data = _HTML_SPACE.sub(" ", data)
            if self._pending or self._last in " \n":
                data = data.lstrip(" ")
        if not data:
            return
        if self._pending and self._out:
            # More than one blank line never helps a reader.
            self._out.append("\n" * min(self._pending, 2))
        self._pending = 0
        self._out.append(data)
        self._last = data[-1]

    def text(self) -> str:
        text = _TRAILING_SPACE.sub("\n", "".join(self._out))
        return _BLANK_LINES.sub("\n\n", text).strip()
