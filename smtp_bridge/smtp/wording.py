"""How the engine's replies are worded on the wire: an enhanced status code on
every reply aiosmtpd words without one, and client text escaped.

aiosmtpd quotes what the client sent in some replies (``500 Error: command
"X" not recognized``, ``502 Could not VRFY X``, ``421 4.7.0 X sent too many
times``), decoded with surrogateescape from whatever bytes came in. Those bytes
are never written back raw: a control character (C0, DEL, C1) or a byte that
is not UTF-8 goes out as ``\\xNN``, so a reply is one printable line.
"""

from __future__ import annotations

import re

from .. import replies
from .compat import MALFORMED_ADDRESS_TEXT, TOO_LARGE_TEXTS

__all__ = ["escape_client_text", "on_the_wire", "with_enhanced_code"]

# aiosmtpd's own replies carry no enhanced status code (RFC 3463); clients and
# operators read those, so add one by reply code. 220 and 354 take none, and
# neither do EHLO/HELO lines (RFC 2034 section 3).
_ENHANCED_DEFAULTS = {
    221: "2.0.0",
    250: "2.0.0",
    251: "2.1.5",
    252: "2.5.0",
    421: "4.7.0",
    451: "4.3.0",
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    530: "5.7.0",
    535: "5.7.8",
    538: "5.7.11",
    550: "5.0.0",
    552: "5.3.4",
    553: "5.1.3",
    554: "5.3.0",
    555: "5.5.4",
}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(\s|$)")
_REWRITES = {
    **dict.fromkeys(TOO_LARGE_TEXTS, str(replies.TOO_LARGE)),
    MALFORMED_ADDRESS_TEXT: str(replies.MALFORMED_ADDRESS),
}


def with_enhanced_code(line: str) -> str:
    """``line`` with an enhanced status code (RFC 3463) if aiosmtpd gave it none."""
    if line in _REWRITES:
        return _REWRITES[line]
    if len(line) < 3 or not line[:3].isdigit() or _HAS_ENHANCED.match(line):
        return line
    if len(line) > 3 and line[3] == "-":
        return line
    enhanced = _ENHANCED_DEFAULTS.get(int(line[:3]))
    if enhanced is None:
        return line
    text = line[4:].removeprefix("Error: ") or "Ok"
    return f"{line[:3]} {enhanced} {text}"


#: C0 controls, DEL and C1 controls -> \xNN (tab, CR and LF included).
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}


def escape_client_text(text: str) -> str:
    """``text`` with control characters and undecodable bytes as ``\\xNN``;
    printable text, UTF-8 included, as it is."""
    if text.isprintable():
        return text
    # Bytes that were not UTF-8 arrive as lone surrogates (surrogateescape).
    decoded = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return decoded.translate(_CONTROLS)


def on_the_wire(status: str, *, enhance: bool = True) -> bytes:
    """One reply line as it is written (aiosmtpd adds the CRLF)."""
    if enhance:
        status = with_enhanced_code(status)
    return escape_client_text(status).encode("utf-8", "surrogateescape")
