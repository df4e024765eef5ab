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
import ssl
import time
from asyncio import sslproto
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any, AnyStr, cast

import aiosmtpd.smtp
from aiosmtpd.proxy_protocol import V2_CMD, ProxyData, get_proxy
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, Session, TLSSetupException, syntax
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from . import history, replies
from .auth import Authenticator, AuthThrottle, Credentials
from .config import Config
from .delivery import DirectDelivery, IncomingMessage, RecipientOutcome, aggregate
from .logs import log_context, log_event
from .message import has_bare_line_end, is_valid_address, normalize_line_ends, parse_message
from .replies import Reply
from .rules import Envelope, Router
from .templating import ClientInfo
from .tls import server_context

__all__ = [
    "BridgeHandler",
    "BridgeLMTP",
    "BridgeSMTP",
    "ConnectionTracker",
    "Runtime",
    "new_queue_id",
]

log = logging.getLogger("smtp_bridge.smtp")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Parse in a worker thread above this size, so one big message does not
#: stall every other session on the loop.
PARSE_IN_THREAD_BYTES = 256 * 1024

#: How long a proxied connection may take to send its PROXY header (at most
#: smtp.timeout); a load balancer sends it at once.
PROXY_HEADER_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Runtime:
    """What one session works with; replaced as a whole on reload (SIGHUP)."""

    config: Config
    router: Router
    authenticator: Authenticator
    #: Built from smtp.tls at every (re)load: renewed certificates reach new sessions.
    tls_context: ssl.SSLContext | None = None

    @classmethod
    def build(cls, config: Config) -> Runtime:
        """Raises :class:`~smtp_bridge.tls.TlsError` when the certificate cannot be loaded."""
        credentials = Credentials.from_config(config.smtp.auth.users)
        tls = config.smtp.tls
        context = server_context(tls.cert, tls.key) if tls is not None else None
        return cls(config, Router(config.routes), Authenticator(credentials), context)

    def auth_offered(self, ip: IPAddress | None, tls: bool) -> bool:
        """AUTH is offered when users exist, and over TLS unless the network is trusted."""
        auth = self.config.smtp.auth
        if not auth.users:
            return False
        return tls or not auth.require_tls or self.is_trusted(ip)

    def is_trusted(self, ip: IPAddress | None) -> bool:
        return _in_networks(ip, self.config.smtp.trusted_networks)

    def is_proxy(self, ip: IPAddress | None) -> bool:
        """May ``ip`` send a PROXY header (``smtp.proxy_from``)?"""
        return _in_networks(ip, self.config.smtp.proxy_from)


