"""Every reach-in into aiosmtpd's, asyncio's and the email package's private names.

aiosmtpd is an engine meant to be driven by handler hooks, not subclassed
deeply; the bridge needs a little more (a PROXY header and a TLS handshake
before the banner, its own idle timer, DATA reader and address parser). Each
private name it touches is used here, and only here, behind a name of our own
(:class:`Engine`, :func:`getaddr`, :func:`buffered`), so an aiosmtpd release
that renames one breaks in this file and nowhere else. Two of them are speed-ups
that belong upstream: :func:`getaddr` (docs/upstream/aiosmtpd-getaddr.md) and
:class:`_SessionTables` (kept: without it a one-message-per-connection client
loses about 9% of its msgs/s, bench/README.md).

The module checks the installed aiosmtpd at import: on a minor version it was
not written for it raises ImportError (the daemon does not start) instead of
failing in the middle of a session. pyproject.toml pins aiosmtpd to the same
versions; supporting a new one means reading each name below against it, then
adding it to :data:`KNOWN_VERSIONS`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from asyncio import sslproto
from collections import defaultdict
from collections.abc import Iterable

# The stdlib's RFC 5322 tokenizer, as aiosmtpd's own _getaddr uses it.
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any, cast

import aiosmtpd
import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP

__all__ = [
    "KNOWN_VERSIONS",
    "MALFORMED_ADDRESS_TEXT",
    "TOO_LARGE_TEXTS",
    "Engine",
    "buffered",
    "check_version",
    "getaddr",
]

#: aiosmtpd minor versions whose private names this module was checked against.
KNOWN_VERSIONS = ("1.4",)

#: The private methods :class:`Engine` overrides or calls.
_ENGINE_NAMES = (
    "_handle_client",
    "_timeout_cb",
    "_reset_timeout",
    "_call_handler_hook",
    "_set_post_data_state",
    "_getaddr",
)


def check_version(version: str) -> None:
    """Raise ImportError unless ``version`` (aiosmtpd's) is one this module knows."""
    minor = ".".join(version.split(".")[:2])
    if minor not in KNOWN_VERSIONS:
        known = ", ".join(f"{v}.x" for v in KNOWN_VERSIONS)
        raise ImportError(
            f"smtp-bridge works with aiosmtpd {known}, but aiosmtpd {version} is installed: "
            "smtp_bridge/smtp/compat.py reaches into its private names and was not checked "
            'against this release; install "aiosmtpd>=1.4.6,<1.5"'
        )


check_version(getattr(aiosmtpd, "__version__", "unknown"))
if missing := [name for name in _ENGINE_NAMES if not hasattr(SMTP, name)]:
    raise ImportError(f"aiosmtpd {aiosmtpd.__version__} lacks {', '.join(missing)}")

#: aiosmtpd's own replies to an oversized message, matched exactly (the bridge
#: answers its own 552 5.3.4 instead).
TOO_LARGE_TEXTS = (
    "552 Error: message size exceeds fixed maximum message size",
    "552 Error: Too much mail data",
)
#: aiosmtpd's reply to an address it cannot parse, matched exactly.
MALFORMED_ADDRESS_TEXT = "553 5.1.3 Error: malformed address"


#: aiosmtpd's logger: at INFO, SMTP.__init__ logs the AUTH table it has built.
_engine_log = logging.getLogger("mail.log")
#: What SMTP.__init__ builds from dir() of the session and of the handler.
_TABLE_ATTRS = ("_auth_methods", "_handle_hooks", "_ehlo_hook_ver", "_smtp_methods")
_HOOK_PREFIXES = ("auth_", "handle_")


class _NoHooks:
    """Stands in for the handler while SMTP.__init__ runs (:class:`_SessionTables`)."""

    __slots__ = ()

    def __dir__(self) -> Iterable[str]:
        return ()


_NO_HOOKS = _NoHooks()


def _names(cls: type, prefix: str) -> tuple[str, ...]:
    return tuple(name for name in dir(cls) if name.startswith(prefix))


def _shape(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes as a stock and a table-filled setup must agree on them:
    scalars by value, containers by type and size, anything else by type."""
    return {
        name: value
        if value is None or type(value) in (str, int, float, bool, bytes)
        else (type(value), len(value) if type(value) in (dict, defaultdict, list, tuple) else -1)
        for name, value in attrs.items()
    }


class _SessionTables:
    """aiosmtpd's per-session method tables: names found once per (session
    class, handler class), methods bound per session.

    ``SMTP.__init__`` runs ``inspect.getmembers``/``dir`` over the session and
    the handler, and ``inspect.signature`` over ``handle_EHLO``, on every
    connection: some 85 of the ~100 us a session took to set up. The
    names depend on the classes only; each session still gets its own bound
    methods by ``getattr``, under aiosmtpd's key rules. ``SMTP.__init__`` runs
    with an empty ``dir()`` and a stand-in handler, the tables are filled after.

    Robust to aiosmtpd upgrades: a pair's first session is set up the stock
    way and its tables are kept only if, for that session, they equal
    aiosmtpd's and a table-filled set-up leaves the same attributes; else the
    pair stays stock. So do handlers with hook-named attributes of their own or
    a custom ``__dir__``, a 4-argument ``handle_EHLO``, and sessions made while
    aiosmtpd's log is at INFO (it lists the table it built).
    """

    __slots__ = ("auth_session", "auth_handler", "hooks", "commands", "ehlo", "ehlo_ver")

    def __init__(self, session_cls: type[Engine], handler_cls: type) -> None:
        self.auth_session = _names(session_cls, "auth_")
        self.auth_handler = _names(handler_cls, "auth_")
        self.hooks = tuple(
            (name.replace("handle_", ""), name) for name in _names(handler_cls, "handle_")
        )
        self.commands = tuple(
            (name.replace("smtp_", ""), name) for name in _names(session_cls, "smtp_")
        )
        ehlo = getattr(handler_cls, "handle_EHLO", None)
        self.ehlo: Any = getattr(ehlo, "__func__", ehlo)  # a staticmethod/classmethod's function
        self.ehlo_ver: str | None = None

    @classmethod
    def prove(
        cls,
        session: Engine,
        handler: object,
        before: dict[str, Any],
        engine: dict[str, Any],
    ) -> _SessionTables | None:
        """The tables for ``session``'s pair, if they give what its stock set-up gave."""
        if (
            not hasattr(aiosmtpd.smtp, "_AuthMechAttr")
            or not all(hasattr(session, name) for name in _TABLE_ATTRS)
            or type(session).__dir__ is not Engine.__dir__
            or type(handler).__dir__ is not object.__dir__
        ):
            return None
        tables = cls(type(session), type(handler))
        tables.ehlo_ver = session._ehlo_hook_ver
        hooks = tables.bind_hooks(handler)
        if hooks is None or tables.bind(session, handler, hooks, engine) != {
            name: getattr(session, name) for name in _TABLE_ATTRS
        }:
            return None
        twin = object.__new__(type(session))
        twin.__dict__.update(before)
        twin._init_engine_from(tables, handler, hooks, engine)
        stock = {name: value for name, value in vars(session).items() if name not in before}
        filled = {name: value for name, value in vars(twin).items() if name not in before}
        return tables if _shape(filled) == _shape(stock) else None

    def bind_hooks(self, handler: object) -> dict[str, Any] | None:
        """``_handle_hooks`` for ``handler``; None when it needs the stock set-up."""
        if any(name.startswith(_HOOK_PREFIXES) for name in getattr(handler, "__dict__", ())):
            return None  # hooks of its own: dir(handler) is more than its class's
        hooks = {key: getattr(handler, name) for key, name in self.hooks}
        ehlo = hooks.get("EHLO")
        if ehlo is not None and (
            self.ehlo_ver != "new" or getattr(ehlo, "__func__", ehlo) is not self.ehlo
        ):
            return None  # a handle_EHLO whose signature was not read (or warns)
        return hooks

    def bind(
        self,
        session: Engine,
        handler: object,
        hooks: dict[str, Any],
        engine: dict[str, Any],
    ) -> dict[str, Any]:
        """What SMTP.__init__ would set for ``session``, by the same rules."""
        mech_attr = aiosmtpd.smtp._AuthMechAttr
        auth: dict[str, Any] = {}
        for obj, names in ((session, self.auth_session), (handler, self.auth_handler)):
            for name in names:
                try:  # inspect.getmembers() skips what getattr cannot read
                    method = getattr(obj, name)
                except AttributeError:
                    continue
                mechanism = getattr(
                    method, "__auth_mechanism_name__", name.replace("auth_", "").replace("__", "-")
                )
                auth[mechanism] = mech_attr(method, obj is session)
        for mechanism in engine.get("auth_exclude_mechanism") or ():
            auth.pop(mechanism, None)
        return {
            "_auth_methods": auth,
            "_handle_hooks": hooks,
            "_ehlo_hook_ver": self.ehlo_ver if "EHLO" in hooks else None,
            "_smtp_methods": {key: getattr(session, name) for key, name in self.commands},
        }


#: (session class, handler class) -> its proven tables, or None: stock set-up.
_SESSION_TABLES: dict[tuple[type, type], _SessionTables | None] = {}


class Engine(SMTP):
    """aiosmtpd's ``SMTP``, its private names behind names of our own.

    Subclasses implement :meth:`before_banner` and :meth:`on_idle_timeout`
    and use the accessors below, never an underscored aiosmtpd name.
    """

    def __init__(self, handler: Any, **engine: Any) -> None:
        # aiosmtpd keeps these limits in a class-level dict that every session
        # clears and every EHLO grows; each session gets its own.
        self.command_size_limits = defaultdict(lambda: self.command_size_limit)
        self._init_engine(handler, engine)

    def _init_engine(self, handler: Any, engine: dict[str, Any]) -> None:
        """``SMTP.__init__``, its method tables from :class:`_SessionTables` once proven."""
        key = (type(self), type(handler))
        if _engine_log.isEnabledFor(logging.INFO):
            super().__init__(handler, **engine)
            return
        try:
            tables = _SESSION_TABLES[key]
        except KeyError:  # the pair's first session: stock, and the proof
            before = dict(self.__dict__)
            super().__init__(handler, **engine)
            _SESSION_TABLES[key] = _SessionTables.prove(self, handler, before, engine)
            return
        hooks = tables.bind_hooks(handler) if tables is not None else None
        if tables is None or hooks is None:
            super().__init__(handler, **engine)
            return
        self._init_engine_from(tables, handler, hooks, engine)

    def _init_engine_from(
        self,
        tables: _SessionTables,
        handler: object,
        hooks: dict[str, Any],
        engine: dict[str, Any],
    ) -> None:
        self._lean_setup = True  # dir(self) is empty until the tables are in
        try:
            super().__init__(_NO_HOOKS, **engine)
        finally:
            del self._lean_setup
        self.event_handler = handler
        self.__dict__.update(tables.bind(self, handler, hooks, engine))

    def __dir__(self) -> Iterable[str]:
        if self.__dict__.get("_lean_setup"):
            return ()  # SMTP.__init__'s introspection: _SessionTables has the answers
        return super().__dir__()

    # ------------------------------------------------------------ hooks

    async def before_banner(self) -> bool:
        """Runs before the 220 banner (PROXY header, implicit TLS); False ends
        the session without one."""
        return True

    def on_idle_timeout(self) -> None:
        """``smtp.timeout`` passed without a command; aiosmtpd closes the connection."""
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    async def _handle_client(self) -> None:
        if await self.before_banner():
            await super()._handle_client()  # the banner, then the command loop

    def _timeout_cb(self) -> None:
        self.on_idle_timeout()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        return getaddr(arg, self.local_part_limit)

    # ------------------------------------------------------------ accessors

    @property
    def reader(self) -> asyncio.StreamReader:
        """The session's byte stream (aiosmtpd's ``_reader``)."""
        return self._reader

    def write(self, data: bytes) -> None:
        """Write without waiting for the buffer to drain (a reply before closing)."""
        self._writer.write(data)

    @property
    def timeout_duration(self) -> float:
        return float(self._timeout_duration)

    def reset_timeout(self, duration: float | None = None) -> None:
        """Restart the idle timer, for ``duration`` or ``smtp.timeout``."""
        self._reset_timeout(duration)

    def end_transaction(self) -> None:
        """DATA is over, whatever its outcome: a new envelope (RFC 5321 4.1.1.4)."""
        self._set_post_data_state()  # type: ignore[no-untyped-call]

    async def call_handler_hook(self, command: str, *args: Any) -> Any:
        """The handler's ``handle_<command>``, as aiosmtpd calls it."""
        return await self._call_handler_hook(command, *args)

    @property
    def tls_layer(self) -> object | None:
        """The TLS protocol once STARTTLS or implicit TLS began, else None."""
        return self._tls_protocol

    def close_transports(self) -> None:
        """Close the connection under a TLS layer that never came up, too."""
        if self.transport is not None:
            self.transport.close()
        if self._original_transport is not None:
            self._original_transport.close()

    def start_tls(self, context: ssl.SSLContext) -> asyncio.Future[None]:
        """Implicit TLS (RFC 8314): put a TLS layer under the session in place,
        as aiosmtpd's STARTTLS does; the future resolves when the handshake ends.

        What the client has sent already (its ClientHello, maybe right behind
        a PROXY header) belongs to the TLS layer, not to the SMTP reader.
        """
        raw = cast(asyncio.Transport, self.transport)
        waiter: asyncio.Future[None] = self.loop.create_future()
        tls = sslproto.SSLProtocol(self.loop, self, context, waiter, server_side=True)
        reader = cast(Any, self._reader)
        early = bytes(reader._buffer)
        reader._buffer.clear()
        self._tls_protocol, self._original_transport = tls, raw
        raw.set_protocol(tls)
        self.transport = tls._app_transport
        tls.connection_made(raw)
        while early:
            buffer = tls.get_buffer(len(early))
            size = min(len(buffer), len(early))
            buffer[:size] = early[:size]
            tls.buffer_updated(size)
            early = early[size:]
        if reader._paused:  # the SMTP reader had paused the socket: TLS reads now
            reader._paused = False
            raw.resume_reading()
        return waiter


#: RFC 5322 atext (ASCII) and a dot-atom of it.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
#: An ordinary MAIL/RCPT address: optional blanks, <local@domain>, blanks, the rest
#: (anything else, a comment, quoted or non-ASCII local part, goes the long way).
_PLAIN_ANGLE_ADDR = re.compile(rf"[ \t]*<({_DOT_ATOM}@{_DOT_ATOM})>([ \t]*)(.*)", re.DOTALL)


def getaddr(arg: str, local_part_limit: int) -> tuple[str | None, str | None]:
    """aiosmtpd's MAIL/RCPT address parser, the same answers without its cost.

    aiosmtpd 1.4 defines a ``typing.Protocol`` class inside ``_getaddr`` on
    every call: two thirds of the call's time, a fifth of a bare server's CPU
    (bench/README.md; the upstream fix: docs/upstream/aiosmtpd-getaddr.md).
    Same parsing (the stdlib's RFC 5322 tokenizer), same ``local_part_limit``
    check, same (None, None) for unparsable input.
    """
    if not arg:
        return "", ""
    plain = _PLAIN_ANGLE_ADDR.match(arg)
    if plain is not None and not plain.group(3).startswith("("):
        # "<dot-atom@dot-atom>" then parameters: what the tokenizer answers for
        # it, (the address as written, the rest after its whitespace), 50x cheaper.
        addr = plain.group(1)
        if local_part_limit and len(addr.rpartition("@")[0]) > local_part_limit:
            return None, None
        return addr, plain.group(3)
    try:
        if arg.lstrip().startswith("<"):
            angle, rest = get_angle_addr(arg)
            addr = angle.addr_spec
        else:
            spec, rest = get_addr_spec(arg)
            addr = spec.addr_spec
    except (HeaderParseError, IndexError, AttributeError):
        # The stdlib tokenizer also raises IndexError ("a@", found by test_fuzz)
        # and AttributeError ("a@[", its addr_spec); aiosmtpd lets both
        # through as an internal error. Unparsable, like the rest: 553.
        return None, None
    if local_part_limit and len(addr.rpartition("@")[0]) > local_part_limit:
        return None, None
    return addr, rest


def buffered(reader: asyncio.StreamReader) -> bytearray | None:
    """What ``reader`` holds already, unread (asyncio's ``_buffer``; do not
    modify); None for a reader without one."""
    buffer = getattr(reader, "_buffer", None)
    return buffer if isinstance(buffer, bytearray) else None
