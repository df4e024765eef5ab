"""The speed-ups of issue 6 give exactly what the code they replace gave.

Each fast path is compared with the slow original on the test messages, on
hand-picked edge cases and on generated input: the parse with its header
cache, chunked feeding and base64 size shortcut against the stdlib parse with
policy.default; ``has_bare_line_end`` against its regex; the bridge's
``_getaddr`` against aiosmtpd's own.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from email import policy
from email.headerregistry import HeaderRegistry
from email.parser import BytesParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtp_bridge.message import (
    ParsedMessage,
    attachments,
    has_bare_line_end,
    headers,
    parse,
    parse_message,
)
from smtp_bridge.smtp.protocol import BridgeSMTP

DATA = Path(__file__).parent / "data"


def slow_parse(raw: bytes) -> ParsedMessage:
    """parse_message as it was: stdlib policy.default, whole-message parsebytes,
    fresh header classes and objects every time, decode to learn a size."""
    saved = (parse._POLICY, headers._STRUCTURED, headers._UNSTRUCTURED)
    saved_fns = (parse._parse_bytes, attachments._base64_size, parse.parse_simple)
    parse._POLICY = policy.default
    headers._STRUCTURED = HeaderRegistry()
    headers._UNSTRUCTURED = HeaderRegistry(use_default_map=False)
    parse._parse_bytes = lambda raw, *, headers_only: BytesParser(  # type: ignore[assignment]
        policy=policy.default
    ).parsebytes(raw, headersonly=headers_only)
    attachments._base64_size = lambda part: None  # type: ignore[assignment]
    parse.parse_simple = lambda raw: None  # type: ignore[assignment]
    try:
        return parse_message(raw)
    finally:
        parse._POLICY, headers._STRUCTURED, headers._UNSTRUCTURED = saved
        parse._parse_bytes, attachments._base64_size, parse.parse_simple = saved_fns


def same(raw: bytes) -> None:
    fast, slow = parse_message(raw), slow_parse(raw)
    assert fast == slow
    assert list(fast.headers.items()) == list(slow.headers.items())
    assert repr(fast.headers) == repr(slow.headers)  # duplicates and order too
    again = parse_message(raw)  # now every header comes from the cache
    assert again == slow and repr(again.headers) == repr(slow.headers)


def attachment(body: str, *, cte: str = "base64") -> bytes:
    return (
        "From: A <a@example.com>\r\nTo: b@example.org\r\nSubject: s\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
        "--b\r\nContent-Type: application/pdf\r\n"
        f'Content-Disposition: attachment; filename="a.pdf"\r\n'
        f"Content-Transfer-Encoding: {cte}\r\n\r\n{body}\r\n--b--\r\n"
    ).encode()


BASE64_BODIES = [
    "", "QUJD", "QUJDRA==", "QUJDREU=", "QUJ\r\nDRA==\r\n", "QUJDRA", "QUJDR", "QU=JD",
    "QUJD!!", "QUJDRA===", "====", "Q\r\nU\r\nJ\r\nD", "4pyTIMOgIGxh",
]  # fmt: skip


def corpus() -> Iterator[tuple[str, bytes]]:
    for path in sorted(DATA.glob("*.eml")):
        yield path.name, path.read_bytes()
    yield (
        "encoded words",
        (
            b"From: =?utf-8?q?J=C3=BCrgen?= <j@example.com>\r\n"
            b"To: undisclosed-recipients:;, =?iso-8859-1?q?Andr=E9?= <a@b.c>\r\n"
            b"Cc: bad address <<x@y>\r\nSubject: =?utf-8?b?w6TDtsO8?= tail\r\n"
            b"Content-Type: text/plain; charset*=utf-8''%C3%A4\r\n\r\nbody\r\n"
        ),
    )
    yield "8-bit headers", b"From: M\xc3\xbcller <m@example.com>\r\nSubject: \xe4\r\n\r\nx\r\n"
    yield "broken content-type", b"Content-Type: text/; ;;charset=\r\n\r\nbody\r\n"
    yield "crlf at chunk edge", b"Subject: edge\r\n\r\n" + b"x" * 8173 + b"\r\n" + b"y" * 9000
    yield "bare lf body", b"Subject: lf\n\n" + b"line\n" * 5000
    for body in BASE64_BODIES:
        yield f"base64 {body!r}", attachment(body)
    yield "big base64", attachment(base64.encodebytes(bytes(range(256)) * 400).decode())
    yield "quoted-printable", attachment("caf=C3=A9=\r\nx", cte="quoted-printable")
    yield "uppercase cte", attachment("QUJD", cte="BASE64")


@pytest.mark.parametrize(("name", "raw"), list(corpus()), ids=[n for n, _ in corpus()])
def test_parse_is_unchanged(name: str, raw: bytes) -> None:
    same(raw)
    same(raw.replace(b"\r\n", b"\n"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet="ABCDxyz019+/=\r\n !", max_size=80))
def test_base64_size_shortcut_matches_decoding(body: str) -> None:
    same(attachment(body))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000), st.sampled_from([b"\r\n", b"\n", b"\r"]))
def test_parse_of_arbitrary_bytes_is_unchanged(tail: bytes, end: bytes) -> None:
    same(b"Subject: x" + end + b"Content-Type: text/plain" + end + end + tail)


_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@given(st.binary(max_size=200) | st.lists(st.sampled_from([b"\r", b"\n", b"a", b"\r\n"])).map(
    b"".join
))  # fmt: skip
def test_has_bare_line_end_matches_the_regex(raw: bytes) -> None:
    assert has_bare_line_end(raw) == (_BARE.search(raw) is not None)


GETADDR_CASES = [
    "", "<>", "<a@b.c>", "a@b.c", "<a@b.c> SIZE=100 BODY=8BITMIME", " <a@b.c>", "<a@b.c",
    "<@relay:a@b.c>", '<"quoted local"@b.c>', "<a..b@c>", "<ü@example.com>", "<a@[192.0.2.1]>",
    "not an address", "<" + "x" * 70 + "@b.c>", "a@b.c trailing", "<a@b.c>>", "(comment) <a@b>",
    "<a@b.c> (comment) SIZE=1", "<a@b.c>\t\tSIZE=1", "\t<a.b@c.d>", "<a@b.c.>", "<.a@b>",
    "<a@b.c>(c)", "\x0b<a@b.c>", "<a@b.c>  ", "<o'neil+x@b-c.d> BODY=8BITMIME",
]  # fmt: skip


def stub(limit: int) -> Any:
    return SimpleNamespace(local_part_limit=limit)


def aiosmtpd_getaddr(limit: int, arg: str) -> tuple[str | None, str | None]:
    """aiosmtpd's answer, except where it raises: on "a@" and "a@[" the stdlib
    tokenizer raises IndexError or AttributeError, which aiosmtpd turns into an
    internal error; the bridge answers them as unparsable, (None, None) -> 553."""
    try:
        result: tuple[str | None, str | None] = SMTP._getaddr(stub(limit), arg)
    except (IndexError, AttributeError):
        return None, None
    return result


@pytest.mark.parametrize("arg", [*GETADDR_CASES, "a@", "0@[", "<a@b.c> x@"])
@pytest.mark.parametrize("limit", [0, 64])
def test_getaddr_matches_aiosmtpd(arg: str, limit: int) -> None:
    assert BridgeSMTP._getaddr(stub(limit), arg) == aiosmtpd_getaddr(limit, arg)


@given(st.text(max_size=60))
def test_getaddr_matches_aiosmtpd_on_any_text(arg: str) -> None:
    assert BridgeSMTP._getaddr(stub(64), arg) == aiosmtpd_getaddr(64, arg)


#: Pieces of MAIL/RCPT arguments, ordinary and hostile, that the fast path for
#: "<dot-atom@dot-atom> params" meets or must leave to the tokenizer.
_ADDRESS_PARTS = st.sampled_from([
    "a", "Z9", "user.name", "x+tag", "o'neil", "{}|~^`", "..", ".", "@", "<", ">", " ", "\t",
    "(c)", '"q"', "ü", "[", "]", "\r\n", "\x00", "SIZE=1", "=", ",", ";", ":", "\\",
])  # fmt: skip


@settings(max_examples=400)
@given(st.lists(_ADDRESS_PARTS, max_size=12).map("".join), st.sampled_from([0, 5, 64]))
def test_getaddr_matches_aiosmtpd_on_address_like_text(body: str, limit: int) -> None:
    for arg in (body, f"<{body}>", f"<{body}@example.org> {body}", f" <a.b@{body}>{body}"):
        assert BridgeSMTP._getaddr(stub(limit), arg) == aiosmtpd_getaddr(limit, arg), arg


# -- is_valid_address: the plain ASCII address in one regex --------------------

#: Pieces of envelope addresses, ordinary and hostile, for the fast path to meet.
_RCPT_PARTS = st.sampled_from([
    "a", "Z9", "user.name", "x+tag", "o'neil", "{}|~^`", "..", ".", "@", "-", "a-b", "_",
    "example.org", "xn--bcher-kva.example", "ü", "[192.0.2.1]", "[IPv6:2001:db8::1]",
    '"q r"', " ", "<", ">", "\x00", "\x7f", "\ud800", "\n", "a" * 63, "b" * 64, "%",
])  # fmt: skip


def check_address_both_ways(value: str) -> None:
    from smtp_bridge.message import addresses

    slow = addresses._checked_address(value)
    assert addresses.is_valid_address(value) == slow, value
    if len(value) <= 254 and addresses._PLAIN_ADDRESS.fullmatch(value):
        assert slow, value  # the fast path never accepts what the checks refuse


@pytest.mark.parametrize(
    "value",
    [
        "a@b", "user.name+tag@example.org", "a@b.c.d", "a@-b.c", "a@b-.c", "a@b..c", "a@b.c.",
        ".a@b", "a.@b", "a..b@c", f"{'x' * 64}@b", f"{'x' * 65}@b", f"a@{'l' * 63}.org",
        f"a@{'l' * 64}.org", f"a@{'b.' * 125}org", "a@b@c", "@b", "a@", "a b@c", "a@b\n",
        "a@b_c.org", "Ünï@example.org", "a@[192.0.2.1]",
    ],
)  # fmt: skip
def test_is_valid_address_fast_path_matches_the_checks(value: str) -> None:
    check_address_both_ways(value)


@settings(max_examples=600)
@given(
    st.lists(_RCPT_PARTS, max_size=10).map("".join), st.lists(_RCPT_PARTS, max_size=10).map("".join)
)
def test_is_valid_address_fast_path_matches_on_generated_addresses(local: str, domain: str) -> None:
    for value in (f"{local}@{domain}", local, f"{local}@{domain}@{domain}"):
        check_address_both_ways(value)


@given(st.text(max_size=80))
def test_is_valid_address_fast_path_matches_on_any_text(value: str) -> None:
    check_address_both_ways(value)


# -- address headers remembered ------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        '"Billing" <billing@example.com>', "a@b.c, d@e.f", "undisclosed-recipients:;",
        "=?utf-8?q?J=C3=A4ck?= <j@example.org>", "not an address", "<>", "x" * 1200 + "@y.z",
    ],
)  # fmt: skip
def test_remembered_address_header_reads_as_a_fresh_one(value: str) -> None:
    from smtp_bridge.message import headers

    first = headers._addresses("To", value, value)
    again = headers._addresses("To", value, value)
    assert first == again == headers._read_addresses("To", value, value)
    raw = f"To: {value}\r\nSubject: s\r\n\r\nbody\r\n".encode()
    one, two = parse_message(raw), parse_message(raw)
    assert one.to == two.to and one.to is not two.to  # each message its own list
