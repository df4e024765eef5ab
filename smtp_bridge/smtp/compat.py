"""Every reach-in into aiosmtpd's, asyncio's and the email package's private names.

aiosmtpd is an engine meant to be driven by handler hooks, not subclassed
deeply; the bridge needs a little more (a PROXY header and a TLS handshake
before the banner, its own idle timer, DATA reader and address parser). Each
private name it touches is used here, and only here, behind a name of our own
(:class:`Engine`, :func:`getaddr`, :func:`buffered`), so an aiosmtpd release
that renames one breaks in this file and nowhere else.

The module checks the installed aiosmtpd at import: on a minor version it was
not written for it raises ImportError (the daemon does not start) instead of
failing in the middle of a session. pyproject.toml pins aiosmtpd to the same
versions; supporting a new one means reading each name below against it, then
adding it to :data:`KNOWN_VERSIONS`.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from collections import defaultdict

# The stdlib's RFC 5322 tokenizer, as aiosmtpd's own _getaddr uses it.
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any, cast

import aiosmtpd
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


class Engine(SMTP):
    """aiosmtpd's ``SMTP``, its private names behind names of our own.

    Subclasses implement :meth:`before_banner` and :meth:`on_idle_timeout`
    and use the accessors below, never an underscored aiosmtpd name.
    """

    def __init__(self, handler: Any, **engine: Any) -> None:
        # aiosmtpd keeps these limits in a class-level dict that every session
        # clears and every EHLO grows; each session gets its own.
        self.command_size_limits = defaultdict(lambda: self.command_size_limit)
        super().__init__(handler, **engine)

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
