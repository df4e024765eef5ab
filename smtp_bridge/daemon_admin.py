"""The daemon's admin endpoint: where it listens, and what it asks of the daemon.

:class:`AdminEndpoint` runs admin.py's :class:`~.admin.AdminServer` on
``admin.listen`` or on a socket systemd passed, and moves it when a reload
changes ``admin.listen``. The server knows nothing of the daemon: it gets the
/readyz checks (:class:`Readiness`), the /metrics refresh, the console's sources
and the token from :func:`admin_server`, each asked at every request, so a
reload, a store that opens late or a shutdown shows at once.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .admin import AdminServer, ReadinessCheck
from .config import Config
from .console import BreakerView, ConsoleSources
from .errors import StartupError
from .listeners import cannot_listen
from .logs import log_event

if TYPE_CHECKING:
    from .delivery import Delivery
    from .history import HistoryRecorder
    from .listeners import Listeners
    from .metrics import Metrics
    from .sandbox import Sandbox
    from .smtp import ConnectionTracker, Runtime
    from .store.deferred import DeferredStore
    from .worker import QueueWorker

__all__ = ["AdminEndpoint", "AdminMove", "Daemon", "Readiness", "admin_server"]

log = logging.getLogger("smtp_bridge.service")


class Daemon(Protocol):
    """What these read of the running daemon (:class:`~smtp_bridge.service.BridgeService`)."""

    runtime: Runtime
    metrics: Metrics
    tracker: ConnectionTracker
    listeners: Listeners
    store: DeferredStore | None
    delivery: Delivery | None
    worker: QueueWorker | None
    sandbox: Sandbox | None
    history: HistoryRecorder | None

    @property
    def stopping(self) -> bool: ...

    def breaker_is_open(self) -> bool: ...


class Readiness:
    """/readyz's checks of ``daemon``: each None when fine, else what is wrong."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def checks(self) -> dict[str, ReadinessCheck]:
        return {
            "listening": self.listening,
            "store": self.store,
            "connections": self.connections,
            "breaker": self.breaker,
        }

    async def listening(self) -> str | None:
        if self.daemon.stopping:
            return "shutting down"
        return None if self.daemon.listeners.is_serving() else "not listening"

    async def store(self) -> str | None:
        store = self.daemon.store
        if store is None or not store.is_open:
            return "not open"
        return None if await store.check_writable() else "not writable"

    async def connections(self) -> str | None:
        # Every new connection would get 421: send the mail elsewhere.
        full = self.daemon.tracker.total >= self.daemon.runtime.config.smtp.max_connections
        return "full" if full else None

    async def breaker(self) -> str | None:
        return "open" if self.daemon.breaker_is_open() else None


def admin_server(daemon: Daemon) -> AdminServer:
    """The admin endpoint of ``daemon``, not yet listening (:meth:`AdminServer.start`)."""

    async def refresh_metrics() -> None:
        # Queue depth and age, dead letters and breaker state, fresh for each scrape
        # (the worker also refreshes them on its own schedule).
        worker, store = daemon.worker, daemon.store
        if worker is not None and store is not None and store.is_open:
            await worker.refresh_gauges()

    def breaker_views() -> list[BreakerView]:
        if daemon.delivery is None:
            return []
        gate = daemon.delivery.gate
        now = gate.clock()
        return [
            BreakerView(key, breaker.state.value, breaker.retry_in(now))
            for key, breaker in gate.breakers.by_key()
        ]

    def token() -> str | None:
        secret = daemon.runtime.config.admin.token
        return secret.get_secret_value() if secret is not None else None

    # Queue and hybrid mode spool while the breaker is open: still ready (docs/cli.md).
    delivery = daemon.delivery
    mode = delivery.mode if delivery else daemon.runtime.config.delivery.mode
    return AdminServer(
        daemon.metrics,
        checks=Readiness(daemon).checks(),
        refresh=refresh_metrics,
        advisory=() if mode == "direct" else ("breaker",),
        console=ConsoleSources(
            store=lambda: daemon.store,
            config=lambda: daemon.runtime.config,
            breakers=breaker_views,
            sandbox=lambda: daemon.sandbox,
            history_failures=lambda: daemon.history.failures if daemon.history else 0,
        ),
        token=token,
    )


@dataclass(frozen=True, slots=True)
class AdminMove:
    """A reload's new ``admin.listen``: the server bound there already (None: no
    endpoint any more); :meth:`AdminEndpoint.apply` makes it the endpoint."""

    server: AdminServer | None


class AdminEndpoint:
    """The admin endpoint of ``daemon``, if ``admin.listen`` (or systemd) asks for one."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._server: AdminServer | None = None
        #: The socket came from socket activation: a reload leaves it be.
        self._activated = False

    @property
    def address(self) -> str | None:
        """The bound ``host:port``, None when there is no endpoint."""
        return self._server.address if self._server is not None else None

    async def open(self, config: Config, sock: socket.socket | None) -> None:
        """Listen on ``sock`` (socket activation), else on ``admin.listen`` if set.
        StartupError if it cannot bind."""
        if sock is not None:
            self._activated = True
            self._server = await self._start(None, sock=sock)
        elif config.admin.listen is not None:
            try:
                self._server = await self._start(config.admin.listen)
            except OSError as exc:
                where = f"{config.admin.listen} (admin.listen)"
                raise StartupError(cannot_listen(where, exc)) from None

    async def bind_move(self, old: Config, new: Config) -> AdminMove | None:
        """A reload from ``old`` to ``new``: the endpoint bound at a changed
        ``admin.listen`` (None: unchanged). StartupError if it cannot bind."""
        if self._activated or new.admin.listen == old.admin.listen:
            return None
        if new.admin.listen is None:
            return AdminMove(None)
        try:
            return AdminMove(await self._start(new.admin.listen))
        except OSError as exc:
            raise StartupError(cannot_listen(new.admin.listen, exc)) from None

    async def apply(self, move: AdminMove | None) -> None:
        """Make the reload's endpoint current; the old one closes."""
        if move is None:
            return
        old, self._server = self._server, move.server
        if old is not None:
            await old.stop()
            log_event(log, "admin_closed", address=old.address)

    async def close(self) -> None:
        """Shutdown: stop answering."""
        if self._server is not None:
            await self._server.stop()

    async def _start(self, listen: str | None, *, sock: socket.socket | None = None) -> AdminServer:
        server = admin_server(self._daemon)
        address = await server.start(listen, sock=sock)
        log_event(log, "admin_listening", address=address)
        return server
