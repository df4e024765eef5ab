"""The SMTP and LMTP protocol: aiosmtpd's engine with the bridge's front door.

:class:`BridgeSMTP` adds what happens around the commands (admission against
the connection limits, a PROXY header and implicit TLS before the banner,
STARTTLS (:mod:`.tls_session`), AUTH throttling, timers, enhanced status codes,
shutdown) and reads DATA itself (:mod:`.data`); the policy is
:class:`~.handler.BridgeHandler`'s. aiosmtpd's private names are reached only
through :class:`~.compat.Engine`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING, Any, AnyStr, cast

from aiosmtpd.smtp import LoginPassword

from .. import replies
from ..ids import new_queue_id
from ..logs import log_context, log_event
from ..replies import Reply
from .data import read_data
from .limits import ConnectionTracker, command_limits
from .proxy import read_proxy_header
from .runtime import IPAddress, Runtime, peer_ip
from .tls_session import TlsSession
from .wording import on_the_wire

if TYPE_CHECKING:
    from .handler import BridgeHandler

__all__ = ["PROXY_HEADER_TIMEOUT", "BridgeSMTP"]

log = logging.getLogger("smtp_bridge.smtp")

#: How long a proxied connection may take to send its PROXY header (at most
#: smtp.timeout); a load balancer sends it at once.
PROXY_HEADER_TIMEOUT = 10.0


class BridgeSMTP(TlsSession):
    """aiosmtpd's SMTP with our DATA reader, reply codes, TLS, PROXY and limits."""

    #: RFC 5321 4.5.3.1.1: a local part is at most 64 octets (aiosmtpd: no limit).
    local_part_limit = 64
    #: The word after the host name in the banner; no software version in it.
    banner_ident = "ESMTP"
    #: LMTP: after DATA one reply per recipient, each its own outcome.
    per_recipient_replies = False

    def __init__(
        self,
        handler: BridgeHandler,
        runtime: Runtime,
        tracker: ConnectionTracker,
        *,
        implicit_tls: bool = False,
        **kwargs: Any,
    ) -> None:
        smtp = runtime.config.smtp
        offer_starttls = smtp.tls is not None and smtp.tls.starttls and not implicit_tls
        super().__init__(
            handler,
            data_size_limit=smtp.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=smtp.hostname,
            ident=self.banner_ident,
            tls_context=runtime.tls_context if offer_starttls else None,
            timeout=smtp.timeout,
            # Each command has a budget per session (smtp.max_commands_per_session).
            command_call_limit=command_limits(smtp.max_commands_per_session, smtp.max_recipients),
            # TLS-before-AUTH is decided per client (trusted networks are
            # exempt), in smtp_AUTH below, not by aiosmtpd's global switch.
            auth_require_tls=False,
            authenticator=handler.authenticate,
            **kwargs,
        )
        self.event_handler: BridgeHandler = handler
        self.runtime = runtime
        self.tracker = tracker
        self.implicit_tls = implicit_tls
        self.client_ip: IPAddress | None = None
        #: The load balancer's address when the client came through PROXY protocol.
        self.proxy_ip: IPAddress | None = None
        self.session_id = secrets.token_hex(4)
        self._admitted = False
        self._lost = False
        self._greeted = False  # the banner is out: replies may be written
        self._handshaking = False  # a TLS handshake is in progress: write nothing
        self._raw_replies = False
        self._in_data = False
        self._handling = False  # the message is in, the handler is running
        self._closing = False
        self._closing_reply = replies.SERVICE_UNAVAILABLE_SHUTDOWN
        self._session_timer: asyncio.TimerHandle | None = None
        self._awaiting_proxy = False  # the PROXY header is still being read
        self.queue_id = ""  # of the message being received
        #: PLAIN/LOGIN credentials aiosmtpd parsed, for smtp_AUTH to check off the loop.
        self.pending_credentials: tuple[str, LoginPassword] | None = None
        #: Set by handle_DATA: lower-cased recipient -> its own reply (LMTP).
        self.rcpt_replies: dict[str, Reply] | None = None

    def session_event(self, event: str, *, level: int = logging.INFO, **fields: Any) -> None:
        """One log line about this session: its id and client, then ``fields``.

        (The connect and disconnect lines, one each per connection, call
        log_event themselves: no extra call on the path every session takes.)
        """
        log_event(
            log, event, level=level, session=self.session_id, client=str(self.client_ip), **fields
        )

    def close_when_idle(self) -> None:
        """Shutdown: end the session now if idle, else right after its DATA reply."""
        self._closing = True
        self._closing_reply = replies.SERVICE_UNAVAILABLE_SHUTDOWN
        if not self._in_data:
            self._close_with(replies.SERVICE_UNAVAILABLE_SHUTDOWN)

    def abort(self) -> None:
        """Shutdown grace period over: close whatever is left."""
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------ lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check: uvloop's transports (the daemon's loop) are not
        # subclasses of asyncio.Transport, though they implement it.
        transport = cast(asyncio.Transport, transport)
        if self.transport is None:  # a new connection, not a TLS upgrade
            self.client_ip = peer_ip(transport.get_extra_info("peername"))
            if not self._admit(transport):
                transport.close()
                return
        super().connection_made(transport)

    def _admit(self, transport: asyncio.Transport) -> bool:
        runtime = self.runtime
        metrics = self.event_handler.metrics
        proxied = runtime.config.smtp.proxy_protocol
        if proxied and not runtime.is_proxy(self.client_ip):
            # Only the listed load balancers may claim another client's address.
            log_event(
                log,
                "proxy_refused",
                level=logging.WARNING,
                client=str(self.client_ip),
                reason="not in smtp.proxy_from",
            )
            metrics.sessions.labels(result="refused").inc()
            return False
        # Behind a proxy the client's address comes with the PROXY header; until
        # then the session counts in the total only.
        ip = None if proxied else self.client_ip
        if not self.tracker.admit(self, ip, runtime, per_ip=not proxied):
            self._refuse_connection(transport)
            return False
        self._admitted = True
        metrics.sessions.labels(result="accepted").inc()
        metrics.sessions_open.inc()
        if not proxied:
            log_event(log, "connect", session=self.session_id, client=str(self.client_ip))
        cap = runtime.config.smtp.max_session_time
        if cap > 0:
            self._session_timer = self.loop.call_later(cap, self._session_expired)
        return True

    def _refuse_connection(self, transport: asyncio.BaseTransport) -> None:
        log_event(
            log,
            "connection_refused",
            level=logging.WARNING,
            client=str(self.client_ip),
            proxy=str(self.proxy_ip) if self.proxy_ip else None,
            reason="too many connections",
        )
        if not self.implicit_tls:  # a TLS client could not read a plaintext reply
            cast(asyncio.Transport, transport).write(f"{replies.TOO_MANY_CONNECTIONS}\r\n".encode())
        self.event_handler.metrics.sessions.labels(result="refused").inc()

    def connection_lost(self, error: Exception | None) -> None:
        if not self._admitted or self._lost:
            return
        self._lost = True  # also called by hand after a failed TLS handshake
        if self._session_timer is not None:
            self._session_timer.cancel()
        if self._awaiting_proxy:
            self._proxy_header_invalid("connection closed")
        self.tracker.release(self)
        self.event_handler.metrics.sessions_open.dec()
        log_event(log, "disconnect", session=self.session_id, client=str(self.client_ip))
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self._admitted:
            super().eof_received()  # cancels the session's handler
        # Close at once: aiosmtpd would keep a half-closed connection open, and
        # counted against the limits, until the idle timeout.
        return False

    async def before_banner(self) -> bool:
        if self.runtime.config.smtp.proxy_protocol and not await self._read_proxy_header():
            self._close_with(None)
            return False
        if self.implicit_tls and not await self.start_implicit_tls():
            return False
        self._greeted = True
        return True

    def _close_with(self, reply: Reply | None) -> None:
        """Close the session, with ``reply`` first when the client can read one."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if reply is not None and self._greeted and not self._handshaking:
            self.write(f"{reply}\r\n".encode())
        transport.close()

    # ------------------------------------------------------------ limits

    def on_idle_timeout(self) -> None:
        if self.transport is None or self._lost:
            return
        if self._handling:  # the client waits for the API, it is not idle
            self.reset_timeout()
            return
        self.session_event("idle_timeout")
        self._close_with(replies.IDLE_TIMEOUT)

    def _session_expired(self) -> None:
        self._session_timer = None
        if self.transport is None or self._lost:
            return
        limit = self.runtime.config.smtp.max_session_time
        self.session_event("session_time_limit", level=logging.WARNING, limit=limit)
        if self._handling:
            # The message is in and its API calls are running: answer it, then close.
            self._closing = True
            self._closing_reply = replies.SESSION_TIME_LIMIT
            return
        # Idle or still uploading (a slow drip): nothing was accepted, close now.
        self._close_with(replies.SESSION_TIME_LIMIT)

    # ------------------------------------------------------------ PROXY protocol

    async def _read_proxy_header(self) -> bool:
        """Read the PROXY header (v1 or v2, haproxy's proxy-protocol.txt) that an
        allowed load balancer sends first; the client it names becomes
        ``client_ip`` for trusted_networks, limits, AUTH throttling, routes and logs."""
        self.reset_timeout(min(self.timeout_duration, PROXY_HEADER_TIMEOUT))
        proxy = self.client_ip
        self._awaiting_proxy = True  # stays set if the connection ends meanwhile
        found = await read_proxy_header(self.reader, proxy)
        self._awaiting_proxy = False
        if isinstance(found, str):
            self._proxy_header_invalid(found)
            return False
        client, data = found
        self.proxy_ip, self.client_ip = proxy, client
        if not self.tracker.bind(self, client, self.runtime):
            assert self.transport is not None
            self._refuse_connection(self.transport)
            return False
        log_event(
            log,
            "connect",
            session=self.session_id,
            client=str(client),
            proxy=str(proxy),
            proxy_version=data.version,
        )
        self.reset_timeout()
        return True

    def _proxy_header_invalid(self, reason: str) -> None:
        proxy = str(self.client_ip)  # until a valid header is in, the proxy's address
        log_event(log, "proxy_header_invalid", level=logging.WARNING, proxy=proxy, reason=reason)

    # ------------------------------------------------------------ replies

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            # Enhanced status codes added, client text escaped (wording.py).
            await super().push(on_the_wire(status, enhance=not self._raw_replies))
        else:
            await super().push(status)

    async def smtp_EHLO(self, hostname: str) -> None:
        await self._ehlo(hostname, "EHLO")

    async def _ehlo(self, hostname: str, command: str) -> None:
        self._log_helo(command, hostname)
        self._raw_replies = True
        # aiosmtpd widens the MAIL limit on every EHLO (SIZE, SMTPUTF8): once is right.
        self.command_size_limits.pop("MAIL", None)
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._raw_replies = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._log_helo("HELO", hostname)
        self._raw_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._raw_replies = False

    def _log_helo(self, command: str, hostname: str | None) -> None:
        # Client text, as sent: the formatters escape it (CR, LF, ESC never raw).
        log_event(
            log,
            "helo",
            level=logging.DEBUG,
            session=self.session_id,
            command=command,
            helo=(hostname or "")[:255],
        )

    # ------------------------------------------------------------ AUTH

    async def smtp_AUTH(self, arg: str) -> None:
        if self.session is None or not self.session.extended_smtp or self.session.authenticated:
            await super().smtp_AUTH(arg)  # aiosmtpd's own sequencing replies
            return
        refusal = await self.event_handler.before_auth(self)
        if refusal is not None:
            await self.push(str(refusal))
            if refusal.code == 421 and self.transport is not None:  # locked out
                self.transport.close()
            return
        await super().smtp_AUTH(arg)
        attempt, self.pending_credentials = self.pending_credentials, None
        if attempt is not None:  # aiosmtpd parsed credentials: hash them off the loop
            reply = await self.event_handler.check_password(self, *attempt)
            await self.push(str(reply))
            if reply.code == 421 and self.transport is not None:  # locked out
                self.transport.close()

    # ------------------------------------------------------------ DATA

    async def smtp_DATA(self, arg: str | None) -> None:
        """DATA, read by :func:`.data.read_data` (long lines kept, size capped
        whatever the line lengths), answered by the handler."""
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Need RCPT command first")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        self._in_data = True
        try:
            await self._read_and_handle_data()
        finally:
            self._in_data = False
        if self._closing and self.transport is not None:
            await self.push(str(self._closing_reply))
            self.transport.close()

    async def _read_and_handle_data(self) -> None:
        assert self.envelope is not None
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        limit = self.data_size_limit
        received = await read_data(
            self.reader,
            limit,
            clock=self.loop.time,
            keepalive=self.reset_timeout,
            is_open=lambda: self.transport is not None,
        )
        if received is None:
            return
        data, too_big = received
        # Every reply to DATA carries the queue id (docs/replies.md), refusals too.
        self.queue_id = new_queue_id()
        rcpts = list(self.envelope.rcpt_tos)
        self.rcpt_replies = None
        if too_big:
            self.end_transaction()
            log_event(
                log,
                "too_large",
                level=logging.WARNING,
                queue_id=self.queue_id,
                session=self.session_id,
                limit=limit,
            )
            await self._push_data_replies(replies.TOO_LARGE.with_id(self.queue_id), rcpts)
            return
        self.envelope.content = bytes(data)
        self.envelope.original_content = self.envelope.content
        data.clear()
        self.reset_timeout()
        self._handling = True
        try:
            # The session, client and queue id on every event of this message,
            # the delivery task's api_call lines included (logs.log_context).
            with log_context(
                session=self.session_id, client=str(self.client_ip), queue_id=self.queue_id
            ):
                status = await self.call_handler_hook("DATA")
        except Exception:
            # Never the exception's class or text in a reply; the log has it.
            log.exception("internal error", extra={"bridge_fields": {"queue_id": self.queue_id}})
            status = replies.INTERNAL.with_id(self.queue_id)
            self.rcpt_replies = None
        finally:
            self._handling = False
            # The end of data consumes the transaction whatever its outcome, also
            # when the hook raised (451 via handle_exception): RFC 5321 4.1.1.4.
            self.end_transaction()
        await self._push_data_replies(status, rcpts)

    async def _push_data_replies(self, status: str, rcpts: list[str]) -> None:
        """SMTP: one reply for the message (LMTP overrides: one per recipient)."""
        await self.push(status)
