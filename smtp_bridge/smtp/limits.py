"""Connection limits: open sessions counted in total and per client address."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Protocol

from .runtime import IPAddress, Runtime

__all__ = ["ConnectionTracker", "Session", "command_limits"]


class Session(Protocol):
    """What the tracker and the shutdown need of a session."""

    def close_when_idle(self) -> None: ...

    def abort(self) -> None: ...


class ConnectionTracker:
    """Counts open sessions, in total and per client address.

    A session behind a PROXY-protocol load balancer counts in the total from
    its first byte, and per client address once its header names the client.
    """

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: Counter[IPAddress | None] = Counter()
        self.sessions: set[Session] = set()
        self._counted_as: dict[Session, IPAddress | None] = {}
        self._empty: asyncio.Event | None = None

    async def wait_empty(self) -> None:
        """Return once no session is open (shutdown drain)."""
        while self.total:
            self._empty = self._empty or asyncio.Event()
            await self._empty.wait()

    def admit(
        self, session: Session, ip: IPAddress | None, runtime: Runtime, *, per_ip: bool = True
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

    def bind(self, session: Session, ip: IPAddress | None, runtime: Runtime) -> bool:
        """Count an admitted session under ``ip``; False when that address is at its limit."""
        self._uncount(session)
        if not self._ip_has_room(ip, runtime):
            return False
        self._count(session, ip)
        return True

    def release(self, session: Session, ip: IPAddress | None = None) -> None:
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

    def _count(self, session: Session, ip: IPAddress | None) -> None:
        self._counted_as[session] = ip
        self.per_ip[ip] += 1

    def _uncount(self, session: Session) -> None:
        if session in self._counted_as:
            ip = self._counted_as.pop(session)
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]


#: Commands no mail client gives once per message: a small budget per session.
_RARE_COMMANDS = {"VRFY": 10, "HELP": 10}


def command_limits(max_commands: int, max_recipients: int) -> dict[str, int]:
    """aiosmtpd's ``command_call_limit`` for ``smtp.max_commands_per_session``:
    each command that many times per session, RCPT that many times
    ``max_recipients``, VRFY and HELP 10. Past it: 421 4.7.0 and the close.

    MAIL, DATA, RSET and NOOP come once per message (PHPMailer's keep-alive
    sends RSET after each one, JavaMail a NOOP before reusing a connection),
    so the budget is the number of messages one connection may carry.
    """
    return {**_RARE_COMMANDS, "RCPT": max_commands * max_recipients, "*": max_commands}
