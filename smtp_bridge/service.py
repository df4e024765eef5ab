"""The daemon's lifecycle: startup -> serve -> shutdown, signals, reload, sd_notify.

One event loop carries the SMTP listeners, the API client and the store (no
threaded Controller), so a session, its API calls and its ledger writes never
cross threads except into the store's own writer thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from pathlib import Path

from .api import ApiClient
from .config import Config, ConfigError, load_config, split_host_port
from .delivery import DirectDelivery, RecipientOutcome
from .logs import log_event
from .metrics import Metrics
from .sandbox import Sandbox
from .server import BridgeHandler, BridgeSMTP, ConnectionTracker, Runtime
from .store import Store, StoreError

__all__ = ["BridgeService", "StartupError", "sd_notify", "SANDBOX_APP_KEY"]

log = logging.getLogger("smtp_bridge.service")

#: The key ``serve --sandbox`` uses when the config has none.
SANDBOX_APP_KEY = "sandbox-key"
STATE_FILE = "state.sqlite3"


class StartupError(Exception):
    """The daemon could not start (port in use, store unwritable...): exit code 2."""


def sd_notify(state: str) -> None:
    """Tell systemd about our state (sd_notify(3)); a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(state.encode())


class BridgeService:
    """Owns the listeners, the API client, the store and the sandbox if any."""

    def __init__(
        self, config: Config, *, config_path: Path | None = None, sandbox: bool = False
    ) -> None:
        self.config_path = config_path
        self.use_sandbox = sandbox
        self.sandbox: Sandbox | None = None
        self.runtime = Runtime.build(self._with_sandbox(config))
        self.tracker = ConnectionTracker()
        self.addresses: list[tuple[str, int]] = []
        self._servers: list[asyncio.Server] = []
        self._deliveries: set[asyncio.Task[list[RecipientOutcome]]] = set()
        self._stop = asyncio.Event()
        self._api: ApiClient | None = None
        self._store: Store | None = None
        self.handler: BridgeHandler | None = None
        self.metrics = Metrics()

    # ------------------------------------------------------------ phases

    async def startup(self) -> None:
        config = self.runtime.config
        if self.use_sandbox:
            self.sandbox = Sandbox()
            url = await self.sandbox.start("127.0.0.1", 0)
            log_event(log, "sandbox_started", url=url)
            config = self._with_sandbox(config)
            self.runtime = Runtime.build(config)
        state_path = config.delivery.state_dir / STATE_FILE
        try:
            self._store = await Store.open(state_path, dedup_ttl=config.delivery.dedup_ttl)
        except StoreError as exc:
            raise StartupError(f"state store: {exc}") from None
        self._api = ApiClient(
            config.api.url,
            encoding=config.api.encoding,
            timeout=config.api.timeout,
            max_concurrency=config.api.max_concurrency,
        )
        delivery = DirectDelivery(self._api, self._store, self.metrics)
        handler = self.handler = BridgeHandler(delivery, self._track)
        loop = asyncio.get_running_loop()

        def factory() -> BridgeSMTP:
            # Each connection takes the runtime current when it arrives, so a
            # reload applies to new sessions and in-flight ones keep theirs.
            return BridgeSMTP(handler, self.runtime, self.tracker, loop=loop)

        for listen in config.smtp.listen:
            host, port = split_host_port(listen)
            try:
                server = await loop.create_server(
                    factory, host or None, port, reuse_address=True, start_serving=True
                )
            except OSError as exc:
                raise StartupError(f"cannot listen on {listen}: {exc.strerror}") from None
            self._servers.append(server)
            for sock in server.sockets:
                address = sock.getsockname()
                self.addresses.append((address[0], address[1]))
                log_event(log, "listening", address=f"{address[0]}:{address[1]}")
        sd_notify("READY=1\nSTATUS=accepting mail")

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT; SIGHUP reloads the config."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def stop(self) -> None:
        self._stop.set()

    async def shutdown(self) -> None:
        """Stop accepting, let sessions finish within the grace period, then close."""
        sd_notify("STOPPING=1")
        log_event(log, "stopping", sessions=self.tracker.total, deliveries=len(self._deliveries))
        for server in self._servers:
            server.close()
        for session in list(self.tracker.sessions):
            session.close_when_idle()
        grace = self.runtime.config.smtp.shutdown_timeout
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
        for server in self._servers:
            await server.wait_closed()
        if self._api is not None:
            await self._api.aclose()
        if self._store is not None:
            await self._store.close()
        if self.sandbox is not None:
            await self.sandbox.stop()
        log_event(log, "stopped")

    async def run(self) -> None:
        # shutdown() also after a failed startup: it closes whatever startup
        # had opened (sandbox, store, API client, listeners bound so far).
        try:
            await self.startup()
            await self.serve()
        finally:
            await self.shutdown()

    # ------------------------------------------------------------ reload

    def reload(self) -> None:
        """SIGHUP: validate the new config in full; keep the old one if it is bad."""
        sd_notify("RELOADING=1")
        try:
            if self.config_path is None:
                raise ConfigError([])
            config = load_config(self.config_path)
        except ConfigError as exc:
            log_event(
                log, "reload_refused", level=logging.ERROR, errors=[str(i) for i in exc.issues]
            )
        else:
            self.runtime = Runtime.build(self._with_sandbox(config))
            log_event(log, "reloaded", routes=len(config.routes))
        sd_notify("READY=1")

    # ------------------------------------------------------------ helpers

    def _with_sandbox(self, config: Config) -> Config:
        """Point ``api.url`` at the in-process sandbox (``serve --sandbox``)."""
        if not self.use_sandbox or self.sandbox is None:
            return config
        update: dict[str, object] = {"url": self.sandbox.url}
        if config.api.app_key is None:
            from pydantic import SecretStr

            update["app_key"] = SecretStr(SANDBOX_APP_KEY)
        return config.model_copy(update={"api": config.api.model_copy(update=update)})

    def _track(self, task: asyncio.Task[list[RecipientOutcome]]) -> None:
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)
