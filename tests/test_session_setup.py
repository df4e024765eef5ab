"""A session's set-up and DATA reader give exactly what the stock code gave.

The method tables a session gets from ``_SessionTables`` are compared with the
ones aiosmtpd's own ``SMTP.__init__`` builds for that very session, and each
fallback to the stock set-up is checked. The DATA reader that takes buffered
lines in one piece is compared with the line-by-line reader it replaces, on
hand-picked streams and on generated ones cut into random segments.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, auth_mechanism
from conftest import make_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtp_bridge import server
from smtp_bridge.auth import hash_password
from smtp_bridge.server import (
    BridgeHandler,
    BridgeLMTP,
    BridgeSMTP,
    ConnectionTracker,
    Runtime,
    _SessionTables,
)

PASSWORD = "correct horse"
HASH = hash_password(PASSWORD, n=2**10)
AUTH_CONFIG = f"""
smtp:
  auth:
    require_tls: false
    users:
      crm: {{password_hash: "{HASH}"}}
routes:
  - name: default
    template_id: E_GENERIC
"""
TABLES = ("_auth_methods", "_handle_hooks", "_ehlo_hook_ver", "_smtp_methods")


@dataclass
class Sessions:
    """Builds sessions on the running loop and records how each was set up."""

    runtime: Runtime
    handler: Any
    engines: list[dict[str, Any]]  # SMTP.__init__'s arguments, one per session
    cached: list[BridgeSMTP]  # set up from _SessionTables (proofs' twins too)

    def new(self, cls: type[BridgeSMTP] = BridgeSMTP, handler: Any = None) -> BridgeSMTP:
        loop = asyncio.get_running_loop()
        return cls(handler or self.handler, self.runtime, ConnectionTracker(), loop=loop)


@pytest.fixture
def sessions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sessions:
    monkeypatch.setattr(server, "_SESSION_TABLES", {})
    made = Sessions(
        Runtime.build(make_config(tmp_path, "http://127.0.0.1:9/", AUTH_CONFIG)),
        BridgeHandler(SimpleNamespace(metrics=None), lambda task: None),  # type: ignore[arg-type]
        [],
        [],
    )
    init_engine, init_from = BridgeSMTP._init_engine, BridgeSMTP._init_engine_from

    def spy_engine(self: BridgeSMTP, handler: Any, engine: dict[str, Any]) -> None:
        made.engines.append(engine)
        init_engine(self, handler, engine)

    def spy_from(self: BridgeSMTP, *args: Any) -> None:
        made.cached.append(self)
        init_from(self, *args)

    monkeypatch.setattr(BridgeSMTP, "_init_engine", spy_engine)
    monkeypatch.setattr(BridgeSMTP, "_init_engine_from", spy_from)
    return made


def tables(session: BridgeSMTP) -> dict[str, Any]:
    return {name: getattr(session, name) for name in TABLES}


def bound_to(method: Any) -> Any:
    return method.__self__


def stock_tables(session: BridgeSMTP, handler: Any, engine: dict[str, Any]) -> dict[str, Any]:
    """What aiosmtpd's own SMTP.__init__ builds for this very session."""
    SMTP.__init__(session, handler, **engine)
    return tables(session)


def assert_stock(session: BridgeSMTP, handler: Any, engine: dict[str, Any]) -> None:
    got = tables(session)
    expected = stock_tables(session, handler, engine)
    # Bound methods are equal only when bound to the same object: this session.
    assert got == expected
    assert [list(t) for t in got.values() if isinstance(t, dict)] == [
        list(t) for t in expected.values() if isinstance(t, dict)
    ]


# ---------------------------------------------------------------- session tables


@pytest.mark.parametrize("cls", [BridgeSMTP, BridgeLMTP], ids=["smtp", "lmtp"])
async def test_cached_tables_are_what_aiosmtpd_builds(sessions: Sessions, cls: type) -> None:
    first = sessions.new(cls)  # stock, and the proof for the pair
    assert first not in sessions.cached
    assert isinstance(server._SESSION_TABLES[cls, BridgeHandler], _SessionTables)
    second = sessions.new(cls)
    assert second in sessions.cached
    assert sorted(second._auth_methods) == ["LOGIN", "PLAIN"]
    assert all(bound_to(m.method) is second for m in second._auth_methods.values())
    assert second._ehlo_hook_ver == "new"
    assert second.event_handler is sessions.handler
    assert_stock(second, sessions.handler, sessions.engines[1])
    assert_stock(first, sessions.handler, sessions.engines[0])


async def test_hooks_are_bound_to_each_sessions_own_handler(sessions: Sessions) -> None:
    sessions.new()
    other = BridgeHandler(SimpleNamespace(metrics=None), lambda task: None)  # type: ignore[arg-type]
    session = sessions.new(handler=other)
    assert session in sessions.cached  # one table for the class, not per handler
    assert session.event_handler is other
    assert bound_to(session._handle_hooks["DATA"]) is other
    assert_stock(session, other, sessions.engines[1])


