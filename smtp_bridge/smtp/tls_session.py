"""A session's TLS: STARTTLS, or implicit TLS (RFC 8314) before the banner.

Either is an in-place upgrade of the session's transport with the context of
the session's own :class:`~.runtime.Runtime`, so a reload (SIGHUP) with renewed
certificates applies to new sessions, and an implicit-TLS listener can read a
PROXY header before its handshake. A client's failed handshake is not the
bridge's error: a warning, no traceback, and the connection is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Any, cast

from aiosmtpd.smtp import TLSSetupException, syntax

from .. import replies
from ..logs import log_event
from ..replies import Reply
from .compat import Engine
from .runtime import Runtime

__all__ = ["TlsSession"]

log = logging.getLogger("smtp_bridge.smtp")


class TlsSession(Engine):
    """The TLS part of :class:`~.protocol.BridgeSMTP`, the session, which sets and
    defines what is declared here without a value."""

    runtime: Runtime
    session_id: str
    #: The listener is implicit TLS: the handshake comes before the banner.
    implicit_tls: bool
    #: A TLS handshake is in progress: nothing may be written.
    _handshaking: bool

    if TYPE_CHECKING:

        def session_event(self, event: str, *, level: int = ..., **fields: Any) -> None: ...

        def _close_with(self, reply: Reply | None) -> None: ...

    @property
    def tls_active(self) -> bool:
        """True once a TLS handshake (STARTTLS or implicit) has completed."""
        session = self.session
        return self.tls_layer is not None and session is not None and session.ssl is not None

    async def start_implicit_tls(self) -> bool:
        """Implicit TLS (RFC 8314): the handshake comes before the banner."""
        context = self.runtime.tls_context
        if context is None:  # TLS removed from the config by a reload
            log_event(log, "tls_unavailable", level=logging.WARNING, session=self.session_id)
            self._close_with(None)
            return False
        return await self._await_handshake(self.start_tls(context))

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.tls_layer is not None:
            await self.push(str(replies.TLS_ALREADY_ACTIVE))
            return
        if self.tls_context is None:
            await self.push(str(replies.TLS_NOT_AVAILABLE))
            return
        try:
            # aiosmtpd answers 220, swaps the transport and awaits the handshake;
            # the session is reset (RFC 3207 4.2) and whatever the client sent
            # behind STARTTLS in plaintext is discarded (RFC 3207 5, command
            # injection), in connection_made.
            self._handshaking = True
            await super().smtp_STARTTLS(arg)
        except TLSSetupException as exc:
            self._tls_failed(exc.__cause__)
            return
        finally:
            self._handshaking = False
        if self.tls_layer is not None:  # None: a syntax error was answered
            if self.tls_active:
                self._tls_started()
            else:
                self._tls_failed(None)

    async def _await_handshake(self, waiter: asyncio.Future[None]) -> bool:
        self._handshaking = True
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._tls_failed(exc)
            return False
        finally:
            self._handshaking = False
        # The waiter also resolves when the connection closes mid-handshake.
        if not self.tls_active:
            self._tls_failed(None)
            return False
        self._tls_started()
        return True

    def _tls_started(self) -> None:
        info = self.session.ssl if self.session is not None else None
        ssl_object = cast(ssl.SSLObject | None, info.get("ssl_object") if info else None)
        cipher = ssl_object.cipher() if ssl_object is not None else None
        self.session_event(
            "tls",
            implicit=self.implicit_tls,
            version=ssl_object.version() if ssl_object is not None else None,
            cipher=cipher[0] if cipher else None,
        )

    def _tls_failed(self, error: BaseException | None) -> None:
        reason = "connection closed"
        if isinstance(error, ssl.SSLError):
            reason = error.reason or "handshake failed"
        elif error is not None:
            reason = type(error).__name__
        self.session_event("tls_failed", level=logging.WARNING, reason=reason)
        self._drop()

    def _drop(self) -> None:
        """Close a session whose TLS layer never came up (no connection_lost follows)."""
        self.close_transports()
        self.connection_lost(None)
