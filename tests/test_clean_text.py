"""Text that reaches the API is clean (issue 13, item 9).

Control characters other than tab and newline are removed from ``data``,
``alias`` and ``reply_to``; CR LF and a lone CR become "\\n", as a body's line
ends already do. End to end: a message whose Subject, body and From display
name carry NUL, BEL, ESC and other control bytes arrives at the sandbox API
without them, through the real daemon and a real SMTP client.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from smtp_bridge.templating import clean_data, clean_text


def controls(text: str) -> set[str]:
    return {c for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n"}


def test_clean_text_examples() -> None:
    assert clean_text("plain text") == "plain text"
    assert clean_text("a\x00b\x07c\x1b[31md\x7fe\x85f\x9f") == "abc[31mdef"
    assert clean_text("one\r\ntwo\rthree\nfour\tfive") == "one\ntwo\nthree\nfour\tfive"
    assert clean_text("\x00\x01\x02") == ""
    assert (
        clean_text("caf\u00e9 \u2028 \u200b \xa0 \U0001f600")
        == "caf\u00e9 \u2028 \u200b \xa0 \U0001f600"
    )


@given(st.text() | st.text(st.characters(max_codepoint=0x3000, blacklist_categories=())))
def test_clean_text_leaves_no_control_character_and_keeps_the_rest(text: str) -> None:
    cleaned = clean_text(text)
    assert not controls(cleaned) and "\r" not in cleaned
    normalised = text.replace("\r\n", "\n").replace("\r", "\n")
    assert cleaned == "".join(c for c in normalised if not controls(c))


def test_clean_data_reaches_every_string() -> None:
    data: Any = {"a\x00": ["x\x01", {"b": "y\x1b"}, 3, None, True], "n": 1.5}
    assert clean_data(data) == {"a": ["x", {"b": "y"}, 3, None, True], "n": 1.5}


ROUTES = """
routes:
  - name: default
    template_id: "E_GENERIC"
    alias: "{{ sender.name }}"
    reply_to: "{{ headers['X-Reply'] }}"
    data:
      subject: "{{ subject }}"
      body: "{{ text }}"
      literal: "{{ subject | upper }} and {{ sender.name }}"
"""


async def test_control_characters_never_reach_the_api(bridge: Any) -> None:
    raw = (
        b'From: "Nul\x00Name\x07" <shop@example.com>\r\n'
        b"To: bob@example.org\r\n"
        b"Subject: Order\x00 \x1b[31mshipped\x08\x7f\r\n"
        b"X-Reply: help\x00@example.com\r\n"
        b"Message-ID: <clean-1@example.com>\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
        b"Line\x00 one\x0c\r\nLine\x01 two\tend\x1b\r\n\xc2\x85C1\r\n"
    )
    async with bridge(ROUTES) as b:
        code, text = await b.send(raw, ["bob@example.org"])
        assert code == 250, text
        [request] = b.delivered("bob@example.org")
    assert request["alias"] == "NulName"
    assert request["reply_to"] == "help@example.com"
    assert request["data"] == {
        "subject": "Order [31mshipped",
        "body": "Line one\nLine two\tend\nC1\n",
        "literal": "ORDER [31MSHIPPED and NulName",
    }
    for value in (request["alias"], request["reply_to"], *request["data"].values()):
        assert not controls(value), value
