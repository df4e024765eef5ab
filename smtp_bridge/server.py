"""The SMTP face: aiosmtpd's protocol engine with the bridge's handler hooks.

:class:`BridgeSMTP` adjusts the engine (DATA reader, enhanced status codes,
connection limits); :class:`BridgeHandler` speaks the policy (who may send,
which recipients are routable, what a message became). Every hook returns an
explicit SMTP reply; internal errors answer ``451 4.3.0`` and never leak.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, AnyStr, cast

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from . import replies
from .auth import Authenticator, AuthThrottle, Credentials
from .config import Config
from .delivery import DirectDelivery, IncomingMessage, RecipientOutcome, aggregate
from .logs import log_event
from .message import has_bare_line_end, is_valid_address, normalize_line_ends, parse_message
from .rules import Envelope, Router
from .templating import ClientInfo

__all__ = ["BridgeHandler", "BridgeSMTP", "ConnectionTracker", "Runtime", "new_queue_id"]

log = logging.getLogger("smtp_bridge.smtp")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Parse in a worker thread above this size, so one big message does not
#: stall every other session on the loop.
PARSE_IN_THREAD_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Runtime:
    """What one session works with; replaced as a whole on reload (SIGHUP)."""

    config: Config
    router: Router
    authenticator: Authenticator

    @classmethod
    def build(cls, config: Config) -> Runtime:
        credentials = Credentials.from_config(config.smtp.auth.users)
        return cls(config, Router(config.routes), Authenticator(credentials))

    def auth_offered(self, ip: IPAddress | None, tls: bool) -> bool:
        """AUTH is offered when users exist, and over TLS unless the network is trusted."""
        auth = self.config.smtp.auth
        if not auth.users:
            return False
        return tls or not auth.require_tls or self.is_trusted(ip)

    def is_trusted(self, ip: IPAddress | None) -> bool:
        if ip is None:
            return False
        nets = self.config.smtp.trusted_networks
        return any(ip.version == net.version and ip in net for net in nets)


def new_queue_id() -> str:
    """A short, time-ordered, unguessable id: what operators grep for."""
    return f"{int(time.time() * 1000):011X}{secrets.token_hex(3).upper()}"


def peer_ip(peer: Any) -> IPAddress | None:
    if isinstance(peer, tuple) and peer:
        try:
            return ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
        except ValueError:
            return None
    return None


class ConnectionTracker:
    """Counts open sessions, in total and per client address."""

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: Counter[IPAddress | None] = Counter()
        self.sessions: set[BridgeSMTP] = set()
        self._empty: asyncio.Event | None = None

    async def wait_empty(self) -> None:
        """Return once no session is open (shutdown drain)."""
        while self.total:
            self._empty = self._empty or asyncio.Event()
            await self._empty.wait()

    def admit(self, session: BridgeSMTP, ip: IPAddress | None, runtime: Runtime) -> bool:
        smtp = runtime.config.smtp
        if self.total >= smtp.max_connections:
            return False
        # Trusted networks skip the per-IP cap, as Postfix exempts mynetworks.
        if not runtime.is_trusted(ip) and self.per_ip[ip] >= smtp.max_connections_per_ip:
            return False
        self.total += 1
        self.per_ip[ip] += 1
        self.sessions.add(session)
        return True

    def release(self, session: BridgeSMTP, ip: IPAddress | None) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.total -= 1
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]
            if not self.total and self._empty is not None:
                self._empty.set()
                self._empty = None


# aiosmtpd's own replies carry no enhanced status code (RFC 3463); clients and
# operators read those, so add one by reply code. 220 and 354 take none, and
# neither do EHLO/HELO lines (RFC 2034 section 3).
_ENHANCED_DEFAULTS = {
    221: "2.0.0",
    250: "2.0.0",
    251: "2.1.5",
    252: "2.5.0",
    421: "4.7.0",
    451: "4.3.0",
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    530: "5.7.0",
    535: "5.7.8",
    538: "5.7.11",
    550: "5.0.0",
    552: "5.3.4",
    553: "5.1.3",
    554: "5.3.0",
    555: "5.5.4",
}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(\s|$)")
_REWRITES = {
    "552 Error: message size exceeds fixed maximum message size": str(replies.TOO_LARGE),
    "552 Error: Too much mail data": str(replies.TOO_LARGE),
}


def _with_enhanced_code(line: str) -> str:
    if line in _REWRITES:
        return _REWRITES[line]
    if len(line) < 3 or not line[:3].isdigit() or _HAS_ENHANCED.match(line):
        return line
    if len(line) > 3 and line[3] == "-":
        return line
    enhanced = _ENHANCED_DEFAULTS.get(int(line[:3]))
    if enhanced is None:
        return line
    text = line[4:].removeprefix("Error: ") or "Ok"
    return f"{line[:3]} {enhanced} {text}"


class BridgeSMTP(SMTP):
    """aiosmtpd's SMTP with our DATA reader, reply codes and connection limits."""

    def __init__(
        self,
        handler: BridgeHandler,
        runtime: Runtime,
        tracker: ConnectionTracker,
        **kwargs: Any,
    ) -> None:
        smtp = runtime.config.smtp
        super().__init__(
            handler,
            data_size_limit=smtp.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=smtp.hostname,
            ident="ESMTP",  # no software version in the banner
            timeout=smtp.timeout,
            # Reset floods: each command has a budget per session.
            command_call_limit={"NOOP": 50, "RSET": 50, "VRFY": 10, "HELP": 10, "*": 200},
            # TLS-before-AUTH is decided per client (trusted networks are
            # exempt), in smtp_AUTH below, not by aiosmtpd's global switch.
            auth_require_tls=False,
            authenticator=_authenticate,
            **kwargs,
        )
        self.runtime = runtime
        self.tracker = tracker
        self.client_ip: IPAddress | None = None
        self.session_id = secrets.token_hex(4)
        self._admitted = False
        self._raw_replies = False
        self._in_data = False
        self._closing = False
        self.queue_id = ""  # of the message being received

    def close_when_idle(self) -> None:
        """Shutdown: end the session now if idle, else right after its DATA reply."""
        self._closing = True
        if not self._in_data and self.transport is not None:
            self._writer.write(f"{replies.SERVICE_UNAVAILABLE_SHUTDOWN}\r\n".encode())
            self.transport.close()

    def abort(self) -> None:
        """Shutdown grace period over: close whatever is left."""
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------ lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check: uvloop's transports (the daemon's loop) are not
        # subclasses of asyncio.Transport, though they implement it.
        transport = cast(asyncio.Transport, transport)
        if self.transport is None:  # a new connection, not a STARTTLS upgrade
            self.client_ip = peer_ip(transport.get_extra_info("peername"))
            if not self.tracker.admit(self, self.client_ip, self.runtime):
                log_event(
                    log,
                    "connection_refused",
                    level=logging.WARNING,
                    client=str(self.client_ip),
                    reason="too many connections",
                )
                transport.write(f"{replies.TOO_MANY_CONNECTIONS}\r\n".encode())
                transport.close()
                self.event_handler.metrics.sessions.labels(result="refused").inc()
                return
            self._admitted = True
            self.event_handler.metrics.sessions.labels(result="accepted").inc()
            self.event_handler.metrics.sessions_open.inc()
            log_event(log, "connect", session=self.session_id, client=str(self.client_ip))
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if not self._admitted:
            return
        self.tracker.release(self, self.client_ip)
        self.event_handler.metrics.sessions_open.dec()
        log_event(log, "disconnect", session=self.session_id, client=str(self.client_ip))
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if not self._admitted:
            return False
        result: bool | None = super().eof_received()
        return result

    # ------------------------------------------------------------ replies

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str) and not self._raw_replies:
            await super().push(_with_enhanced_code(status))
        else:
            await super().push(status)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._raw_replies = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._raw_replies = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._raw_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._raw_replies = False

    # ------------------------------------------------------------ AUTH

    async def smtp_AUTH(self, arg: str) -> None:
        if self.session is None or not self.session.extended_smtp or self.session.authenticated:
            await super().smtp_AUTH(arg)  # aiosmtpd's own sequencing replies
            return
        runtime = self.runtime
        if not runtime.config.smtp.auth.users:
            await self.push(str(replies.AUTH_NOT_AVAILABLE))
            return
        if not runtime.auth_offered(self.client_ip, self._tls_protocol is not None):
            await self.push(str(replies.AUTH_NEEDS_TLS))
            return
        throttle: AuthThrottle = self.event_handler.throttle
        ip, now = self.client_ip, time.monotonic()
        if ip is not None and throttle.should_disconnect(ip, now):
            log_event(
                log,
                "auth_locked_out",
                level=logging.WARNING,
                session=self.session_id,
                client=str(ip),
            )
            await self.push(str(replies.AUTH_TOO_MANY_FAILURES))
            if self.transport is not None:
                self.transport.close()
            return
        delay = throttle.delay_for(ip, now) if ip is not None else 0.0
        if delay:
            await asyncio.sleep(delay)  # a tarpit for password guessing, by design
        await super().smtp_AUTH(arg)

    # ------------------------------------------------------------ DATA

    async def smtp_DATA(self, arg: str | None) -> None:
        """Read DATA ourselves: end only at CRLF.CRLF, cap the size whatever the
        line lengths (552 5.3.4 after the terminator, RFC 5321 4.2.5), and keep
        long lines, which legacy apps send and RFC 5322 readers tolerate."""
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
            await self.push(str(replies.SERVICE_UNAVAILABLE_SHUTDOWN))
            self.transport.close()

    async def _read_and_handle_data(self) -> None:
        assert self.envelope is not None
        await self.push("354 End data with <CR><LF>.<CR><LF>")
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
                return  # connection closed mid-DATA: nothing to answer
            now = self.loop.time()
            if now - last_reset > 1.0:  # a slow upload is not an idle client
                self._reset_timeout()
                last_reset = now
            complete = chunk.endswith(b"\r\n")
            if at_line_start and chunk == b".\r\n":
                break
            if at_line_start and chunk.startswith(b"."):
                chunk = chunk[1:]  # dot-unstuffing, RFC 5321 4.5.2
            at_line_start = complete
            if not too_big:
                if limit and len(data) + len(chunk) > limit:
                    too_big = True
                    data.clear()  # stop holding memory for a message we refuse
                else:
                    data += chunk
        if self.transport is None:
            return
        # Every reply to DATA carries the queue id (DESIGN 5), refusals too.
        self.queue_id = new_queue_id()
        if too_big:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            log_event(
                log,
                "too_large",
                level=logging.WARNING,
                queue_id=self.queue_id,
                session=self.session_id,
                limit=limit,
            )
            await self.push(replies.TOO_LARGE.with_id(self.queue_id))
            return
        self.envelope.content = bytes(data)
        self.envelope.original_content = self.envelope.content
        data.clear()
        try:
            status = await self._call_handler_hook("DATA")
        except Exception:
            # Never the exception's class or text in a reply; the log has it.
            log.exception("internal error", extra={"bridge_fields": {"queue_id": self.queue_id}})
            status = replies.INTERNAL.with_id(self.queue_id)
        finally:
            # The end of data consumes the transaction whatever its outcome, also
            # when the hook raised (451 via handle_exception): RFC 5321 4.1.1.4.
            self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)


