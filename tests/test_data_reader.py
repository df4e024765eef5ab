"""The DATA reader (smtp_bridge/smtp/data.py), without a session or a socket.

It is compared with the line-by-line reader it replaced, on hand-picked
streams and on generated ones cut into random segments: same message, same
size verdict, same bytes left in the stream, same idle-timer resets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtp_bridge.smtp.data import read_data


async def new_reader(self: Any) -> tuple[bytearray, bool] | None:
    """read_data as the session calls it (protocol.py)."""
    return await read_data(
        self._reader,
        self.data_size_limit,
        clock=self.loop.time,
        keepalive=self._reset_timeout,
        is_open=lambda: self.transport is not None,
    )


async def line_by_line(self: Any) -> tuple[bytearray, bool] | None:
    """The DATA reader as it was: one readuntil per line (before issue 6)."""
    limit = self.data_size_limit
    data = bytearray()
    too_big = False
    at_line_start = True
    last_reset = self.loop.time()
    while self.transport is not None:
        try:
            chunk = await self._reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as exc:
            chunk = await self._reader.read(exc.consumed)
        except asyncio.IncompleteReadError:
            return None
        now = self.loop.time()
        if now - last_reset > 1.0:
            self._reset_timeout()
            last_reset = now
        complete = chunk.endswith(b"\r\n")
        if at_line_start and chunk == b".\r\n":
            break
        if at_line_start and chunk.startswith(b"."):
            chunk = chunk[1:]
        at_line_start = complete
        if not too_big:
            if limit and len(data) + len(chunk) > limit:
                too_big = True
                data.clear()
            else:
                data += chunk
    if self.transport is None:
        return None
    return data, too_big


Reader = Callable[[Any], Any]


def read(
    reader: Reader, stream: bytes, cuts: list[int], size_limit: int | None, line_limit: int
) -> tuple[Any, bytes, int]:
    """(result, bytes left in the stream reader, timer resets): ``stream`` arrives
    in segments at ``cuts``, two (fake) seconds apart, then the client closes."""

    async def run() -> tuple[Any, bytes, int]:
        clock = [0.0]
        resets = []
        stream_reader = asyncio.StreamReader(limit=line_limit)
        session = SimpleNamespace(
            _reader=stream_reader,
            loop=SimpleNamespace(time=lambda: clock[0]),
            transport=object(),
            data_size_limit=size_limit,
            _reset_timeout=lambda: resets.append(clock[0]),
        )
        task = asyncio.create_task(reader(session))
        bounds = [0, *sorted(set(cuts)), len(stream)]
        for start, end in zip(bounds, bounds[1:], strict=False):
            await asyncio.sleep(0)
            clock[0] += 2.0
            stream_reader.feed_data(stream[start:end])
        await asyncio.sleep(0)
        stream_reader.feed_eof()
        result = await task
        if result is not None:
            result = (bytes(result[0]), result[1])
        return result, await stream_reader.read(), len(resets)

    return asyncio.run(run())


def same(
    stream: bytes, cuts: Iterable[int] = (), size_limit: int | None = None, line_limit: int = 1001
) -> Any:
    """Both readers on the same arrivals: equal results, leftovers and resets."""
    at = [c for c in cuts if 0 < c < len(stream)]
    new = read(new_reader, stream, at, size_limit, line_limit)
    old = read(line_by_line, stream, at, size_limit, line_limit)
    assert new == old
    return new


@pytest.mark.parametrize(
    "stream",
    [
        b".\r\n",
        b".\r\nQUIT\r\n",
        b"..\r\n.\r\n",
        b"...\r\n.x\r\n.\r\n.\r\nMAIL FROM:<a@b>\r\n",
        b"a\r\n.\r\nRSET\r\nNOOP\r\n",
        b"a\n.\r\nb\r\n.\n\r\n.\r\n",  # a bare LF is no line end
        b"a\r\n\r\n.\r\r\n..\r\n.\r\n",
        b"\r\n.\r\n",
        b"no end\r\n",
        b"no end\r\n.",
        b"a" * 3000 + b"\r\n.b" + b"c" * 2000 + b"\r\n.\r\n",  # longer than the line limit
        b"x\r\n" * 500 + b".\r\n",
        b"",
    ],
    ids=repr,
)
def test_reader_edge_cases(stream: bytes) -> None:
    whole = same(stream)
    same(stream, range(1, len(stream)))  # a byte at a time
    same(stream, range(2, len(stream), 7), line_limit=4)
    assert same(stream, size_limit=5)[1:] == whole[1:]


def test_reader_result_of_a_plain_message() -> None:
    result, left, _ = same(b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n", [3, 17])
    assert result == (b"Subject: x\r\n\r\n.dot\r\n", False)
    assert left == b"QUIT\r\n"


def test_reader_size_cap() -> None:
    assert same(b"1234\r\n.\r\n", size_limit=6)[0] == (b"1234\r\n", False)
    assert same(b"1234\r\n.\r\n", size_limit=5)[0] == (b"", True)
    assert same(b".1234\r\n.\r\n", size_limit=6)[0] == (b"1234\r\n", False)


def test_reader_timer_is_reset_as_data_arrives() -> None:
    stream = b"line\r\n" * 10 + b".\r\n"
    _, _, resets = same(stream, range(6, len(stream), 6))
    assert resets == 11


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(
        st.sampled_from([b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b".\r\n", b"x", b"yz" * 5]),
        max_size=60,
    ),
    cuts=st.lists(st.integers(min_value=1, max_value=200), max_size=8),
    size_limit=st.one_of(st.none(), st.integers(min_value=1, max_value=60)),
    line_limit=st.sampled_from([4, 9, 1001]),
    terminate=st.booleans(),
)
def test_reader_on_generated_streams(
    pieces: list[bytes], cuts: list[int], size_limit: int | None, line_limit: int, terminate: bool
) -> None:
    stream = b"".join(pieces) + (b"\r\n.\r\nQUIT\r\n" if terminate else b"")
    same(stream, cuts, size_limit, line_limit)


async def test_reader_on_its_own_stream() -> None:
    """read_data needs no session: a stream, a limit, a clock and two callbacks."""
    stream = asyncio.StreamReader()
    stream.feed_data(b"Subject: x\r\n\r\n..dot\r\nlong" + b"y" * 5000 + b"\r\n.\r\nQUIT\r\n")
    beats: list[None] = []
    got = await read_data(
        stream,
        100_000,
        clock=lambda: 0.0,
        keepalive=lambda: beats.append(None),
        is_open=lambda: True,
    )
    assert got == (bytearray(b"Subject: x\r\n\r\n.dot\r\nlong" + b"y" * 5000 + b"\r\n"), False)
    assert beats == []  # no time passed on this clock
    assert await stream.readline() == b"QUIT\r\n"


async def test_reader_gives_nothing_once_the_session_is_closed() -> None:
    stream = asyncio.StreamReader()
    stream.feed_data(b"complete line\r\n.\r\n")
    closed = await read_data(
        stream, None, clock=lambda: 0.0, keepalive=lambda: None, is_open=lambda: False
    )
    assert closed is None
    stream = asyncio.StreamReader()
    stream.feed_data(b"complete line\r\nhalf a line")
    stream.feed_eof()
    cut = await read_data(
        stream, None, clock=lambda: 0.0, keepalive=lambda: None, is_open=lambda: True
    )
    assert cut is None  # the client went away mid-DATA: nothing to answer
