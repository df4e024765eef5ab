"""smtp_bridge.message: raw bytes -> the values templates see (docs/routing.md)."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtp_bridge import message
from smtp_bridge.message import (
    EMPTY_ADDRESS,
    Address,
    Attachment,
    HeaderMap,
    ParsedMessage,
    content_hash,
    has_bare_line_end,
    html_to_text,
    is_valid_address,
    normalize_line_ends,
    parse_address,
    parse_message,
)

DATA = Path(__file__).parent / "data"
FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def eml(name: str) -> bytes:
    return (DATA / name).read_bytes()


def mail(*headers: str, body: bytes | str = b"") -> bytes:
    """A message with CRLF line ends, as it arrives after DATA."""
    if isinstance(body, str):
        body = body.encode()
    head = "".join(f"{line}\r\n" for line in headers).encode()
    return head + b"\r\n" + body


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_one_line_fields(parsed: ParsedMessage) -> None:
    for value in (parsed.subject, parsed.message_id, parsed.date, *parsed.headers.values()):
        assert "\r" not in value and "\n" not in value
    for value in parsed.headers:
        assert "\r" not in value and "\n" not in value
    for address in (parsed.sender, *parsed.to, *parsed.cc):
        assert "\r" not in address.name + address.address
        assert "\n" not in address.name + address.address
    assert "\r" not in parsed.text
    assert "\r" not in parsed.html


def test_exports_exactly_the_public_interface() -> None:
    assert len(message.__all__) == len(set(message.__all__))
    assert all(hasattr(message, name) for name in message.__all__)
    assert set(message.__all__) == {
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
    }


# --- whole messages from tests/data ------------------------------------------


@pytest.mark.parametrize("line_ends", ["lf", "crlf"])
def test_alternative_with_both_bodies(line_ends: str) -> None:
    raw = eml("alternative.eml")
    if line_ends == "crlf":
        raw = normalize_line_ends(raw)
    parsed = parse_message(raw)

    assert parsed.subject == "Server \u201cweb-1\u201d ist wieder erreichbar äöü"
    assert parsed.sender == Address(
        address="joerg.mueller@Example.ORG",
        name="Jörg Müller",
        local="joerg.mueller",
        domain="Example.ORG",
    )
    assert parsed.to == [
        Address("jane@example.com", "Smith, Jane", "jane", "example.com"),
        Address("ops@example.com", "", "ops", "example.com"),
    ]
    # A group is flattened into its members.
    assert parsed.cc == [
        Address("alice@example.net", "", "alice", "example.net"),
        Address("bob@example.net", "Bob B.", "bob", "example.net"),
    ]
    assert parsed.text == (
        "Hallo Jane,\n\nder Server \u201cweb-1\u201d ist wieder erreichbar. Grüße, Jörg"
    )
    assert parsed.html == (
        "<html><head><title>web-1</title><style>p{margin:0}</style></head>"
        "<body><p>Hallo Jane,</p><p>der Server &ldquo;web-1&rdquo; ist wieder erreichbar.</p>"
        "</body></html>"
    )
    assert parsed.message_id == "<20240102093000.4AB2C@mail.example.org>"
    assert parsed.date == "Tue, 2 Jan 2024 09:30:00 +0000"
    assert parsed.attachments == []
    assert parsed.defects == 0
    assert parsed.headers["x-priority"] == "1"
    assert parsed.headers["Received"] == (
        "from mail.example.org (mail.example.org [192.0.2.10])"
        "\tby mx.example.com with ESMTPS id 4AB2C; Tue, 2 Jan 2024 09:30:01 +0000"
    )
    assert len(parsed.headers.get_all("received")) == 2
    assert_one_line_fields(parsed)


def test_line_ends_do_not_change_the_result() -> None:
    for name in ("alternative.eml", "html_only.eml", "mixed_nested.eml", "apple_mail.eml"):
        raw = eml(name)
        assert not has_bare_line_end(normalize_line_ends(raw))
        assert parse_message(raw) == parse_message(normalize_line_ends(raw)), name


def test_html_only_text_is_derived_from_html() -> None:
    parsed = parse_message(eml("html_only.eml"))

    assert parsed.subject == "Bestellung #4711"
    assert parsed.text == (
        "Bestellung #4711\n\n"
        "Grüße aus Köln & Umgebung.\n\n"
        "Artikel Preis\n"
        "Kaffee 4,50 €\n\n"
        "schnell\n"
        "günstig"
    )
    # The HTML itself is decoded (quoted-printable, ISO-8859-1) but otherwise untouched.
    assert parsed.html.startswith("<!DOCTYPE html>\n<html><head>")
    assert "<p>Grüße aus Köln &amp; Umgebung.</p>" in parsed.html
    assert "var tracking" in parsed.html
    assert parsed.attachments == []


def test_nested_mixed_with_attachments() -> None:
    parsed = parse_message(eml("mixed_nested.eml"))

    assert parsed.text == "See the attached report."
    assert parsed.html == ('<p>See the attached <b>report</b>.</p><img src="cid:logo@example.com">')
    inner = b"From: a@example.com\r\nSubject: inner\r\n\r\ninner body"
    assert parsed.attachments == [
        # The inline image of the multipart/related (no filename, no disposition).
        Attachment("", "image/png", 8),
        # RFC 2231 filename wins over the Content-Type name.
        Attachment("résumé.pdf", "application/pdf", 9),
        # No filename, but Content-Disposition: attachment.
        Attachment("", "image/jpeg", 6),
        # A text/plain marked attachment is not the body.
        Attachment("notes.txt", "text/plain", 6),
        # An attached message counts once, sized as it would be sent on.
        Attachment("", "message/rfc822", len(inner)),
    ]
    assert parsed.defects == 0


def test_apple_mail_attachment_inside_alternative() -> None:
    parsed = parse_message(eml("apple_mail.eml"))

    assert parsed.text == "Logs attached."
    # The first HTML part is the body; the trailing HTML fragment is no attachment.
    assert parsed.html == "<html><body><div>Logs attached.</div></body></html>"
    assert parsed.attachments == [Attachment("logs.tar.gz", "application/gzip", 10)]


# --- bodies --------------------------------------------------------------------


def test_text_only_has_empty_html() -> None:
    parsed = parse_message(mail("Subject: plain", body="line one\r\nline two\r\n"))
    assert parsed.text == "line one\nline two\n"
    assert parsed.html == ""
    assert parsed.attachments == []


@pytest.mark.parametrize(
    ("encoding", "payload", "expected"),
    [
        ("7bit", b"plain ascii\r\n", "plain ascii\n"),
        ("8bit", "Grüße\r\n".encode(), "Grüße\n"),
        ("quoted-printable", b"Gr=C3=BC=C3=9Fe, soft=\r\n break=3D\r\n", "Grüße, soft break=\n"),
        ("base64", b64("Grüße\r\nzwei\r\n".encode()).encode() + b"\r\n", "Grüße\nzwei\n"),
        ("binary", "bin\u00e4r\r\n".encode(), "binär\n"),
    ],
    ids=["7bit", "8bit", "quoted-printable", "base64", "binary"],
)
def test_transfer_encodings(encoding: str, payload: bytes, expected: str) -> None:
    raw = mail(
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Transfer-Encoding: {encoding}",
        body=payload,
    )
    assert parse_message(raw).text == expected


@pytest.mark.parametrize(
    ("content_type", "payload", "expected"),
    [
        ("text/plain; charset=iso-8859-1", b"caf\xe9", "café"),
        ("text/plain; charset=windows-1252", b"\x80 5", "€ 5"),
        ("text/plain; charset=koi8-r", b"\xf0\xd2\xc9\xd7\xc5\xd4", "Привет"),
        # No charset at all (us-ascii by default) and not UTF-8: legacy 8-bit, read as Latin-1.
        ("text/plain", b"caf\xe9 cr\xe8me", "café crème"),
        # No charset but valid UTF-8: UTF-8.
        ("text/plain", "café".encode(), "café"),
        # Unknown charset: UTF-8 if it fits, else Latin-1.
        ('text/plain; charset="x-unknown"', "café".encode(), "café"),
        ('text/plain; charset="x-unknown"', b"caf\xe9", "café"),
        # Declared UTF-8 with one broken byte: the rest stays readable.
        ("text/plain; charset=utf-8", b"J\xc3\xb6rg \xff ok", "Jörg \ufffd ok"),
        # Charsets Python knows but no mailer means: never used.
        ("text/plain; charset=unicode-escape", b"\\u0041", "\\u0041"),
        ("text/plain; charset=base64", b"aGk=", "aGk="),
        ("text/plain; charset=punycode", b"a" * 50_000, "a" * 50_000),
    ],
    ids=[
        "latin-1",
        "cp1252",
        "koi8-r",
        "undeclared-latin-1",
        "undeclared-utf-8",
        "unknown-charset-utf-8",
        "unknown-charset-latin-1",
        "broken-utf-8",
        "unicode-escape-ignored",
        "non-text-codec-ignored",
        "punycode-ignored",
    ],
)
def test_charsets(content_type: str, payload: bytes, expected: str) -> None:
    raw = mail(f"Content-Type: {content_type}", "Content-Transfer-Encoding: 8bit", body=payload)
    assert parse_message(raw).text == expected


def test_text_line_ends_become_lf() -> None:
    raw = mail(body=b"a\r\nb\rc\nd\r\n")
    assert parse_message(raw).text == "a\nb\nc\nd\n"
    raw = mail(
        "Content-Type: text/html",
        "Content-Transfer-Encoding: base64",
        body=b64(b"<p>x</p>\r\n<pre>a\r\nb\rc</pre>\r\n"),
    )
    parsed = parse_message(raw)
    assert parsed.html == "<p>x</p>\n<pre>a\nb\nc</pre>\n"
    assert parsed.text == "x\n\na\nb\nc"


def test_empty_text_part_beside_html_uses_the_html() -> None:
    raw = crlf(
        "Content-Type: multipart/alternative; boundary=b\n\n"
        "--b\nContent-Type: text/plain\n\n \n"
        "--b\nContent-Type: text/html\n\n<p>Only here</p>\n"
        "--b--\n"
    )
    parsed = parse_message(raw)
    assert parsed.text == "Only here"
    assert parsed.html == "<p>Only here</p>"


def test_multipart_alternative_prefers_the_parts_by_type_not_order() -> None:
    raw = crlf(
        "Content-Type: multipart/alternative; boundary=b\n\n"
        "--b\nContent-Type: text/html\n\n<b>html</b>\n"
        "--b\nContent-Type: text/plain\n\nplain\n"
        "--b--\n"
    )
    parsed = parse_message(raw)
    assert parsed.text == "plain"
    assert parsed.html == "<b>html</b>"


def test_whole_message_that_is_an_attachment() -> None:
    raw = mail(
        "Content-Type: application/pdf",
        'Content-Disposition: attachment; filename="scan.pdf"',
        "Content-Transfer-Encoding: base64",
        body="JVBERi0xLjQK\r\n",
    )
    parsed = parse_message(raw)
    assert parsed.text == ""
    assert parsed.html == ""
    assert parsed.attachments == [Attachment("scan.pdf", "application/pdf", 9)]


def test_attachment_filename_forms() -> None:
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=b\n\n"
        "--b\nContent-Type: text/plain\n\nbody\n"
        # RFC 2047 in a quoted filename: wrong, but what many mailers send.
        "--b\nContent-Type: application/octet-stream\nContent-Disposition: attachment;"
        ' filename="=?UTF-8?B?w6TDtsO8LnR4dA==?="\nContent-Transfer-Encoding: base64\n\nAAEC\n'
        # Only a Content-Type name.
        '--b\nContent-Type: image/gif; name="dot.gif"\nContent-Transfer-Encoding: base64\n\n'
        "R0lGODlh\n"
        # An RFC 2231 filename split over two continuations.
        "--b\nContent-Type: application/zip\nContent-Disposition: attachment;\n"
        " filename*0*=UTF-8''long%20;\n filename*1=name.zip\n\nPK\n"
        "--b--\n"
    )
    parsed = parse_message(raw)
    assert parsed.text == "body"
    assert parsed.attachments == [
        Attachment("äöü.txt", "application/octet-stream", 3),
        Attachment("dot.gif", "image/gif", 6),
        Attachment("long name.zip", "application/zip", 2),
    ]


def test_second_text_part_without_name_is_not_an_attachment() -> None:
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=b\n\n"
        "--b\nContent-Type: text/plain\n\nfirst\n"
        "--b\nContent-Type: text/plain\n\nfooter\n"
        "--b\nContent-Type: text/calendar\n\nBEGIN:VCALENDAR\n"
        "--b--\n"
    )
    parsed = parse_message(raw)
    assert parsed.text == "first"
    assert parsed.attachments == [Attachment("", "text/calendar", 15)]


def test_one_megabyte_body() -> None:
    line = "0123456789abcdef" * 4 + "\r\n"
    body = line * (1_048_576 // len(line) + 1)
    assert len(body) > 1_048_576
    parsed = parse_message(mail("Subject: big", body=body))
    assert parsed.subject == "big"
    assert parsed.text == body.replace("\r\n", "\n")
    assert len(parsed.text) == 15_888 * 65


def test_one_megabyte_base64_attachment() -> None:
    data = bytes(range(256)) * 4096
    encoded = base64.encodebytes(data).decode().replace("\n", "\r\n")
    raw = (
        crlf("Content-Type: multipart/mixed; boundary=b\n\n--b\n\nhi\n--b\n")
        + crlf(
            'Content-Type: application/octet-stream; name="blob.bin"\n'
            "Content-Transfer-Encoding: base64\n\n"
        )
        + encoded.encode()
        + b"--b--\r\n"
    )
    parsed = parse_message(raw)
    assert parsed.text == "hi"
    assert parsed.attachments == [Attachment("blob.bin", "application/octet-stream", 1_048_576)]


# --- broken input: never raise -------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"", ""),
        (b"\r\n", ""),
        (b"\x00\xff\xfe\x80garbage", "\x00ÿþ\x80garbage"),
        (b"no header here\r\njust text\r\n", "no header here\njust text\n"),
        (b"Subject: headers only", ""),
        (b"Subject: headers only\r\nFrom: a@b\r\n", ""),
        (b":\r\n: :\r\n\r\n", ""),
    ],
    ids=["empty", "blank-line", "garbage", "no-headers", "header-no-eol", "headers-only", "colons"],
)
def test_degenerate_input(raw: bytes, text: str) -> None:
    parsed = parse_message(raw)
    assert parsed.text == text
    assert parsed.html == ""
    assert parsed.attachments == []
    assert_one_line_fields(parsed)


def test_empty_input_is_all_empty() -> None:
    assert parse_message(b"") == ParsedMessage(headers=HeaderMap())
    assert parse_message(b"").sender is EMPTY_ADDRESS


def test_multipart_without_boundary() -> None:
    parsed = parse_message(
        mail("Subject: s", "Content-Type: multipart/mixed", body=b"--x\r\nhello\r\n")
    )
    assert parsed.subject == "s"
    assert parsed.text == ""
    assert parsed.attachments == []
    assert parsed.defects == 2  # NoBoundaryInMultipart, MultipartInvariantViolation


def test_truncated_multipart() -> None:
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=b\n\n"
        "--b\nContent-Type: text/plain\n\nfirst part\n"
        "--b\nContent-Type: application/pdf; name=cut.pdf\nContent-Transfer-Encoding: base64\n\n"
        "JVBER"
    )
    parsed = parse_message(raw)
    assert parsed.text == "first part"
    # Base64 cut mid-quantum cannot be decoded; the stdlib keeps the raw bytes.
    assert parsed.attachments == [Attachment("cut.pdf", "application/pdf", 5)]
    assert parsed.defects == 2  # CloseBoundaryNotFound, InvalidBase64Length


def test_invalid_base64_body() -> None:
    raw = mail(
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: base64",
        body=b"aGVsbG8gd29ybGQ\r\n!!*\r\n",
    )
    parsed = parse_message(raw)
    assert parsed.text == "hello world"
    assert parsed.defects == 2  # InvalidBase64Characters, InvalidBase64Padding


def test_unknown_transfer_encoding_keeps_the_bytes() -> None:
    raw = mail("Content-Transfer-Encoding: x-weird", body=b"as is\r\n")
    assert parse_message(raw).text == "as is\n"


def test_deep_nesting_falls_back_to_headers() -> None:
    depth = 2000
    parts = [
        f"--b{i}\r\nContent-Type: multipart/mixed; boundary=b{i + 1}\r\n\r\n" for i in range(depth)
    ]
    raw = (
        b"Subject: deep\r\nFrom: a@example.com\r\n"
        b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n" + "".join(parts).encode() + b"text"
    )
    parsed = parse_message(raw)
    assert parsed.subject == "deep"
    assert parsed.sender.address == "a@example.com"
    assert parsed.text == ""
    assert parsed.defects >= 1


def test_eight_bit_headers() -> None:
    raw = mail(
        "From: Jos\xe9 <jose@example.es>",
        "To: J\u00f6rg <j\u00f6rg@example.de>",
        "Subject: Caf\xe9 \u00e9t\u00e9",
        body=b"x",
    )
    # Latin-1 and UTF-8 bytes in one header: each run is read on its own.
    raw = raw.replace("Jos\xe9".encode(), b"Jos\xe9").replace("Caf\xe9".encode(), b"Caf\xe9")
    parsed = parse_message(raw)
    assert parsed.sender == Address("jose@example.es", "José", "jose", "example.es")
    assert parsed.to == [Address("jörg@example.de", "Jörg", "jörg", "example.de")]
    assert parsed.subject == "Café été"
    assert parsed.headers["From"] == "José <jose@example.es>"


def test_encoded_line_breaks_never_reach_header_values() -> None:
    raw = mail(
        "Subject: =?utf-8?q?a=0D=0Ab?= =?utf-8?q?c=0Dd=E2=80=A8e?=",
        "From: =?utf-8?q?Evil=0D=0ABcc_x?= <evil@example.com>",
        "X-Line: one\r\n two\r\n\tthree",
    )
    parsed = parse_message(raw)
    assert parsed.subject == "a bc d e"
    assert parsed.sender == Address("evil@example.com", "Evil Bcc x", "evil", "example.com")
    assert parsed.headers["x-line"] == "one two\tthree"
    assert_one_line_fields(parsed)


def test_broken_address_headers_do_not_lose_the_rest() -> None:
    raw = mail(
        "From: <<<@@@>>>",
        'To: "unterminated <a@example.com>',
        "Cc: @, ,;: <>",
        "Subject: still here",
    )
    parsed = parse_message(raw)
    assert parsed.subject == "still here"
    assert parsed.headers["From"] == "<<<@@@>>>"
    assert parsed.headers["To"] == '"unterminated <a@example.com>'
    assert_one_line_fields(parsed)


# --- subject -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Subject: =?UTF-8?B?w5xiZXJ3ZWlzdW5n?=", "Überweisung"),
        ("Subject: =?utf-8?q?=C3=9Cberweisung_erhalten?=", "Überweisung erhalten"),
        ("Subject: =?ISO-8859-1?Q?=DCberweisung?=", "Überweisung"),
        ("Subject: =?iso-8859-1?b?3GJlcndlaXN1bmc=?=", "Überweisung"),
        ("Subject: Re: =?UTF-8?Q?caf=C3=A9?= ok", "Re: café ok"),
        (
            "Subject: =?UTF-8?B?w5xiZXI=?=\r\n =?UTF-8?B?d2Vpc3VuZw==?=\r\n\tplain tail",
            "Überweisung\tplain tail",
        ),
        ("Subject: a long\r\n folded\r\n  subject", "a long folded  subject"),
        ("Subject: {{ 7*7 }}", "{{ 7*7 }}"),
        ("Subject: =?x-unknown?q?abc?=", "abc"),
        # The stdlib drops an encoded word it cannot decode (and notes a defect).
        ("Subject: a =?utf-8?b?!!!?= b", "a  b"),
        ("Subject:", ""),
        ("Subject:    padded   ", "padded"),
    ],
    ids=[
        "utf-8-b",
        "utf-8-q",
        "latin-1-q",
        "latin-1-b",
        "mixed",
        "folded-encoded-words",
        "folded-plain",
        "template-syntax-stays-text",
        "unknown-charset",
        "bad-base64",
        "empty",
        "padded",
    ],
)
def test_subject(header: str, expected: str) -> None:
    parsed = parse_message(mail(header, body=b"x"))
    assert parsed.subject == expected
    assert parsed.headers["subject"] == expected


def test_absent_fields_are_empty() -> None:
    parsed = parse_message(mail("X-Only: 1", body=b"x"))
    assert parsed.subject == ""
    assert parsed.sender == EMPTY_ADDRESS
    assert parsed.to == []
    assert parsed.cc == []
    assert parsed.message_id == ""
    assert parsed.date == ""


def test_message_id_and_date_as_given() -> None:
    parsed = parse_message(
        mail("Message-ID:\r\n   <a.b@c.example>  ", "Date: Tue,  2 Jan 2024 9:30:00 +0100 (CET)")
    )
    assert parsed.message_id == "<a.b@c.example>"
    # Not reformatted the way email.headerregistry.DateHeader would.
    assert parsed.date == "Tue,  2 Jan 2024 9:30:00 +0100 (CET)"


# --- header addresses ------------------------------------------------------------


def test_address_headers() -> None:
    raw = mail(
        "From: =?UTF-8?B?SsO2cmc=?= <joerg@Example.DE>, second@example.com",
        'To: "Doe, John" <john@example.com>, =?ISO-8859-1?Q?Fran=E7ois?= <f@example.fr>',
        "To: plain@example.com",
        "To: undisclosed-recipients:;",
        "Cc: Team: a@example.net, B <b@example.net>;, (comment) c@example.net",
        'Cc: "quoted@at" <"odd local"@example.org>',
    )
    parsed = parse_message(raw)
    assert parsed.sender == Address("joerg@Example.DE", "Jörg", "joerg", "Example.DE")
    assert [a.address for a in parsed.to] == [
        "john@example.com",
        "f@example.fr",
        "plain@example.com",
    ]
    assert [a.name for a in parsed.to] == ["Doe, John", "François", ""]
    assert parsed.cc == [
        Address("a@example.net", "", "a", "example.net"),
        Address("b@example.net", "B", "b", "example.net"),
        Address("c@example.net", "", "c", "example.net"),
        Address('"odd local"@example.org', "quoted@at", '"odd local"', "example.org"),
    ]
    assert str(parsed.sender) == "joerg@Example.DE"


def test_sender_without_usable_address() -> None:
    assert parse_message(mail("From: <>")).sender == EMPTY_ADDRESS
    # A bare local part (cron, say) is kept; a comment is not a display name.
    assert parse_message(mail("From: root (Cron Daemon)")).sender == Address("root", "", "root", "")
    assert parse_message(mail("From: undisclosed:;")).sender == EMPTY_ADDRESS


def test_local_and_domain_split_at_the_last_at() -> None:
    parsed = parse_message(mail('To: "a@b"@example.com'))
    assert parsed.to == [Address('"a@b"@example.com', "", '"a@b"', "example.com")]


# --- HeaderMap ---------------------------------------------------------------------


def test_header_map_is_case_insensitive_and_read_only() -> None:
    headers = HeaderMap([("Received", "one"), ("X-Tag", "t"), ("received", "two")])

    assert headers["RECEIVED"] == "one"
    assert headers.get("x-tag") == "t"
    assert headers.get("missing") is None
    assert headers.get("missing", "") == ""
    assert headers.get_all("Received") == ["one", "two"]
    assert headers.get_all("nope") == []
    assert list(headers) == ["Received", "X-Tag"]
    assert len(headers) == 2
    assert "x-TAG" in headers
    assert "nope" not in headers
    not_a_name: object = 1
    assert not_a_name not in headers
    assert dict(headers) == {"Received": "one", "X-Tag": "t"}
    with pytest.raises(KeyError):
        headers["nope"]
    with pytest.raises(KeyError):
        headers[1]  # type: ignore[index]
    with pytest.raises(TypeError):
        headers["x"] = "y"  # type: ignore[index]
    # get_all hands out a copy.
    headers.get_all("received").append("three")
    assert headers.get_all("received") == ["one", "two"]
    assert repr(headers).startswith("HeaderMap([('Received', 'one')")


def test_parsed_headers_keep_order_and_first_spelling() -> None:
    raw = mail("X-A: 1", "x-a: 2", "Subject: s", "X-B: =?utf-8?q?=C3=A9?=")
    headers = parse_message(raw).headers
    assert list(headers.items()) == [("X-A", "1"), ("Subject", "s"), ("X-B", "é")]
    assert headers.get_all("X-a") == ["1", "2"]


# --- envelope addresses ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("user@Example.COM", Address("user@Example.COM", "", "user", "Example.COM")),
        ("<user@example.com>", Address("user@example.com", "", "user", "example.com")),
        (" <user@example.com> ", Address("user@example.com", "", "user", "example.com")),
        ("", EMPTY_ADDRESS),
        ("<>", EMPTY_ADDRESS),
        ('"a@b"@example.com', Address('"a@b"@example.com', "", '"a@b"', "example.com")),
        ("postmaster", Address("postmaster", "", "postmaster", "")),
        (
            "<@relay.example:user@example.com>",
            Address("user@example.com", "", "user", "example.com"),
        ),
        ("jörg@bücher.de", Address("jörg@bücher.de", "", "jörg", "bücher.de")),
    ],
    ids=[
        "bare",
        "angle",
        "spaces",
        "null",
        "null-angle",
        "quoted-at",
        "no-domain",
        "source-route",
        "utf-8",
    ],
)
def test_parse_address(value: str, expected: Address) -> None:
    assert parse_address(value) == expected


def test_empty_address() -> None:
    assert Address("", "", "", "") == EMPTY_ADDRESS
    assert str(EMPTY_ADDRESS) == ""


VALID = [
    "user@example.com",
    "first.last+tag@sub.example.co.uk",
    "x@localhost",
    "!#$%&'*+-/=?^_`{|}~@example.com",
    '"quoted"@example.com',
    '"a@b"@example.com',
    '"esc\\"aped"@example.com',
    "user@[192.0.2.1]",
    "user@[IPv6:2001:db8::1]",
    "jörg@bücher.de",
    "用户@例子.广告",
    "user@xn--bcher-kva.de",
    "user@123.example",
    "a" * 64 + "@example.com",
    "u@" + ".".join(["a" * 63] * 3) + "." + "b" * 60,  # 254 octets
    "user@" + "ü" * 57 + ".de",  # A-label xn--... is 63 octets
]

INVALID = [
    "",
    "plain",
    "@example.com",
    "user@",
    "user@@example.com",
    "a@b@c.example",
    "<user@example.com>",
    "John <user@example.com>",
    "user name@example.com",
    "user@exa mple.com",
    "user\t@example.com",
    "user\x00@example.com",
    "user\x7f@example.com",
    "user\u0085@example.com",
    "user\u2028@example.com",
    "user\u00a0@example.com",
    "user\u200b@example.com",
    "user\udcff@example.com",
    ".user@example.com",
    "user.@example.com",
    "us..er@example.com",
    "us(er@example.com",
    "us,er@example.com",
    '"unterminated@example.com',
    '"a"b"@example.com',
    '"end\\"@example.com',
    "user@-example.com",
    "user@example-.com",
    "user@example..com",
    "user@.example.com",
    "user@example.com.",
    "user@exa_mple.com",
    "user@example.c☃m",
    "user@[300.0.0.1]",
    "user@[192.0.2]",
    "user@[IPv6:fe80::1%eth0]",
    "user@[IPv6:not-an-ip]",
    "user@[2001:db8::1]",
    "user@[tag:content]",
    "user@[]",
    "a" * 65 + "@example.com",
    "u@" + ".".join(["a" * 63] * 3) + "." + "b" * 61,  # 255 octets
    "user@" + "a" * 64 + ".com",
    "user@" + "ü" * 58 + ".de",  # A-label would be 64 octets
    "ü" * 33 + "@example.com",  # 66 octets of local part
]


@pytest.mark.parametrize("value", VALID)
def test_valid_envelope_addresses(value: str) -> None:
    assert is_valid_address(value) is True


@pytest.mark.parametrize("value", INVALID)
def test_invalid_envelope_addresses(value: str) -> None:
    assert is_valid_address(value) is False


def test_address_length_limits_are_octets() -> None:
    assert len(VALID[-2].encode()) == 254
    assert len(INVALID[-4].encode()) == 255
    assert len(("ü" * 32).encode()) == 64
    assert is_valid_address("ü" * 32 + "@example.com") is True


# --- html_to_text ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("html", "expected"),
    [
        ("<p>a</p><p>b</p>", "a\n\nb"),
        ("<div>a</div><div>b</div>", "a\nb"),
        ("a<br>b<br/>c<br><br>d<br><br><br><br>e", "a\nb\nc\n\nd\n\ne"),
        ("<ul><li>one</li><li>two</li></ul>after", "one\ntwo\n\nafter"),
        ("<table><tr><th>a</th><td>b</td></tr><tr><td>c</td><td>d</td></tr></table>", "a b\nc d"),
        ("<h1>Title</h1>text<h6>small</h6>", "Title\n\ntext\n\nsmall"),
        ("<style>p { color: red }</style><script>alert('<p>x</p>')</script>shown", "shown"),
        ("<title>Newsletter</title><p>body</p>", "body"),
        (
            "Fish &amp; Chips &lt;b&gt; &eacute;&#233;&#xe9; &euro;&nbsp;5",
            "Fish & Chips <b> ééé € 5",
        ),
        ("  lots   of \n\n spaces  <b>bold</b> , end ", "lots of spaces bold , end"),
        ("<p>a <b>b</b> <i>c</i></p>", "a b c"),
        ("<span>a</span><span>b</span>", "ab"),
        ("<p>\n</p><p> </p><div>x</div>", "x"),
        ("<pre>keep\n    indent\r\nhere</pre>after", "keep\n    indent\nhere\n\nafter"),
        ("&zwnj;&nbsp;&#8203;&shy;Preview", "Preview"),
        ("<!-- comment -->a<!DOCTYPE html><?php x ?>b", "ab"),
        ("<![if !supportLists]>1.<![endif]> item", "1. item"),
        ("a<![bogus section]>b", "ab"),
        ("unclosed <b>bold <p>para", "unclosed bold\n\npara"),
        ("<script>never closed", ""),
        ("", ""),
        ("plain text, no tags", "plain text, no tags"),
        ("<", "<"),
        ("a < b > c", "a < b > c"),
    ],
)
def test_html_to_text(html: str, expected: str) -> None:
    assert html_to_text(html) == expected


# --- line ends and the content hash ----------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normal", "bare"),
    [
        (b"", b"", False),
        (b"no line end", b"no line end", False),
        (b"a\r\nb\r\n", b"a\r\nb\r\n", False),
        (b"a\nb\n", b"a\r\nb\r\n", True),
        (b"a\rb\r", b"a\r\nb\r\n", True),
        (b"a\r\nb\nc\rd", b"a\r\nb\r\nc\r\nd", True),
        (b"\n\r", b"\r\n\r\n", True),
        (b"\r\r\n\n", b"\r\n\r\n\r\n", True),
        (b"\r", b"\r\n", True),
    ],
    ids=["empty", "none", "crlf", "lf", "cr", "mixed", "lf-cr", "cr-crlf-lf", "lone-cr"],
)
def test_line_ends(raw: bytes, normal: bytes, bare: bool) -> None:
    assert normalize_line_ends(raw) == normal
    assert has_bare_line_end(raw) is bare
    assert has_bare_line_end(normal) is False


def test_content_hash_ignores_line_end_style() -> None:
    crlf_raw = b"Subject: x\r\n\r\nbody\r\n"
    expected = hashlib.sha256(crlf_raw).hexdigest()
    assert content_hash(crlf_raw) == expected
    assert content_hash(b"Subject: x\n\nbody\n") == expected
    assert content_hash(b"Subject: x\r\n\nbody\r") == expected
    assert content_hash(b"Subject: y\r\n\r\nbody\r\n") != expected
    assert content_hash(b"") == hashlib.sha256(b"").hexdigest()


# --- properties ---------------------------------------------------------------------------

SEEDS = [eml(name) for name in sorted(p.name for p in DATA.glob("*.eml"))] + [
    mail(
        "From: =?UTF-8?B?SsO2cmc=?= <j@example.de>",
        "To: a@b, G: c@d;",
        "Subject: =?ISO-8859-1?Q?caf=E9?=",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: quoted-printable",
        body=b"caf=C3=A9\r\n",
    ),
]
SPECIALS = [
    b"=?",
    b"?=",
    b"?B?",
    b"?Q?",
    b"=?utf-8?q?",
    b"<",
    b">",
    b'"',
    b"\\",
    b":",
    b";",
    b",",
    b"@",
    b"(",
    b")",
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n\r\n",
    b"--",
    b"--mix",
    b"--alt",
    b"\xff",
    b"\xc3",
    b"\x00",
    b"multipart/mixed; boundary=",
    b"charset=",
    b"filename*0*=",
    b"Content-Transfer-Encoding: base64\r\n",
    b"'",
    b"%",
    b" ",
    b"\t",
]


@FUZZ
@given(st.binary(max_size=4096))
def test_parse_message_never_raises_on_any_bytes(raw: bytes) -> None:
    assert_one_line_fields(parse_message(raw))


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(raw)))
        op = draw(st.sampled_from(["insert", "delete", "bytes"]))
        if op == "insert":
            raw[pos:pos] = draw(st.sampled_from(SPECIALS))
        elif op == "delete":
            del raw[pos : pos + draw(st.integers(1, 16))]
        else:
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=4))
    return bytes(raw)


@FUZZ
@given(mutated_messages())
def test_parse_message_never_raises_on_mutated_messages(raw: bytes) -> None:
    parsed = parse_message(raw)
    assert_one_line_fields(parsed)
    assert parsed.defects >= 0
    assert all(attachment.size >= 0 for attachment in parsed.attachments)


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("<>/ pbrdivscriptle=&;#x0a\n\r!-[]?éЖ\u00a0"))))
def test_html_to_text_never_raises(html: str) -> None:
    text = html_to_text(html)
    assert text == text.strip()
    assert "\r" not in text
    assert "\n\n\n" not in text


@FUZZ
@given(st.text())
def test_envelope_helpers_never_raise(value: str) -> None:
    assert isinstance(is_valid_address(value), bool)
    address = parse_address(value)
    assert address.name == ""
    if address.domain:
        assert address.address == f"{address.local}@{address.domain}"


@FUZZ
@given(st.binary())
def test_normalize_line_ends_properties(raw: bytes) -> None:
    normal = normalize_line_ends(raw)
    assert not has_bare_line_end(normal)
    assert normalize_line_ends(normal) == normal
    assert normal.replace(b"\r\n", b"") == raw.replace(b"\r\n", b"").replace(b"\r", b"").replace(
        b"\n", b""
    )
    assert content_hash(raw) == content_hash(normal)