class BridgeHandler:
    """aiosmtpd handler hooks: policy at MAIL and RCPT, delivery at DATA."""

    def __init__(
        self,
        delivery: DirectDelivery,
        track: Callable[[asyncio.Task[list[RecipientOutcome]]], None],
    ) -> None:
        self.delivery = delivery
        self._track = track
        self.throttle = AuthThrottle()
        self.metrics = delivery.metrics

    async def handle_EHLO(
        self,
        server: BridgeSMTP,
        session: Session,
        envelope: SmtpEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        lines = responses[:-1]
        if not server.runtime.auth_offered(server.client_ip, server._tls_protocol is not None):
            lines = [line for line in lines if not line.startswith("250-AUTH")]
        # RFC 2034: advertise before the final line.
        return [*lines, "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(
        self,
        server: BridgeSMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        runtime = server.runtime
        if not session.authenticated and not runtime.is_trusted(server.client_ip):
            log_event(
                log,
                "relay_denied",
                level=logging.WARNING,
                session=server.session_id,
                client=str(server.client_ip),
            )
            return str(replies.AUTH_REQUIRED)
        sender = "" if address == "<>" else address
        if sender and not is_valid_address(sender):
            return "553 5.1.7 Bad sender address syntax"
        # aiosmtpd knows MAIL was given by a truthy mail_from (else RCPT answers
        # 503): keep "<>" for the null sender (RFC 5321 4.5.5), read via _sender().
        envelope.mail_from = sender or "<>"
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: BridgeSMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        runtime = server.runtime
        if len(envelope.rcpt_tos) >= runtime.config.smtp.max_recipients:
            return str(replies.TOO_MANY_RECIPIENTS)
        if not is_valid_address(address):
            return str(replies.RCPT_BAD_SYNTAX)
        user = _user(session)
        decision = runtime.router.at_rcpt(
            Envelope(_sender(envelope), address, user, server.client_ip)
        )
        if decision.verdict == "no_route":
            log_event(log, "rcpt_no_route", session=server.session_id, rcpt=address)
            return str(replies.RCPT_NO_ROUTE)
        if decision.verdict == "reject":
            assert decision.route is not None
            log_event(
                log,
                "rcpt_rejected",
                session=server.session_id,
                rcpt=address,
                route=decision.route.name,
            )
            return str(decision.route.reply or replies.REJECTED)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(
        self, server: BridgeSMTP, session: Session, envelope: SmtpEnvelope
    ) -> str:
        queue_id = server.queue_id
        started = time.perf_counter()
        runtime = server.runtime
        raw: bytes = envelope.original_content or b""
        if has_bare_line_end(raw):
            if runtime.config.smtp.bare_lf == "reject":
                log_event(
                    log,
                    "bare_lf_rejected",
                    level=logging.WARNING,
                    queue_id=queue_id,
                    session=server.session_id,
                )
                return replies.BARE_LF.with_id(queue_id)
            raw = normalize_line_ends(raw)
        if len(raw) > PARSE_IN_THREAD_BYTES:
            parsed = await asyncio.to_thread(parse_message, raw)
        else:
            parsed = parse_message(raw)
        user = _user(session)
        message = IncomingMessage(
            queue_id=queue_id,
            raw=raw,
            parsed=parsed,
            mail_from=_sender(envelope),
            rcpts=list(envelope.rcpt_tos),
            user=user,
            client=ClientInfo(str(server.client_ip or "")),
            app_key=_user_key(runtime, user),
        )
        # The delivery runs in its own task: aiosmtpd cancels the handler when
        # the client disconnects, and calls already sent must finish and be
        # recorded, or a retry would send them twice (DESIGN 2).
        task = asyncio.get_running_loop().create_task(
            self.delivery.deliver(message, runtime.config, runtime.router)
        )
        self._track(task)
        outcomes = await asyncio.shield(task)
        reply = aggregate(outcomes)
        log_event(
            log,
            "message",
            queue_id=queue_id,
            session=server.session_id,
            client=message.client.ip,
            mail_from=message.mail_from,
            rcpts=len(message.rcpts),
            size=len(raw),
            subject=parsed.subject[:100],
            reply=str(reply),
            elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        self.metrics.replies.labels(code=str(reply.code)).inc()
        return reply.with_id(queue_id)

    async def handle_exception(self, error: Exception) -> str:
        # Never the class name or text of an exception in a reply.
        log.error("session error", exc_info=error)
        return str(replies.INTERNAL)


def _sender(envelope: SmtpEnvelope) -> str:
    """The envelope sender; '' for the null sender <>."""
    mail_from = envelope.mail_from or ""
    return "" if mail_from == "<>" else mail_from


def _authenticate(
    smtp: SMTP, session: Session, envelope: SmtpEnvelope, mechanism: str, data: Any
) -> AuthResult:
    """aiosmtpd's authenticator: check PLAIN/LOGIN credentials (never logged)."""
    server = cast(BridgeSMTP, smtp)
    if not isinstance(data, LoginPassword):
        return AuthResult(success=False, handled=False)
    user = data.login.decode("utf-8", "replace")
    ip = server.client_ip
    throttle: AuthThrottle = server.event_handler.throttle
    if server.runtime.authenticator.check(data.login, data.password):
        if ip is not None:
            throttle.success(ip)
        log_event(
            log,
            "auth_ok",
            session=server.session_id,
            client=str(ip),
            user=user,
            mechanism=mechanism,
        )
        return AuthResult(success=True, auth_data=user)
    if ip is not None:
        throttle.failure(ip, time.monotonic())
    log_event(
        log,
        "auth_failed",
        level=logging.WARNING,
        session=server.session_id,
        client=str(ip),
        user=user[:64],
        mechanism=mechanism,
    )
    return AuthResult(success=False, handled=False)  # aiosmtpd answers 535 5.7.8


def _user(session: Session) -> str:
    if not session.authenticated:
        return ""
    return str(session.auth_data or "")


def _user_key(runtime: Runtime, user: str) -> str:
    """The user's own API key, or '' to use the global one."""
    return (runtime.authenticator.credentials.app_key(user) or "") if user else ""
