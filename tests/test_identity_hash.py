"""The retry content hash: the body is hashed where it lies, with the same digest.

Dedup keys already on record (the ledger of a running bridge) must keep their
value across the change that stopped copying a big message's body twice.
"""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from smtp_bridge.identity import TRACE_HEADERS, retry_content_hash
from smtp_bridge.message import normalize_line_ends


def hash_as_before(raw: bytes) -> str:
    """The formula as it was written before: head and body sliced, then joined."""
    import re

    field_name = re.compile(rb"^([!-9;-~]+)[ \t]*:")
    data = normalize_line_ends(raw)
    end = data.find(b"\r\n\r\n")
    head, body = (data, b"") if end < 0 else (data[: end + 2], data[end + 2 :])
    kept: list[bytes] = []
    dropping = False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        match = field_name.match(line)
        dropping = match is not None and match[1].decode("ascii").lower() in TRACE_HEADERS
        if not dropping:
            kept.append(line)
    return hashlib.sha256(b"\r\n".join(kept) + body).hexdigest()


_PIECES = st.sampled_from([
    b"Subject: hi", b"Received: from x", b" folded", b"\tfolded", b"\r\n", b"\n", b"\r",
    b"\r\n\r\n", b"body", b"X-Mailer: y", b"Return-Path: <a@b>", b":", b"\x00", b"\xff", b".",
])  # fmt: skip


@settings(max_examples=500)
@given(st.lists(_PIECES, max_size=24).map(b"".join))
def test_hash_unchanged_on_message_like_bytes(raw: bytes) -> None:
    assert retry_content_hash(raw) == hash_as_before(raw)


@given(st.binary(max_size=200))
def test_hash_unchanged_on_any_bytes(raw: bytes) -> None:
    assert retry_content_hash(raw) == hash_as_before(raw)


def test_hash_of_a_big_message_unchanged_and_traces_ignored() -> None:
    body = b"QUJD" * 250_000 + b"\r\n"
    raw = b"Received: from relay\r\nSubject: big\r\n\r\n" + body
    assert retry_content_hash(raw) == hash_as_before(raw)
    assert retry_content_hash(raw) == retry_content_hash(raw.replace(b"relay", b"other"))
