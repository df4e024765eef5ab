"""Attachments: the parts of a parsed message that are not its body, and their sizes.

Templates learn a file's name, type and size, never its content; the size of
a base64 part is read where it lies rather than decoded (bench/README.md).
"""

from __future__ import annotations

import re
from email import policy
from email.message import EmailMessage, Message

from .model import Attachment
from .sanitize import desurrogate, one_line

__all__ = ["scan_parts"]

# Serialising an attached message for its size: CRLF, headers left as they came.
_WIRE = policy.SMTP.clone(max_line_length=None)
# Defensive bound on our own recursion; the parser gives up well before this.
_MAX_DEPTH = 100


def scan_parts(
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
        defects += scan_parts(sub, bodies, out, depth + 1)
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
        filename = one_line(desurrogate(part.get_filename() or "")).strip()
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
