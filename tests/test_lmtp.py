"""LMTP (RFC 2033) for Postfix's lmtp transport: LHLO, and after DATA one reply
per accepted recipient, in RCPT order, each the docs/replies.md reply of that
recipient's own API result (the sandbox's script makes some fail)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from smtp_raw import RawSmtp

from smtp_bridge import replies
from smtp_bridge.replies import Reply

LMTP = """
smtp: {protocol: lmtp, max_message_size: 1KiB}
routes:
  - name: drop-noise
    match: {rcpt: "noise@*"}
    action: drop
  - name: default
    template_id: "E_GENERIC"
    data: {subject: "{{ subject }}"}
"""

MESSAGE = b"From: app@example.com\r\nSubject: Per recipient\r\nMessage-ID: <l1@x>\r\n\r\nHi\r\n"


class Lmtp(RawSmtp):
    async def cmd(self, command: str) -> list[str]:
        return await self.command(command)

    async def deliver(self, rcpts: list[str], content: bytes = MESSAGE) -> list[str]:
        """MAIL, RCPT..., DATA: the replies after the final dot, one per recipient."""
        assert (await self.cmd("MAIL FROM:<app@example.com>"))[0].startswith("250 ")
        for rcpt in rcpts:
            assert (await self.cmd(f"RCPT TO:<{rcpt}>"))[0].startswith("250 ")
        assert (await self.cmd("DATA"))[0].startswith("354 ")
        self.writer.write(content + b".\r\n")
        return [await self.line() for _ in rcpts]


@asynccontextmanager
async def lmtp(b) -> AsyncIterator[Lmtp]:
    reader, writer = await asyncio.open_connection(b.host, b.port)
    session = Lmtp(reader, writer)
    try:
        banner = await session.line()
        assert banner.startswith("220 bridge.test LMTP"), banner
        lhlo = await session.cmd("LHLO postfix.test")
        assert lhlo[0] == "250-bridge.test" and lhlo[-1].startswith("250 ")
        yield session
    finally:
        await session.close()


def queue_id(line: str) -> str:
    found = re.fullmatch(r".* id=([0-9A-F]+)", line)
    assert found, line
    return found[1]


async def test_one_reply_per_recipient_each_its_own_outcome(bridge) -> None:
    async with bridge(LMTP) as b, lmtp(b) as s:
        b.sandbox.script(
            {"to": "rejected@example.org", "code": 40005},
            {"to": "broke@example.org", "code": 40007},
        )
        rcpts = ["ok@example.org", "rejected@example.org", "broke@example.org", "noise@x.org"]
        lines = await s.deliver(rcpts)
        # Nothing more follows: the next reply is NOOP's.
        assert (await s.cmd("NOOP"))[0].startswith("250 ")
    qid = queue_id(lines[0])
    assert lines == [
        replies.OK.with_id(qid),  # 200
        replies.BAD_RECIPIENT.with_id(qid),  # 40005 -> 550 5.1.3
        replies.BALANCE.with_id(qid),  # 40007 -> 451 4.3.2
        replies.DROPPED.with_id(qid),  # action: drop
    ]
    assert [r["to"] for r in b.delivered()] == ["ok@example.org"]


async def test_postfix_retries_only_the_deferred_recipient(bridge) -> None:
    async with bridge(LMTP) as b, lmtp(b) as s:
        b.sandbox.script({"to": "later@example.org", "status": 503})
        first = await s.deliver(["now@example.org", "later@example.org"])
        assert first[0].startswith(f"{replies.OK} id=")
        assert first[1].startswith(f"{replies.UPSTREAM_UNAVAILABLE} id=")
        # Postfix defers just that recipient and sends the same message again.
        retry = await s.deliver(["later@example.org"])
        assert retry[0].startswith(f"{replies.OK} id=")
    assert sorted(r["to"] for r in b.delivered()) == ["later@example.org", "now@example.org"]


async def test_message_level_refusal_repeats_for_every_recipient(bridge) -> None:
    async with bridge(LMTP) as b, lmtp(b) as s:
        big = MESSAGE + b"x" * 2000 + b"\r\n"
        lines = await s.deliver(["a@example.org", "b@example.org"], big)
        assert (await s.cmd("NOOP"))[0].startswith("250 ")
    qid = queue_id(lines[0])
    assert lines == [replies.TOO_LARGE.with_id(qid)] * 2
    assert b.sandbox.sent() == []


async def test_each_reply_is_a_design_5_reply(bridge) -> None:
    codes = {"c40001@example.org": 40001, "c40008@example.org": 40008, "c999@example.org": 999}
    async with bridge(LMTP) as b, lmtp(b) as s:
        b.sandbox.script(*({"to": to, "code": code} for to, code in codes.items()))
        lines = await s.deliver(list(codes))
    qid = queue_id(lines[0])
    assert lines == [
        replies.CONFIG_ERROR.with_id(qid),
        replies.DATA_FORMAT.with_id(qid),
        replies.UNKNOWN_CODE.with_id(qid),
    ]
    for line in lines:  # well-formed, with the RFC 3463 class matching the code
        reply = Reply.parse(line.removesuffix(f" id={qid}"))
        assert reply.status[0] == str(reply.code)[0]


@pytest.mark.parametrize("greeting", ["HELO", "EHLO"])
async def test_smtp_greetings_are_not_lmtp(bridge, greeting: str) -> None:
    async with bridge(LMTP) as b:
        reader, writer = await asyncio.open_connection(b.host, b.port)
        s = Lmtp(reader, writer)
        try:
            await s.line()
            assert (await s.cmd(f"{greeting} client.test"))[0].startswith("500 5.5.1 ")
            assert (await s.cmd("MAIL FROM:<app@example.com>"))[0] == ("503 5.5.1 send LHLO first")
        finally:
            writer.close()


async def test_smtp_listener_has_no_lhlo(bridge) -> None:
    async with bridge() as b:
        reader, writer = await asyncio.open_connection(b.host, b.port)
        s = Lmtp(reader, writer)
        try:
            assert (await s.line()).startswith("220 bridge.test ESMTP")
            assert (await s.cmd("LHLO client.test"))[0].startswith("500 5.5.")
        finally:
            writer.close()
