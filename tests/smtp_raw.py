"""Helpers for tests that must speak SMTP byte for byte, or read whole reply lines.

Client libraries "fix" what they send and turn refusals into exceptions; these
helpers keep both the bytes on the wire and the reply text exact.
"""

from __future__ import annotations

import asyncio
import re
from contextlib import suppress
from typing import Any

import aiosmtplib

#: How long a test waits for one reply line before it fails (a hang, not a timing margin).
WAIT = 15.0


class RawSmtp:
    """One SMTP/LMTP connection read line by line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def line(self) -> str:
        """One reply line without its CRLF (which it must have)."""
        raw = await asyncio.wait_for(self.reader.readline(), WAIT)
        assert raw.endswith(b"\r\n"), raw
        return raw[:-2].decode()

    async def reply(self) -> list[str]:
        """Every line of one (possibly multi-line) reply."""
        lines = [await self.line()]
        while len(lines[-1]) > 3 and lines[-1][3] == "-":
            lines.append(await self.line())
        return lines

    async def command(self, command: str | bytes) -> list[str]:
        """Send one command line; return every line of its reply."""
        if isinstance(command, str):
            command = command.encode()
        self.writer.write(command + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def rest(self) -> bytes:
        """Everything the server sends until it closes the connection."""
        return await asyncio.wait_for(self.reader.read(), WAIT)

    async def close(self) -> None:
        self.writer.close()
        with suppress(OSError):
            await self.writer.wait_closed()


async def data_reply(b: Any, message: bytes, rcpts: list[str]) -> str:
    """One message on a fresh aiosmtplib connection; the whole DATA reply line,
    refusals included (aiosmtplib raises for those)."""
    async with b.client() as smtp:
        await smtp.ehlo()
        await smtp.mail("app@example.com")
        for rcpt in rcpts:
            code, text = await smtp.rcpt(rcpt)
            assert code == 250, (rcpt, code, text)
        try:
            response = await smtp.data(message)
        except aiosmtplib.SMTPDataError as exc:
            return f"{exc.code} {exc.message}"
        return f"{response.code} {response.message}"


def split_id(line: str) -> tuple[str, str]:
    """``"451 4.3.5 text id=Q"`` -> (``"451 4.3.5 text"``, ``"Q"``); fails without an id."""
    found = re.fullmatch(r"(?P<reply>.+) id=(?P<qid>[0-9A-Za-z]+)", line)
    assert found is not None, f"DATA reply without a trailing id=<queue id>: {line!r}"
    return found["reply"], found["qid"]
