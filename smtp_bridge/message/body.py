"""Body text: the text/plain and text/html parts chosen, and decoded whatever they claim.

A declared charset may be wrong, unknown or no mail charset at all; decoding
never fails, it falls back (UTF-8, then Latin-1) instead.
"""

from __future__ import annotations

import codecs
import contextlib
from email.message import EmailMessage, Message

__all__ = ["body_part", "decode_bytes", "decode_text"]


def body_part(msg: Message, subtype: str) -> Message | None:
    """The part get_body() picks for ``text/<subtype>``; None if none or unreadable."""
    if not isinstance(msg, EmailMessage):
        return None
    try:
        return msg.get_body(preferencelist=(subtype,))
    except Exception:
        return None


def decode_text(part: Message) -> str:
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
    return decode_bytes(payload, charset).replace("\r\n", "\n").replace("\r", "\n")


# Python codecs a sender could name that are no mail charset: punycode takes
# seconds per megabyte, the escape codecs warn and interpret backslashes.
_NOT_MAIL_CHARSETS = frozenset(
    {"punycode", "idna", "unicode-escape", "raw-unicode-escape", "undefined"}
)


def decode_bytes(payload: bytes, charset: str | None) -> str:
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
