"""The bridge's policy as aiosmtpd handler hooks: who may send (AUTH, MAIL),
which recipients are routable (RCPT), what a message became (DATA).

Every hook returns an explicit SMTP reply; an internal error answers
``451 4.3.0`` and never leaks the exception's class or text.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from .. import history, replies
from ..auth_throttle import AuthThrottle
from ..delivery import Delivery, IncomingMessage
from ..errors import StoreError
from ..logs import log_event
from ..message import has_bare_line_end, is_valid_address, normalize_line_ends, parse_message
from ..policy import RecipientOutcome, aggregate
from ..quotas import quota_reply
from ..replies import Reply
from ..rules import Envelope
from ..store import Quotas
from ..templating import ClientInfo
from .runtime import Runtime

if TYPE_CHECKING:
    from .protocol import BridgeSMTP

__all__ = ["PARSE_IN_THREAD_BYTES", "BridgeHandler"]

log = logging.getLogger("smtp_bridge.smtp")

#: Parse in a worker thread above this size, so one big message does not
#: stall every other session on the loop.
PARSE_IN_THREAD_BYTES = 256 * 1024


#: aiosmtpd's own AUTH replies, now that the check is ours.
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")


class BridgeHandler:
    """aiosmtpd handler hooks: policy at AUTH, MAIL and RCPT, delivery at DATA."""

    def __init__(
        self,
        delivery: Delivery,
        track: Callable[[asyncio.Task[list[RecipientOutcome]]], None],
    ) -> None:
        self.delivery = delivery
        self._track = track
        self.throttle = AuthThrottle()
        self.metrics = delivery.metrics
        #: Where ``quotas:`` count (the service's store); None: quotas are not checked.
        self.quota_store: Quotas | None = None

    async def before_auth(self, server: BridgeSMTP) -> Reply | None:
        """AUTH's policy before the exchange: a refusal, or None to go on.
        (Not named ``auth_*``: aiosmtpd takes those for AUTH mechanisms.)

        Offered at all, over TLS unless the network is trusted, not locked out
        after repeated failures (421 4.7.0: the session closes); after failures
        the answer comes more slowly, a tarpit for password guessing, by design.
        """
        runtime = server.runtime
        if not runtime.config.smtp.auth.users:
            return replies.AUTH_NOT_AVAILABLE
        if not runtime.auth_offered(server.client_ip, server.tls_active):
            return replies.AUTH_NEEDS_TLS
        ip, now = server.client_ip, time.monotonic()
        if ip is not None and self.throttle.should_disconnect(ip, now):
            server.session_event("auth_locked_out", level=logging.WARNING)
            return replies.AUTH_TOO_MANY_FAILURES
        delay = self.throttle.delay_for(ip, now) if ip is not None else 0.0
        if delay:
            await asyncio.sleep(delay)
        return None

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
        if not server.runtime.auth_offered(server.client_ip, server.tls_active):
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
            server.session_event("relay_denied", level=logging.WARNING)
            return str(replies.AUTH_REQUIRED)
        sender = "" if address == "<>" else address
        if sender and not is_valid_address(sender):
            return "553 5.1.7 Bad sender address syntax"
        # Direct mode with the API's breaker open: the 4xx that opened it, now,
        # without reading the message or calling the API (docs/replies.md).
        held = self.delivery.blocked(runtime.config, _user_key(runtime, _user(session)))
        if held is not None:
            server.session_event("breaker_refused", level=logging.WARNING, reply=str(held))
            return str(held)
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
            self.metrics.rcpt_rejected.labels(reason="too_many").inc()
            return str(replies.TOO_MANY_RECIPIENTS)
        if not is_valid_address(address):
            self.metrics.rcpt_rejected.labels(reason="bad_syntax").inc()
            return str(replies.RCPT_BAD_SYNTAX)
        user = _user(session)
        rcpt_envelope = Envelope(_sender(envelope), address, user, server.client_ip)
        decision = runtime.router.at_rcpt(rcpt_envelope)
        if decision.verdict == "no_route":
            log_event(log, "rcpt_no_route", session=server.session_id, rcpt=address)
            self.metrics.rcpt_rejected.labels(reason="no_route").inc()
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
            self.metrics.rcpt_rejected.labels(reason="policy").inc()
            return str(decision.route.reply or replies.REJECTED)
        if runtime.config.quotas and self.quota_store is not None:
            try:
                over = await quota_reply(self.quota_store, runtime.config.quotas, rcpt_envelope,
                                         decision.route, metrics=self.metrics,
                                         session=server.session_id)  # fmt: skip
            except StoreError:
                over = str(replies.INTERNAL)  # uncounted: the store is down, as DATA would be
            if over is not None:
                return over
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
        # recorded, or a retry would send them twice (docs/guarantees.md).
        task = asyncio.get_running_loop().create_task(
            self.delivery.deliver(
                message,
                runtime.config,
                runtime.router,
                # LMTP tells each recipient its own outcome: no dead letters for 5xx.
                per_recipient=server.per_recipient_replies,
            )
        )
        self._track(task)
        outcomes = await asyncio.shield(task)
        reply = aggregate(outcomes)
        # LMTP answers each recipient with its own outcome (BridgeLMTP).
        server.rcpt_replies = {o.rcpt.lower(): o.reply for o in outcomes}
        log_event(
            log,
            "message",
            queue_id=queue_id,
            session=server.session_id,
            client=message.client.ip,
            mail_from=message.mail_from,
            rcpts=len(message.rcpts),
            routes=sorted({o.route for o in outcomes if o.route}),
            # Recipients left to the workers: one line a message, not a "spooled" line more.
            spooled=sum(o.spooled for o in outcomes),
            size=len(raw),
            subject=parsed.subject[:100],
            reply=str(reply),
            elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        self.metrics.replies.labels(code=str(reply.code)).inc()
        history.record_reply(message, outcomes, reply.with_id(queue_id))  # the console's
        return reply.with_id(queue_id)

    async def handle_exception(self, error: Exception) -> str:
        # Never the class name or text of an exception in a reply.
        log.error("session error", exc_info=error)
        return str(replies.INTERNAL)

    def authenticate(
        self, smtp: SMTP, session: Session, envelope: SmtpEnvelope, mechanism: str, data: Any
    ) -> AuthResult:
        """aiosmtpd's (synchronous) authenticator: keep PLAIN/LOGIN credentials for
        smtp_AUTH to check off the event loop (:meth:`check_password`); reply nothing yet."""
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        cast("BridgeSMTP", smtp).pending_credentials = (mechanism, data)
        return AuthResult(success=False, handled=True)

    async def check_password(
        self, server: BridgeSMTP, mechanism: str, data: LoginPassword
    ) -> Reply:
        """One password check within the AUTH throttle (never logged): the reply.

        The check is reserved before hashing (:meth:`AuthThrottle.begin`), so checks
        in progress count toward the lockout; scrypt runs off the event loop.
        """
        user = data.login.decode("utf-8", "replace")
        ip = server.client_ip
        throttle = self.throttle
        if ip is not None and not throttle.begin(ip, time.monotonic()):
            server.session_event("auth_locked_out", level=logging.WARNING)
            self.metrics.auth_checks.labels(result="locked_out").inc()
            return replies.AUTH_TOO_MANY_FAILURES
        ok = False
        try:
            ok = await server.runtime.authenticator.verify(data.login, data.password)
        finally:
            if ip is not None:
                throttle.end(ip, ok, time.monotonic())
        self.metrics.auth_checks.labels(result="ok" if ok else "failed").inc()
        if ok:
            session: Any = server.session  # aiosmtpd types auth_data as None
            session.authenticated, session.auth_data, session.login_data = True, user, data.login
            server.session_event("auth_ok", user=user, mechanism=mechanism)
            return AUTH_OK
        server.session_event(
            "auth_failed", level=logging.WARNING, user=user[:64], mechanism=mechanism
        )
        return AUTH_INVALID


def _sender(envelope: SmtpEnvelope) -> str:
    """The envelope sender; '' for the null sender <>."""
    mail_from = envelope.mail_from or ""
    return "" if mail_from == "<>" else mail_from


def _user(session: Session) -> str:
    if not session.authenticated:
        return ""
    return str(session.auth_data or "")


def _user_key(runtime: Runtime, user: str) -> str:
    """The user's own API key, or '' to use the global one."""
    return (runtime.authenticator.credentials.app_key(user) or "") if user else ""
