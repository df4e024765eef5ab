"""The SMTP listeners: one server per ``smtp.listen`` entry and per
``smtp.tls.implicit_listen`` one, or the sockets systemd passed.

Each is keyed by the entry that made it (socket activation: by its bound
address), so a reload opens what a new config adds and closes what it drops;
the sessions a closed listener accepted carry on. Implicit TLS listeners are
plain TCP: each session does its own handshake with the certificate of the
runtime it starts with (so a reload renews it, and a PROXY header can come
before it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Protocol

from .admin import format_address
from .config import Config, split_host_port
from .errors import StartupError
from .logs import log_event
from .sockets import ipv6_only, is_ipv6_wildcard, listen_socket, takes_ipv4

__all__ = [
    "IMPLICIT_TLS_KEY",
    "ListenerChange",
    "Listeners",
    "SessionFactory",
    "cannot_listen",
    "listen_plan",
]

log = logging.getLogger("smtp_bridge.service")

#: Listener keys of ``smtp.tls.implicit_listen`` entries (plain ones: the entry).
IMPLICIT_TLS_KEY = "tls:"


class SessionFactory(Protocol):
    """Makes the session of a new connection (``implicit_tls``: the listener's)."""

    def __call__(self, implicit_tls: bool = False) -> asyncio.Protocol: ...


def listen_plan(config: Config) -> dict[str, bool]:
    """The SMTP listeners ``config`` asks for: key -> implicit TLS. Keys are the
    ``listen`` entries, and ``tls:`` + the ``tls.implicit_listen`` ones."""
    plan = dict.fromkeys(config.smtp.listen, False)
    if config.smtp.tls is not None:
        implicit = (IMPLICIT_TLS_KEY + a for a in config.smtp.tls.implicit_listen)
        plan.update(dict.fromkeys(implicit, True))
    return plan


def cannot_listen(where: str, exc: OSError) -> str:
    """``cannot listen on <where>: <reason>``, the reason in the system's words
    ("Address already in use"), not asyncio's text around them."""
    return f"cannot listen on {where}: {os.strerror(exc.errno) if exc.errno else exc}"


@dataclass
class ListenerChange:
    """What a reload does to the listeners: the new ones bound already, the keys
    of those to close; nothing changes until :meth:`Listeners.apply`."""

    opened: dict[str, asyncio.Server] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)

    def discard(self) -> None:
        """The reload is refused: close what was bound for it."""
        for server in self.opened.values():
            server.close()


class Listeners:
    """The SMTP servers by key; their bound addresses in listener order."""

    def __init__(self, *, reuse_port: bool = False) -> None:
        #: ``serve --workers``: every worker binds the same addresses (SO_REUSEPORT).
        self.reuse_port = reuse_port
        #: Bound SMTP addresses, in listener order (tests read the first).
        self.addresses: list[tuple[str, int]] = []
        #: systemd passed the sockets: ``smtp.listen`` is not used, a reload opens nothing.
        self.activated = False
        self._factory: SessionFactory | None = None
        self._servers: dict[str, asyncio.Server] = {}
        #: Listeners a reload closed: sessions they accepted may still run.
        self._retired: list[asyncio.Server] = []

    async def open(
        self, config: Config, factory: SessionFactory, passed: list[socket.socket] | None
    ) -> None:
        """Start listening: on the sockets systemd ``passed`` (socket activation,
        None without it), else as ``config`` plans. StartupError if one cannot bind."""
        self._factory = factory
        if passed is not None:
            self.activated = True
            loop = asyncio.get_running_loop()
            for sock in passed:
                server = await loop.create_server(factory, sock=sock, start_serving=True)
                self._add(format_address(sock.getsockname()), server, activated=True)
            return
        for listen, implicit_tls in listen_plan(config).items():
            try:
                server = await self._create_server(listen, implicit_tls, config)
            except OSError as exc:
                raise StartupError(cannot_listen(listen, exc)) from None
            self._add(listen, server)

    async def bind_changes(self, config: Config) -> ListenerChange:
        """Bind the listeners ``config`` adds and name those it drops, changing nothing
        yet. StartupError (what was bound closed again) if one cannot bind."""
        if self.activated:
            return ListenerChange()
        plan = listen_plan(config)
        change = ListenerChange(removed=[key for key in self._servers if key not in plan])
        for listen, implicit_tls in plan.items():
            if listen in self._servers:
                continue
            try:
                change.opened[listen] = await self._create_server(listen, implicit_tls, config)
            except OSError as exc:
                change.discard()
                raise StartupError(cannot_listen(listen, exc)) from None
        return change

    def apply(self, change: ListenerChange) -> None:
        """Commit a reload's change: its new listeners in, the dropped ones closed."""
        for listen, server in change.opened.items():
            self._add(listen, server)
        for listen in change.removed:
            self._close(listen)

    def is_serving(self) -> bool:
        """At least one listener, and every one accepting."""
        return bool(self._servers) and all(s.is_serving() for s in self._servers.values())

    @property
    def implicit_tls_addresses(self) -> list[tuple[str, int]]:
        """Bound addresses of the implicit TLS listeners (``smtp.tls.implicit_listen``)."""
        return [
            (sock.getsockname()[0], sock.getsockname()[1])
            for key, server in self._servers.items()
            if key.startswith(IMPLICIT_TLS_KEY)
            for sock in server.sockets
        ]

    def close(self) -> None:
        """Stop accepting everywhere (shutdown); the sessions carry on."""
        for server in self._all():
            server.close()

    async def wait_closed(self) -> None:
        """Until every session of every listener, retired ones too, has ended."""
        for server in self._all():
            await server.wait_closed()

    def _all(self) -> list[asyncio.Server]:
        return [*self._servers.values(), *self._retired]

    async def _create_server(
        self, listen: str, implicit_tls: bool, config: Config
    ) -> asyncio.Server:
        assert self._factory is not None
        host, port = split_host_port(listen.removeprefix(IMPLICIT_TLS_KEY))
        factory = functools.partial(self._factory, implicit_tls)
        loop = asyncio.get_running_loop()
        if is_ipv6_wildcard(host):  # [::]: IPv4 too, unless told otherwise (sockets.py)
            plain = [k.removeprefix(IMPLICIT_TLS_KEY) for k in listen_plan(config)]
            v6only = ipv6_only(port, config.smtp.dual_stack, plain)
            sock = listen_socket(host, port, v6only=v6only, reuse_port=self.reuse_port)
            return await loop.create_server(factory, sock=sock, start_serving=True)
        return await loop.create_server(
            factory,
            host or None,
            port,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
            start_serving=True,
        )

    def _add(self, key: str, server: asyncio.Server, *, activated: bool = False) -> None:
        self._servers[key] = server
        for sock in server.sockets:
            address = sock.getsockname()
            self.addresses.append((address[0], address[1]))
            fields: dict[str, Any] = {"activated": True} if activated else {}
            if sock.family == socket.AF_INET6:  # what it truly takes: [::] may take IPv4 too
                fields["ipv4"] = takes_ipv4(sock)
            log_event(log, "listening", address=format_address(address), **fields)

    def _close(self, key: str) -> None:
        """Stop accepting on ``key``; the sessions it accepted carry on."""
        server = self._servers.pop(key)
        for sock in server.sockets:  # empty once closed
            address = sock.getsockname()
            with contextlib.suppress(ValueError):
                self.addresses.remove((address[0], address[1]))
        server.close()
        self._retired.append(server)
        log_event(log, "listener_closed", listen=key)
