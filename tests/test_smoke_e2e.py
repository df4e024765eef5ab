"""A first end-to-end pass: SMTP in, one API call per recipient, truthful reply."""

from __future__ import annotations

from email.message import EmailMessage

from smtp_bridge import replies


def _message(subject: str = "Hello", body: str = "Hi there") -> bytes:
    msg = EmailMessage()
    msg["From"] = "Shop <shop@example.com>"
    msg["To"] = "bob@example.org"
    msg["Subject"] = subject
    msg["Message-ID"] = "<m1@example.com>"
    msg.set_content(body)
    return bytes(msg)


async def test_two_recipients_two_calls(bridge) -> None:
    async with bridge() as b:
        code, text = await b.send(_message(), ["bob@example.org", "alice@example.org"])
    assert code == 250
    assert f"{code} {text}".startswith(str(replies.OK))
    assert " id=" in text
    assert sorted(r["to"] for r in b.delivered()) == ["alice@example.org", "bob@example.org"]
    assert b.delivered()[0]["data"] == {"subject": "Hello", "body": "Hi there\n"}
