"""The daemon's composition and lifecycle: startup -> serve -> shutdown, reload.

:class:`BridgeService` is the one place that wires the daemon together: the
store, the API client, delivery, the spool workers, the SMTP handler and
listeners (listeners.py), the admin endpoint (daemon_admin.py) and the sandbox
of ``serve --sandbox``; every part it holds is declared in ``__init__``.

One event loop carries them all (no threaded Controller), so a session, its API
calls and its ledger writes never cross threads except into the store's own
writer thread. systemd (systemd.py) hears READY=1 once every listener is up,
RELOADING=1 around a SIGHUP reload, STOPPING=1 on SIGTERM, and WATCHDOG=1 from
the event loop; listening sockets may come from socket activation.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Literal, cast

from . import history
from .admin import format_address
from .api import ApiClient
from .config import Config
from .daemon_admin import AdminEndpoint
from .delivery import Delivery
from .errors import StartupError
from .fdlimit import ensure_fd_limit, fd_plan
from .heap import settle_heap
from .history import HistoryRecorder
from .listeners import Listeners
from .logs import log_event, register_secrets, unregister_secrets
from .metrics import Metrics
from .policy import RecipientOutcome
from .reload import load_new, warn_restart_needed
from .sandbox import Sandbox
from .sandbox_mode import greet, start_sandbox, with_sandbox
from .smtp import BridgeHandler, BridgeLMTP, BridgeSMTP, ConnectionTracker, Runtime
from .store import store_secrets
from .store.deferred import DeferredStore
from .store.history import History
from .store_start import start_store
from .systemd import (
    ADMIN_FD_NAME,
    handle_signals,
    listen_fds,
    notify_reloading,
    sd_notify,
    start_watchdog,
    unhandle_signals,
)
from .worker import QueueWorker

# settle_heap: ``serve`` (cli.py) takes it from here.
__all__ = ["BridgeService", "StartupError", "settle_heap"]

log = logging.getLogger("smtp_bridge.service")


def _config_secrets(config: Config) -> list[str]:
    """Every secret value in ``config``: scrubbed from log lines if one ever slips in."""
    found = [config.app_key()]
    for user in config.smtp.auth.users.values():
        found.append(user.password_hash.get_secret_value())
        if user.app_key is not None:
            found.append(user.app_key.get_secret_value())
    if config.admin.token is not None:
        found.append(config.admin.token.get_secret_value())
    found += store_secrets(config.delivery)
    return [s for s in found if s]


class BridgeService:
    """Owns the listeners, the API client, the store and the sandbox if any."""

    #: ``serve --workers`` (supervisor.py): every worker binds the same addresses
    #: with SO_REUSEPORT and the kernel spreads connections across them.
    reuse_port = False

    def __init__(
        self, config: Config, *, config_path: Path | None = None, sandbox: bool = False
    ) -> None:
        self.config_path = config_path
        self.use_sandbox = sandbox
        self.sandbox: Sandbox | None = None
        #: What new sessions work with; a reload replaces it as a whole.
        self.runtime = Runtime.build(self._with_sandbox(config))
        self.tracker = ConnectionTracker()
        self.metrics = Metrics()
        self.listeners = Listeners(reuse_port=self.reuse_port)
        self.admin = AdminEndpoint(self)
        self.handler: BridgeHandler | None = None
        #: The console's history recorder (None before startup or without a History store).
        self.history: HistoryRecorder | None = None
        # The parts startup makes (None before it): the state store, the API client
        # (a reload may replace it), the delivery every session and the spool's
        # queue worker go through.
        self.store: DeferredStore | None = None
        self.api: ApiClient | None = None
        self.delivery: Delivery | None = None
        self.worker: QueueWorker | None = None
        self._deliveries: set[asyncio.Task[list[RecipientOutcome]]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._secrets: list[str] = []
        self._stop = asyncio.Event()
        self._stopping = False
        self._ready = False
        self._reload_pending = False
        self._reload_lock = asyncio.Lock()
        self._signals_installed = False

    # ------------------------------------------------------------ phases

    async def startup(self) -> None:
        self._watchdog = start_watchdog()
        if self._watchdog is not None:
            await asyncio.sleep(0)  # the first ping out now, before the store is opened
        config = self.runtime.config
        self._check_fd_limit(config)
        self._secrets = register_secrets(_config_secrets(config))
        if self.use_sandbox:
            self.sandbox = await start_sandbox()
            config = self._with_sandbox(config)
            self.runtime = Runtime.build(config)
        store = self.store = await start_store(config)
        self.api = _api_client(config)
        delivery = self.delivery = Delivery(
            self.api, store, self.metrics, mode=config.delivery.mode
        )
        # Workers run in every mode: mail spooled before a change of mode still goes out.
        worker = self.worker = QueueWorker(
            delivery.gate,
            store,
            lambda: self.runtime,
            mode=config.delivery.mode,
            flow=delivery.flow,
            metrics=self.metrics,
        )
        delivery.on_spooled = worker.wake
        if store.is_open:
            self._store_opened()
        else:
            store.on_open = self._store_opened  # when the store opens by itself
        handler = self.handler = BridgeHandler(delivery, self._track)
        handler.quota_store = store
        loop = asyncio.get_running_loop()

        def new_session(implicit_tls: bool = False) -> BridgeSMTP:
            # Each connection takes the runtime current when it arrives, so a
            # reload applies to new sessions (protocol, TLS certificate, limits)
            # and in-flight ones keep theirs.
            runtime = self.runtime
            protocol = BridgeLMTP if runtime.config.smtp.protocol == "lmtp" else BridgeSMTP
            return protocol(handler, runtime, self.tracker, implicit_tls=implicit_tls, loop=loop)

        admin_sock: socket.socket | None = None
        smtp_socks: list[socket.socket] = []
        passed = listen_fds()
        for name, sock in passed:
            if name == ADMIN_FD_NAME:
                admin_sock = sock
            else:
                smtp_socks.append(sock)
        # Socket activation: the socket unit owns the addresses; smtp.listen is not used.
        await self.listeners.open(config, new_session, smtp_socks if passed else None)
        await self.admin.open(config, admin_sock)
        self._ready = True
        if self.use_sandbox:
            greet(self.listeners.addresses, self.admin.address)
        sd_notify(f"READY=1\nSTATUS={self._status()}")
        if self._reload_pending:  # SIGHUP during startup: the file may have changed
            self._spawn(self.reload())

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT; SIGHUP reloads the config."""
        installed = self._install_signal_handlers()
        try:
            await self._stop.wait()
        finally:
            if installed:
                self._remove_signal_handlers()

    def _install_signal_handlers(self) -> bool:
        """SIGTERM/SIGINT stop, SIGHUP reloads; False if they were installed already."""
        if self._signals_installed:
            return False
        handle_signals(asyncio.get_running_loop(), stop=self._stop.set, reload=self._on_sighup)
        self._signals_installed = True
        return True

    def _remove_signal_handlers(self) -> None:
        unhandle_signals(asyncio.get_running_loop())
        self._signals_installed = False

    def stop(self) -> None:
        self._stop.set()

    async def shutdown(self) -> None:
        """Stop accepting, let sessions finish within the grace period, then close."""
        sd_notify("STOPPING=1\nSTATUS=stopping: finishing sessions in progress")
        log_event(log, "stopping", sessions=self.tracker.total, deliveries=len(self._deliveries))
        async with self._reload_lock:  # a reload in progress finishes first
            self._stopping = True
        self.listeners.close()
        for session in list(self.tracker.sessions):
            session.close_when_idle()
        grace = self.runtime.config.smtp.shutdown_timeout
        # Workers claim nothing more; calls in flight finish within the grace period.
        worker = self.worker
        worker_stopped = asyncio.ensure_future(worker.stop(grace)) if worker is not None else None
        try:
            await asyncio.wait_for(self.tracker.wait_empty(), grace)
        except TimeoutError:
            log_event(
                log, "shutdown_grace_expired", level=logging.WARNING, sessions=self.tracker.total
            )
            for session in list(self.tracker.sessions):
                session.abort()
        # API calls already sent finish and are recorded (bounded by api.timeout).
        if self._deliveries:
            await asyncio.wait(list(self._deliveries))
        if worker_stopped is not None:
            await worker_stopped
        await self.listeners.wait_closed()
        if self._tasks:  # API clients replaced by a reload, closing once idle
            await asyncio.wait(list(self._tasks))
        await self.admin.close()
        if self.delivery is not None:
            await self.delivery.close()  # outcome writes still failing: a last try each
        if self.api is not None:
            await self.api.aclose()
        if self.history is not None:
            history.uninstall(self.history)
            await self.history.close()
        if self.store is not None:
            await self.store.close()
        if self.sandbox is not None:
            await self.sandbox.stop()
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        log_event(log, "stopped")
        unregister_secrets(self._secrets)
        self._secrets = []

    async def run(self) -> None:
        # The handlers go in before startup: systemd may send SIGHUP the moment
        # READY=1 arrives, and SIGHUP's default action would end the process.
        self._install_signal_handlers()
        try:
            # shutdown() also after a failed startup: it closes whatever startup
            # had opened (sandbox, store, API client, listeners bound so far).
            try:
                await self.startup()
                await self.serve()
            finally:
                await self.shutdown()
        finally:
            self._remove_signal_handlers()

    # ------------------------------------------------------------ reload

    def _on_sighup(self) -> None:
        if not self._ready:
            self._reload_pending = True  # reloaded once startup is done
            return
        self._spawn(self.reload())

    async def reload(self) -> bool:
        """SIGHUP: take the config file again if it is valid in full; True if taken.

        A bad config (or a new listen address that cannot be bound) is refused
        with its errors logged, and the running one is kept untouched. A good
        one applies to sessions that start after it; sessions in progress finish
        on the config they started with.
        """
        async with self._reload_lock:
            if self._stopping:
                return False
            notify_reloading()
            ok = False
            try:
                ok = await self._reload()
            finally:
                self.metrics.config_reloads.labels(result="ok" if ok else "refused").inc()
                self.metrics.config_last_reload_ok.set(1 if ok else 0)
                sd_notify(f"READY=1\nSTATUS={self._status()}")
            return ok

    async def _reload(self) -> bool:
        loaded = load_new(self.config_path, self._with_sandbox)
        if isinstance(loaded, list):
            return self._refuse(loaded)
        config, runtime = loaded
        old = self.runtime.config
        # Bind what is new before changing anything: a port that cannot be
        # bound refuses the reload as a whole.
        try:
            self._check_fd_limit(config)
            change = await self.listeners.bind_changes(config)
        except StartupError as exc:
            return self._refuse([str(exc)])
        try:
            admin_move = await self.admin.bind_move(old, config)
        except StartupError as exc:
            change.discard()
            return self._refuse([str(exc)])

        # Commit: from here on nothing can fail the reload.
        self.runtime = runtime
        if self.history is not None:
            self.history.retention = config.admin.history  # the next trim keeps to it
        previous_secrets, self._secrets = self._secrets, register_secrets(_config_secrets(config))
        unregister_secrets(previous_secrets)
        self.listeners.apply(change)
        await self.admin.apply(admin_move)
        api_rebuilt = self.api is not None and self.api.settings != _api_settings(config)
        if api_rebuilt and self.api is not None and self.delivery is not None:
            previous, self.api = self.api, _api_client(config)
            self.delivery.api = self.api
            # Calls already on the old client finish there (each bounded by api.timeout).
            self._spawn(previous.aclose_when_idle())
        warn_restart_needed(old, config)
        log_event(
            log,
            "reloaded",
            routes=len(config.routes),
            listeners_added=list(change.opened),
            listeners_removed=change.removed,
            api_client="rebuilt" if api_rebuilt else "kept",
        )
        if gc.get_freeze_count():
            settle_heap()
        return True

    def _store_opened(self) -> None:
        """The store is open (at start, or later by itself): the spool workers and
        the console's history recorder start."""
        if self.worker is not None:
            # Mail spooled by another instance (PostgreSQL's NOTIFY) wakes ours too.
            if self.store is not None:
                self.store.on_spooled(self.worker.wake)
            self.worker.start()
        real = self.store.real if self.store is not None else None
        if isinstance(real, History) and self.history is None:
            config = self.runtime.config
            self.history = HistoryRecorder(
                # Through the proxy, which delegates History to the real store.
                cast(History, self.store),
                retention=config.admin.history,
                encoding=lambda: self.runtime.config.api.encoding,
            )
            history.install(self.history)
            self.history.start()

    def _check_fd_limit(self, config: Config) -> None:
        """RLIMIT_NOFILE covers ``config`` (raised if need be), or StartupError."""
        plan = fd_plan(config)
        raised = ensure_fd_limit(plan)
        if raised is not None:
            log_event(log, "fd_limit_raised", old=raised[0], new=raised[1], need=plan.total)

    def _refuse(self, errors: list[str]) -> bool:
        log_event(log, "reload_refused", level=logging.ERROR, errors=errors)
        return False

    def _status(self) -> str:
        """systemd's STATUS= line: what ``systemctl status`` shows."""
        where = ", ".join(format_address(a) for a in self.listeners.addresses) or "nothing"
        return f"accepting mail on {where}; {len(self.runtime.config.routes)} routes"

    # ------------------------------------------------------------ state

    @property
    def admin_address(self) -> str | None:
        """The admin endpoint's bound ``host:port``, None when disabled."""
        return self.admin.address

    @property
    def stopping(self) -> bool:
        """SIGTERM came, or shutdown has begun."""
        return self._stopping or self._stop.is_set()

    def breaker_is_open(self) -> bool:
        """True while the API circuit breaker of any key is open or probing (docs/replies.md)."""
        return self.delivery is not None and self.delivery.gate.is_open()

    # ------------------------------------------------------------ helpers

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    def _with_sandbox(self, config: Config) -> Config:
        """Every config the service takes passes through here: ``serve --sandbox``
        points it at the in-process sandbox."""
        if not self.use_sandbox or self.sandbox is None:
            return config
        return with_sandbox(config, self.sandbox)

    def _track(self, task: asyncio.Task[list[RecipientOutcome]]) -> None:
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)


def _api_settings(config: Config) -> tuple[str, Literal["form", "json"], float, int]:
    api = config.api
    return (api.url, api.encoding, api.timeout, api.max_concurrency)


def _api_client(config: Config) -> ApiClient:
    url, encoding, timeout, max_concurrency = _api_settings(config)
    return ApiClient(url, encoding=encoding, timeout=timeout, max_concurrency=max_concurrency)
