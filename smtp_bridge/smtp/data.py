"""The DATA reader: the message up to CRLF.CRLF from a stream, without a session.

aiosmtpd's own reader ends at the first line over its line limit and caps the
size only line by line; the bridge ends only at CRLF.CRLF, caps the size
whatever the line lengths (552 5.3.4 after the terminator, RFC 5321 4.2.5),
and keeps long lines, which legacy apps send and RFC 5322 readers tolerate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .compat import buffered

__all__ = ["read_data"]

#: A slow upload is not an idle client: the idle timer restarts at most this often.
KEEPALIVE_EVERY = 1.0


async def read_data(
    reader: asyncio.StreamReader,
    size_limit: int | None,
    *,
    clock: Callable[[], float],
    keepalive: Callable[[], None],
    is_open: Callable[[], bool],
) -> tuple[bytearray, bool] | None:
    """The message up to CRLF.CRLF, dot-unstuffed (RFC 5321 4.5.2), and whether
    it is over ``size_limit`` (then read to its end but not kept); None when
    the stream ends first or ``is_open()`` turns False.

    ``keepalive`` is called as data keeps arriving (at most every second of
    ``clock``), so the session's idle timer does not cut a slow upload.

    Line by line, except that the complete lines the reader holds already
    behind a line start are taken in one piece (:func:`_buffered_lines`): the
    line-by-line loop would take them too without waiting, one await, time
    check and copy each. Same message, same end, same bytes left in the
    reader (tests/test_data_reader.py compares the two readers).
    """
    data = bytearray()
    too_big = False
    at_line_start = True
    last_reset = clock()
    while is_open():
        lines = _buffered_lines(reader) if at_line_start else 0
        try:
            if lines:
                chunk = _unstuffed(await reader.readexactly(lines))
            else:
                chunk = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as exc:
            chunk = await reader.read(exc.consumed)
        except asyncio.IncompleteReadError:
            return None  # connection closed mid-DATA: nothing to answer
        now = clock()
        if now - last_reset > KEEPALIVE_EVERY:
            keepalive()
            last_reset = now
        if not lines:
            complete = chunk.endswith(b"\r\n")
            if at_line_start and chunk == b".\r\n":
                break
            if at_line_start and chunk.startswith(b"."):
                chunk = chunk[1:]  # dot-unstuffing, RFC 5321 4.5.2
            at_line_start = complete
        if not too_big:
            if size_limit and len(data) + len(chunk) > size_limit:
                too_big = True
                data.clear()  # stop holding memory for a message we refuse
            else:
                data += chunk
    if not is_open():
        return None
    return data, too_big


def _buffered_lines(reader: asyncio.StreamReader) -> int:
    """How many bytes of complete lines ``reader`` holds, at a line start, up to
    the end-of-data line (excluded); 0 for none, or when that line comes first.

    A reader whose buffer cannot be seen gets 0: line by line, as before.
    """
    buffer = buffered(reader)
    if buffer is None or buffer.startswith(b".\r\n"):
        return 0
    end = buffer.rfind(b"\r\n") + 2
    if end < 2:
        return 0
    stop = buffer.find(b"\r\n.\r\n", 0, end)
    return end if stop < 0 else stop + 2


def _unstuffed(lines: bytes) -> bytes:
    """Complete lines, each without its leading dot if it has one (RFC 5321
    4.5.2); ``lines`` begins at a line start."""
    if lines.startswith(b"."):
        lines = lines[1:]
    return lines.replace(b"\r\n.", b"\r\n")
