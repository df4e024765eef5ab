"""A session's set-up gives exactly what the stock code gave.

The method tables a session gets from ``_SessionTables`` (smtp/compat.py) are
compared with the ones aiosmtpd's own ``SMTP.__init__`` builds for that very
session, and each fallback to the stock set-up is checked. (The DATA reader's
comparison is in tests/test_data_reader.py.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, auth_mechanism
from conftest import make_config

from smtp_bridge.auth import hash_password
from smtp_bridge.smtp import (
    BridgeHandler,
    BridgeLMTP,
    BridgeSMTP,
    ConnectionTracker,
    Runtime,
    compat,
)
from smtp_bridge.smtp.compat import _SessionTables

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
    monkeypatch.setattr(compat, "_SESSION_TABLES", {})
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
    assert isinstance(compat._SESSION_TABLES[cls, BridgeHandler], _SessionTables)
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
    assert compat._SESSION_TABLES[BridgeSMTP, BridgeHandler] is None
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
    assert compat._SESSION_TABLES[BridgeSMTP, BridgeHandler] is None
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
        assert isinstance(compat._SESSION_TABLES[BridgeSMTP, BridgeHandler], _SessionTables)