class AuthHandler(BridgeHandler):
    """A handler with AUTH mechanisms of its own (aiosmtpd's naming rules)."""

    async def auth_CRAM__MD5(self, server: Any, args: list[str]) -> Any: ...

    @auth_mechanism("X-TOKEN")
    async def auth_token(self, server: Any, args: list[str]) -> Any: ...


@pytest.mark.parametrize("exclude", [None, ["LOGIN", "X-TOKEN"]], ids=["all", "excluded"])
async def test_handler_mechanisms_and_exclusions_as_aiosmtpd_names_them(
    sessions: Sessions, exclude: list[str] | None
) -> None:
    handler = AuthHandler(SimpleNamespace(metrics=None), lambda task: None)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()

    def new() -> BridgeSMTP:
        return BridgeSMTP(
            handler,
            sessions.runtime,
            ConnectionTracker(),
            loop=loop,
            auth_exclude_mechanism=exclude,
        )

    new()
    session = new()
    assert session in sessions.cached
    expected = {"CRAM-MD5", "LOGIN", "PLAIN", "X-TOKEN"} - set(exclude or ())
    assert set(session._auth_methods) == expected
    assert session._auth_methods["CRAM-MD5"].is_builtin is False
    assert bound_to(session._auth_methods["CRAM-MD5"].method) is handler
    assert_stock(session, handler, sessions.engines[1])


async def test_a_handler_with_hooks_of_its_own_gets_the_stock_setup(sessions: Sessions) -> None:
    sessions.new()
    handler = BridgeHandler(SimpleNamespace(metrics=None), lambda task: None)  # type: ignore[arg-type]

    async def handle_NOOP(*args: Any) -> str:
        return "250 OK"

    handler.handle_NOOP = handle_NOOP  # type: ignore[attr-defined]
    session = sessions.new(handler=handler)
    assert session not in sessions.cached
    assert session._handle_hooks["NOOP"] is handle_NOOP
    assert_stock(session, handler, sessions.engines[1])


async def test_aiosmtpd_logging_at_info_gets_the_stock_setup(
    sessions: Sessions, caplog: pytest.LogCaptureFixture
) -> None:
    sessions.new()
    with caplog.at_level(logging.INFO, logger="mail.log"):
        session = sessions.new()
    assert session not in sessions.cached
    assert "Available AUTH mechanisms: LOGIN(builtin) PLAIN(builtin)" in caplog.messages


async def test_an_aiosmtpd_without_the_tables_it_had_keeps_the_stock_setup(
    sessions: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    stock_init = SMTP.__init__

    def init(self: SMTP, handler: Any, **kwargs: Any) -> None:  # a release that renamed one
        stock_init(self, handler, **kwargs)
        self._auth_mechanisms = self.__dict__.pop("_auth_methods")  # type: ignore[attr-defined]

    monkeypatch.setattr(SMTP, "__init__", init)
    sessions.new()
    assert server._SESSION_TABLES[BridgeSMTP, BridgeHandler] is None
    session = sessions.new()
    assert session not in sessions.cached
    assert not hasattr(session, "_auth_methods")  # nothing stale filled in
    assert sorted(session._auth_mechanisms) == ["LOGIN", "PLAIN"]  # type: ignore[attr-defined]


async def test_an_aiosmtpd_that_introspects_more_keeps_the_stock_setup(
    sessions: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    stock_init = SMTP.__init__

    def init(self: SMTP, handler: Any, **kwargs: Any) -> None:
        stock_init(self, handler, **kwargs)
        self._process_hooks = [name for name in dir(handler) if name.startswith("handle_")]  # type: ignore[attr-defined]

    monkeypatch.setattr(SMTP, "__init__", init)
    sessions.new()
    assert server._SESSION_TABLES[BridgeSMTP, BridgeHandler] is None
    session = sessions.new()
    assert session not in sessions.cached
    assert "handle_DATA" in session._process_hooks  # type: ignore[attr-defined]


async def test_dir_of_a_session_is_whole_after_setup(sessions: Sessions) -> None:
    sessions.new()
    session = sessions.new()
    assert session in sessions.cached
    assert {"smtp_DATA", "auth_PLAIN", "session_id"} <= set(dir(session))


async def test_auth_plain_and_login_on_sessions_set_up_from_the_cache(
    bridge: Callable[..., Any],
) -> None:
    async with bridge(AUTH_CONFIG) as b:
        for mechanism in ("plain", "login", "plain", "login"):
            async with b.client() as smtp:
                await smtp.ehlo()
                assert smtp.supports_extension("auth")
                assert smtp.server_auth_methods == ["login", "plain"]
                code, _ = await getattr(smtp, f"auth_{mechanism}")("crm", PASSWORD)
                assert code == 235
        async with b.client() as smtp:
            await smtp.ehlo()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
                await smtp.auth_plain("crm", "wrong")
            assert refused.value.code == 535
        assert isinstance(server._SESSION_TABLES[BridgeSMTP, BridgeHandler], _SessionTables)


# ---------------------------------------------------------------- DATA reader


async def line_by_line(self: Any) -> tuple[bytearray, bool] | None:
    """The DATA reader as it was: one readuntil per line (server.py before)."""
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
    new = read(BridgeSMTP._read_data, stream, at, size_limit, line_limit)
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