def _in_networks(
    ip: IPAddress | None, nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    return ip is not None and any(ip.version == net.version and ip in net for net in nets)


def new_queue_id() -> str:
    """A short, time-ordered, unguessable id: what operators grep for."""
    return f"{int(time.time() * 1000):011X}{secrets.token_hex(3).upper()}"


def peer_ip(peer: Any) -> IPAddress | None:
    if isinstance(peer, tuple) and peer:
        try:
            return _unmapped(ipaddress.ip_address(str(peer[0]).split("%", 1)[0]))
        except ValueError:
            return None
    return None


def _unmapped(ip: IPAddress) -> IPAddress:
    # A dual-stack listener ("[::]:25") sees IPv4 clients as ::ffff:a.b.c.d;
    # trusted_networks, limits and routes are written with the IPv4 address.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ConnectionTracker:
    """Counts open sessions, in total and per client address.

    A session behind a PROXY-protocol load balancer counts in the total from
    its first byte, and per client address once its header names the client.
    """

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: Counter[IPAddress | None] = Counter()
        self.sessions: set[BridgeSMTP] = set()
        self._counted_as: dict[BridgeSMTP, IPAddress | None] = {}
        self._empty: asyncio.Event | None = None

    async def wait_empty(self) -> None:
        """Return once no session is open (shutdown drain)."""
        while self.total:
            self._empty = self._empty or asyncio.Event()
            await self._empty.wait()

    def admit(
        self, session: BridgeSMTP, ip: IPAddress | None, runtime: Runtime, *, per_ip: bool = True
    ) -> bool:
        """Count a new session; False when a limit is reached (answer 421 and close).

        ``per_ip=False``: the client's address is not known yet (PROXY protocol);
        :meth:`bind` counts it later.
        """
        if self.total >= runtime.config.smtp.max_connections:
            return False
        if per_ip and not self._ip_has_room(ip, runtime):
            return False
        self.total += 1
        self.sessions.add(session)
        if per_ip:
            self._count(session, ip)
        return True

    def bind(self, session: BridgeSMTP, ip: IPAddress | None, runtime: Runtime) -> bool:
        """Count an admitted session under ``ip``; False when that address is at its limit."""
        self._uncount(session)
        if not self._ip_has_room(ip, runtime):
            return False
        self._count(session, ip)
        return True

    def release(self, session: BridgeSMTP, ip: IPAddress | None = None) -> None:
        """Forget a session (idempotent); ``ip`` is ignored, kept for callers."""
        if session in self.sessions:
            self.sessions.discard(session)
            self.total -= 1
            self._uncount(session)
            if not self.total and self._empty is not None:
                self._empty.set()
                self._empty = None

    def _ip_has_room(self, ip: IPAddress | None, runtime: Runtime) -> bool:
        # Trusted networks skip the per-IP cap, as Postfix exempts mynetworks.
        smtp = runtime.config.smtp
        return runtime.is_trusted(ip) or self.per_ip[ip] < smtp.max_connections_per_ip

    def _count(self, session: BridgeSMTP, ip: IPAddress | None) -> None:
        self._counted_as[session] = ip
        self.per_ip[ip] += 1

    def _uncount(self, session: BridgeSMTP) -> None:
        if session in self._counted_as:
            ip = self._counted_as.pop(session)
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]


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
    "553 5.1.3 Error: malformed address": str(replies.MALFORMED_ADDRESS),
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

    def __init__(self, session_cls: type[BridgeSMTP], handler_cls: type) -> None:
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
        session: BridgeSMTP,
        handler: object,
        before: dict[str, Any],
        engine: dict[str, Any],
    ) -> _SessionTables | None:
        """The tables for ``session``'s pair, if they give what its stock set-up gave."""
        if (
            not hasattr(aiosmtpd.smtp, "_AuthMechAttr")
            or not all(hasattr(session, name) for name in _TABLE_ATTRS)
            or type(session).__dir__ is not BridgeSMTP.__dir__
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
        session: BridgeSMTP,
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


class BridgeSMTP(SMTP):
    """aiosmtpd's SMTP with our DATA reader, reply codes, TLS, PROXY and limits.

    TLS, STARTTLS or implicit, is an in-place upgrade of the session's
    transport with the context of the session's own :class:`Runtime`, so a
    reload (SIGHUP) with renewed certificates applies to new sessions, and an
    implicit-TLS listener can read a PROXY header before its handshake.
    """

    #: RFC 5321 4.5.3.1.1: a local part is at most 64 octets (aiosmtpd: no limit).
    local_part_limit = 64
    #: The word after the host name in the banner; no software version in it.
    banner_ident = "ESMTP"

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
        # aiosmtpd keeps these limits in a class-level dict that every session
        # clears and every EHLO grows; each session gets its own.
        self.command_size_limits = defaultdict(lambda: self.command_size_limit)
        offer_starttls = smtp.tls is not None and smtp.tls.starttls and not implicit_tls
        self._init_engine(
            handler,
            dict(
                data_size_limit=smtp.max_message_size,
                enable_SMTPUTF8=True,
                decode_data=False,
                hostname=smtp.hostname,
                ident=self.banner_ident,
                tls_context=runtime.tls_context if offer_starttls else None,
                timeout=smtp.timeout,
                # Reset floods: each command has a budget per session.
                command_call_limit={"NOOP": 50, "RSET": 50, "VRFY": 10, "HELP": 10, "*": 200},
                # TLS-before-AUTH is decided per client (trusted networks are
                # exempt), in smtp_AUTH below, not by aiosmtpd's global switch.
                auth_require_tls=False,
                authenticator=_authenticate,
                **kwargs,
            ),
        )
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
        #: Set by handle_DATA: lower-cased recipient -> its own reply (LMTP).
        self.rcpt_replies: dict[str, Reply] | None = None

    def _init_engine(self, handler: BridgeHandler, engine: dict[str, Any]) -> None:
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

    @property
    def tls_active(self) -> bool:
        """True once a TLS handshake (STARTTLS or implicit) has completed."""
        session = self.session
        return self._tls_protocol is not None and session is not None and session.ssl is not None

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
            log_event(
                log,
                "proxy_header_invalid",
                level=logging.WARNING,
                proxy=str(self.client_ip),
                reason="connection closed",
            )
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

    async def _handle_client(self) -> None:
        if self.runtime.config.smtp.proxy_protocol and not await self._read_proxy_header():
            self._close_with(None)
            return
        if self.implicit_tls and not await self._start_implicit_tls():
            return
        self._greeted = True
        await super()._handle_client()  # the banner, then the command loop

    def _close_with(self, reply: Reply | None) -> None:
        """Close the session, with ``reply`` first when the client can read one."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if reply is not None and self._greeted and not self._handshaking:
            self._writer.write(f"{reply}\r\n".encode())
        transport.close()

    def _drop(self) -> None:
        """Close a session whose TLS layer never came up (no connection_lost follows)."""
        if self.transport is not None:
            self.transport.close()
        if self._original_transport is not None:
            self._original_transport.close()
        self.connection_lost(None)

    # ------------------------------------------------------------ limits

    def _timeout_cb(self) -> None:
        if self.transport is None or self._lost:
            return
        if self._handling:  # the client waits for the API, it is not idle
            self._reset_timeout()
            return
        log_event(log, "idle_timeout", session=self.session_id, client=str(self.client_ip))
        self._close_with(replies.IDLE_TIMEOUT)

    def _session_expired(self) -> None:
        self._session_timer = None
        if self.transport is None or self._lost:
            return
        log_event(
            log,
            "session_time_limit",
            level=logging.WARNING,
            session=self.session_id,
            client=str(self.client_ip),
            limit=self.runtime.config.smtp.max_session_time,
        )
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
        self._reset_timeout(min(self._timeout_duration, PROXY_HEADER_TIMEOUT))
        proxy = self.client_ip
        data: ProxyData | None
        self._awaiting_proxy = True  # stays set if the connection ends meanwhile
        try:
            data = await get_proxy(self._reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            data = None
        self._awaiting_proxy = False
        if data is None or not data.valid:
            log_event(
                log,
                "proxy_header_invalid",
                level=logging.WARNING,
                proxy=str(proxy),
                reason=data.error if data is not None else "connection closed",
            )
            return False
        source = data.src_addr
        client = proxy  # LOCAL (health checks), UNKNOWN, unix sockets: the proxy itself
        if data.command != V2_CMD.LOCAL and isinstance(
            source, ipaddress.IPv4Address | ipaddress.IPv6Address
        ):
            client = _unmapped(source)
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
        self._reset_timeout()
        return True

    # ------------------------------------------------------------ TLS

    async def _start_implicit_tls(self) -> bool:
        """Implicit TLS (RFC 8314): the handshake comes before the banner."""
        context = self.runtime.tls_context
        raw = cast(asyncio.Transport, self.transport)
        if context is None:  # TLS removed from the config by a reload
            log_event(log, "tls_unavailable", level=logging.WARNING, session=self.session_id)
            self._close_with(None)
            return False
        waiter: asyncio.Future[None] = self.loop.create_future()
        tls = sslproto.SSLProtocol(self.loop, self, context, waiter, server_side=True)
        # What the client has sent already (its ClientHello, maybe right behind
        # the PROXY header) belongs to the TLS layer, not to the SMTP reader.
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
        return await self._await_handshake(waiter)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:
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
        if self._tls_protocol is not None:  # None: a syntax error was answered
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
        log_event(
            log,
            "tls",
            session=self.session_id,
            client=str(self.client_ip),
            implicit=self.implicit_tls,
            version=ssl_object.version() if ssl_object is not None else None,
            cipher=cipher[0] if cipher else None,
        )

    def _tls_failed(self, error: BaseException | None) -> None:
        # A client's failed handshake is not the bridge's error: a warning, no traceback.
        reason = "connection closed"
        if isinstance(error, ssl.SSLError):
            reason = error.reason or "handshake failed"
        elif error is not None:
            reason = type(error).__name__
        log_event(
            log,
            "tls_failed",
            level=logging.WARNING,
            session=self.session_id,
            client=str(self.client_ip),
            reason=reason,
        )
        self._drop()

    # ------------------------------------------------------------ replies

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            if not self._raw_replies:
                status = _with_enhanced_code(status)
            # aiosmtpd echoes some arguments ("502 Could not VRFY <arg>"), decoded
            # with surrogateescape from whatever bytes the client sent; strict
            # UTF-8 would turn them into an internal error (found by test_fuzz).
            await super().push(status.encode("utf-8", "backslashreplace"))
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
        runtime = self.runtime
        if not runtime.config.smtp.auth.users:
            await self.push(str(replies.AUTH_NOT_AVAILABLE))
            return
        if not runtime.auth_offered(self.client_ip, self.tls_active):
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
            await self.push(str(self._closing_reply))
            self.transport.close()

    async def _read_and_handle_data(self) -> None:
        assert self.envelope is not None
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        received = await self._read_data()
        if received is None:
            return
        data, too_big = received
        limit = self.data_size_limit
        # Every reply to DATA carries the queue id (DESIGN 5), refusals too.
        self.queue_id = new_queue_id()
        rcpts = list(self.envelope.rcpt_tos)
        self.rcpt_replies = None
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
            await self._push_data_replies(replies.TOO_LARGE.with_id(self.queue_id), rcpts)
            return
        self.envelope.content = bytes(data)
        self.envelope.original_content = self.envelope.content
        data.clear()
        self._reset_timeout()
        self._handling = True
        try:
            # The session, client and queue id on every event of this message,
            # the delivery task's api_call lines included (logs.log_context).
            with log_context(
                session=self.session_id, client=str(self.client_ip), queue_id=self.queue_id
            ):
                status = await self._call_handler_hook("DATA")
        except Exception:
            # Never the exception's class or text in a reply; the log has it.
            log.exception("internal error", extra={"bridge_fields": {"queue_id": self.queue_id}})
            status = replies.INTERNAL.with_id(self.queue_id)
            self.rcpt_replies = None
        finally:
            self._handling = False
            # The end of data consumes the transaction whatever its outcome, also
            # when the hook raised (451 via handle_exception): RFC 5321 4.1.1.4.
            self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self._push_data_replies(status, rcpts)

    async def _read_data(self) -> tuple[bytearray, bool] | None:
        """The message up to CRLF.CRLF, dot-unstuffed, and whether it is over
        data_size_limit (then read to its end but not kept); None when the
        connection ends first.

        Line by line, except that the complete lines the reader holds already
        behind a line start are taken in one piece (:func:`_buffered_lines`):
        the line-by-line loop would take them too without waiting, one await,
        time check and copy each. Same message, same end, same bytes left in
        the reader (tests/test_session_setup.py compares the two readers).
        """
        reader = self._reader
        clock = self.loop.time
        limit = self.data_size_limit
        data = bytearray()
        too_big = False
        at_line_start = True
        last_reset = clock()
        while self.transport is not None:
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
            if now - last_reset > 1.0:  # a slow upload is not an idle client
                self._reset_timeout()
                last_reset = now
            if not lines:
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
            return None
        return data, too_big

    async def _push_data_replies(self, status: str, rcpts: list[str]) -> None:
        """SMTP: one reply for the message (LMTP overrides: one per recipient)."""
        await self.push(status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's MAIL/RCPT address parser, the same answers without its cost.

        aiosmtpd 1.4 defines a ``typing.Protocol`` class inside ``_getaddr`` on
        every call: two thirds of the call's time, a fifth of a bare server's CPU
        (bench/README.md). Same parsing (the stdlib's RFC 5322 tokenizer), same
        ``local_part_limit`` check, same (None, None) for unparsable input.
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
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, rest


def _buffered_lines(reader: asyncio.StreamReader) -> int:
    """How many bytes of complete lines ``reader`` holds, at a line start, up to
    the end-of-data line (excluded); 0 for none, or when that line comes first.

    Peeks at the reader's buffer, as asyncio's own ``readuntil`` keeps it; a
    reader without one gets 0: line by line, as before.
    """
    buffer = getattr(reader, "_buffer", None)
    if not isinstance(buffer, bytearray) or buffer.startswith(b".\r\n"):
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


class BridgeLMTP(BridgeSMTP):
    """LMTP (RFC 2033), for Postfix's ``lmtp`` transport: LHLO instead of
    HELO/EHLO, and after DATA one reply per accepted recipient, in RCPT order,
    each the DESIGN 5 reply of that recipient's own API result."""

    banner_ident = "LMTP"

    @syntax("LHLO hostname")
    async def smtp_LHLO(self, hostname: str) -> None:
        await self._ehlo(hostname, "LHLO")

    async def smtp_EHLO(self, hostname: str) -> None:
        # RFC 2033 4.1: an LMTP server must not accept HELO or EHLO.
        await self.push('500 5.5.1 Command "EHLO" not recognized, use LHLO')

    async def smtp_HELO(self, hostname: str) -> None:
        await self.push('500 5.5.1 Command "HELO" not recognized, use LHLO')

    async def check_helo_needed(self, helo: str = "HELO") -> bool:
        return await super().check_helo_needed("LHLO")

    async def _push_data_replies(self, status: str, rcpts: list[str]) -> None:
        # handle_DATA leaves rcpt_replies when each recipient has its own truthful
        # answer (direct mode); otherwise the message's reply stands for every
        # recipient (refusals of the whole message, spooled mail).
        own = self.rcpt_replies or {}
        for rcpt in rcpts:
            reply = own.get(rcpt.lower())
            await self.push(reply.with_id(self.queue_id) if reply is not None else status)


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
        # Direct mode with the API's breaker open: the 4xx that opened it, now,
        # without reading the message or calling the API (DESIGN 5).
        held = self.delivery.blocked(runtime.config, _user_key(runtime, _user(session)))
        if held is not None:
            log_event(
                log,
                "breaker_refused",
                level=logging.WARNING,
                session=server.session_id,
                client=str(server.client_ip),
                reply=str(held),
            )
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
        decision = runtime.router.at_rcpt(
            Envelope(_sender(envelope), address, user, server.client_ip)
        )
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
            self.delivery.deliver(
                message,
                runtime.config,
                runtime.router,
                # LMTP tells each recipient its own outcome: no dead letters for 5xx.
                per_recipient=isinstance(server, BridgeLMTP),
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
