"""The simple-message fast path of parse_message gives exactly the full parser's answer.

``message.simple.parse_simple`` reads single-part text/plain mail without the stdlib
feedparser (issue 15). Wherever it answers, its ParsedMessage must equal the
one ``message.parse.parse_full`` (the full stdlib parse) makes of the same bytes, header
order and duplicates included; wherever it declines, parse_message still gives
the full parser's answer. Checked on the test messages, on hostile hand-picked
ones and on generated messages: folded and huge headers, RFC 2047 words, 8-bit
and NUL bytes, bare LF and CR, odd Content-Type and transfer encodings.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from smtp_bridge.message import ParsedMessage, parse_message
from smtp_bridge.message.parse import parse_full
from smtp_bridge.message.simple import parse_simple

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from loadgen import build_message  # noqa: E402


def full(raw: bytes) -> ParsedMessage:
    return parse_full(raw, headers_only=False)


def check(raw: bytes) -> bool:
    """Assert the fast path (if it answers) and parse_message agree with the full
    parse; True if the fast path answered."""
    expected = full(raw)
    fast = parse_simple(raw)
    if fast is not None:
        assert fast == expected
        assert repr(fast.headers) == repr(expected.headers)  # order and duplicates
    got = parse_message(raw)
    assert got == expected
    assert repr(got.headers) == repr(expected.headers)
    return fast is not None


BENCH_MESSAGE = build_message(2048).replace(b"@@ID@@", b"1.2.3", 1)[: -len(b".\r\n")]

SIMPLE = [
    BENCH_MESSAGE,
    b"Subject: hi\r\n\r\nbody\r\n",
    b"From: A <a@example.com>\r\nTo: b@example.org, C <c@example.net>\r\nCc: d@x.y\r\n"
    b'Subject: s\r\nContent-Type: text/plain; charset="ISO-8859-1"; format=flowed\r\n'
    b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xe9\r\n",
    b"Subject: folded\r\n  over\r\n\ttwo lines\r\nX-Empty:\r\n next\r\n\r\nx",
    b"Subject: =?utf-8?q?caf=C3=A9?= =?utf-8?b?w6TDtsO8?=\r\nFrom: =?utf-8?q?J=C3=BCrgen?= "
    b"<j@example.com>\r\n\r\nx\r\n",
    b'Subject: \x00nul\x01\x1b[31m\r\nFrom: "Eve\x00\x07" <e@example.com>\r\n\r\n\x00body\x7f\r\n',
    b"Subject: M\xc3\xbcller \xff\r\nFrom: M\xc3\xbcller <m@example.com>\r\n\r\n\xe4\xf6\xfc\r\n",
    b"Subject: " + b"x" * 5000 + b"\r\nX-Long: " + b"y " * 3000 + b"\r\n\r\nbody",
    b"Subject: body with bare ends\r\n\r\nline\nline\rline\r\n",
    b"Subject: s\r\nContent-Type: TEXT/PLAIN;charset=utf-8;\r\n\r\n\xe2\x82\xac\r\n",
    b"Subject: s\r\nContent-Type: text/plain; charset=x-unknown-charset\r\n\r\n\xe9\r\n",
    b"Subject: s\r\nContent-Type: text/plain; charset=punycode\r\n\r\nabc\r\n",
    b"Subject: s\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\xff\xfe bad utf-8\r\n",
    b"Message-ID:   <a@b>  \r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n\r\n",
    b"To: undisclosed-recipients:;\r\nCc: bad address <<x@y>\r\nFrom: <>\r\n\r\nx",
    b"Subject: \x0b\x0c\x1c\x1d\x1e\xc2\x85\xe2\x80\xa8 breaks\r\n\r\nx",
    b"Subject: a\r\nSubject: b\r\nsubject: c\r\n\r\nx",
]

DECLINED = [
    b"From someone@example.com Mon Jan  1 00:00:00 2024\r\nSubject: mbox\r\n\r\nx",
    b" continued first\r\nSubject: s\r\n\r\nx",
    b"Subject: s\nTo: bare-lf@example.com\n\nbody\n",
    b"Subject: s\rTo: bare-cr@example.com\r\r\nbody",
    b"Subject: no separator\r\nnot a header line\r\n\r\nbody",
    b": no name\r\nSubject: s\r\n\r\nx",
    b"Bad Name: s\r\n\r\nx",
    b"Subject: only headers\r\n",
    b"\r\nbody without headers",
    b"\r\nSubject: after a blank line\r\n\r\nbody",
    b"Subject: s\r\nContent-Type: text/html\r\n\r\n<p>x</p>",
    b"Subject: s\r\nContent-Type: text/plain; charset*=utf-8''%C3%A4\r\n\r\nx",
    b"Subject: s\r\nContent-Type: text/plain (comment)\r\n\r\nx",
    b"Subject: s\r\nContent-Type: text/plain\r\nContent-Type: text/html\r\n\r\nx",
    b"Subject: s\r\nContent-Transfer-Encoding: base64\r\n\r\nQUJD\r\n",
    b"Subject: s\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n",
    b"Subject: s\r\nContent-Disposition: attachment; filename=a.txt\r\n\r\nx",
    b"Subject: s\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n",
    b"Subj\x00ect: s\r\n\r\nx",
    b'Subject: s\r\nContent-Type: text/plain; charset="utf-8\r\n\r\nx',
]


@pytest.mark.parametrize("raw", SIMPLE, ids=range(len(SIMPLE)))
def test_simple_messages_take_the_fast_path_and_agree(raw: bytes) -> None:
    assert check(raw)


@pytest.mark.parametrize("raw", DECLINED, ids=range(len(DECLINED)))
def test_other_messages_go_to_the_full_parser(raw: bytes) -> None:
    assert not check(raw)


@pytest.mark.parametrize("path", sorted(DATA.glob("*.eml")), ids=lambda p: p.name)
def test_the_test_messages_agree(path: Path) -> None:
    raw = path.read_bytes()
    check(raw)
    check(raw.replace(b"\r\n", b"\n"))
    # Their header blocks with a plain body: the fast path's kind of message.
    head = raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].replace(b"\n", b"\r\n")
    kept = b"\r\n".join(
        line for line in head.split(b"\r\n") if not line.lower().startswith((b"content-", b"mime-"))
    )
    assert check(kept + b"\r\n\r\nplain body\r\n") or kept.startswith((b" ", b"\t"))


HEADER_NAMES = st.sampled_from(
    ["Subject", "From", "To", "Cc", "Message-ID", "Date", "X-Thing", "Received", "subject",
     "Content-Type", "Content-Transfer-Encoding", "Content-Disposition", "MIME-Version"]
)  # fmt: skip
CONTENT_TYPES = st.sampled_from(
    ["text/plain", "text/plain; charset=utf-8", 'text/plain; charset="UTF-8"',
     "text/plain; charset=iso-8859-1; format=flowed", "text/plain;charset=us-ascii;",
     "text/plain; charset=koi8-r", "text/plain; charset=nonsense", "text/html",
     "TEXT/Plain ; charset = utf-8", "text/plain; charset*=utf-8''x", "text/plain;;",
     "text/plain; charset=utf-8 (c)", "multipart/mixed", "text/plain; name=a.txt", ""]
)  # fmt: skip
CTES = st.sampled_from(["7bit", "8bit", "binary", " 7BIT ", "base64", "quoted-printable", "x"])
WORDS = st.sampled_from(
    ["plain", "=?utf-8?q?caf=C3=A9?=", "=?iso-8859-1?b?6eDo?=", "=?bogus?q?x?=", "=?utf-8?q?",
     "<a@example.com>", "A <a@b.c>, b@c.d", "\"Q, uoted\" <q@x.y>", "undisclosed:;", "<<x@y>",
     "Mon, 01 Jan 2024 00:00:00 +0000", "(comment)", "@", ""]
)  # fmt: skip
HOSTILE = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def header_value(draw: st.DrawFn, name: str) -> bytes:
    if name == "Content-Type":
        return draw(CONTENT_TYPES).encode()
    if name == "Content-Transfer-Encoding":
        return draw(CTES).encode()
    parts = draw(st.lists(WORDS.map(str.encode) | HOSTILE, max_size=4))
    value = b" ".join(parts)
    if draw(st.booleans()):  # folded
        value = value.replace(b" ", draw(st.sampled_from([b"\r\n ", b"\r\n\t", b"\n "])), 1)
    if draw(st.integers(0, 20)) == 0:  # huge
        value += b" " + b"z" * draw(st.integers(900, 3000))
    return value


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    lines = []
    for name in draw(st.lists(HEADER_NAMES, max_size=8)):
        sep = draw(st.sampled_from([b": ", b":", b":\t", b":  "]))
        lines.append(name.encode() + sep + draw(header_value(name)))
    end = draw(st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r"]))
    body = draw(
        st.binary(max_size=300)
        | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))
    )
    return end.join(lines) + end + end + body


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
@example(BENCH_MESSAGE)
def test_generated_messages_agree(raw: bytes) -> None:
    check(raw)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=500))
def test_arbitrary_bytes_agree(raw: bytes) -> None:
    check(raw)
    check(b"Subject: x\r\n" + raw)


def test_generated_messages_do_reach_the_fast_path() -> None:
    """The generator is not vacuous: most generated messages of the simple kind answer."""
    hits = sum(
        check(b"Subject: s%d\r\nFrom: a@b.c\r\nContent-Type: %s\r\n\r\nbody"
              % (i, ct.encode()))
        for i, ct in enumerate(["text/plain", "text/plain; charset=utf-8", "text/html"])
    )  # fmt: skip
    assert hits == 2
