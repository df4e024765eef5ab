"""The admin HTTP endpoint on ``admin.listen``: /healthz, /readyz, /metrics and the console.

It runs on the daemon's own event loop (aiohttp), so a stuck loop shows as a
failing /healthz, not as a health thread that keeps answering "ok" for a dead
daemon. Readiness is a set of named checks the service supplies; each answers
``None`` when fine or a short reason, and /readyz says which ones failed.
Readiness means "a load balancer may send me mail": an *advisory* check (the
breaker in queue and hybrid mode, where mail is still spooled safely) is
reported under ``warnings`` and does not make the instance unready.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Collection, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.exposition import choose_encoder

from .config import split_host_port
from .console import Console, ConsoleSources
from .console.security import Guard
from .logs import log_event
from .metrics import Metrics

__all__ = ["AdminServer", "ReadinessCheck", "format_address"]

log = logging.getLogger("smtp_bridge.admin")

#: One readiness check: ``None`` when fine, else what is wrong (short, no secrets).
ReadinessCheck = Callable[[], Awaitable[str | None]]

#: A check that takes longer than this counts as failed: a probe must answer.
CHECK_TIMEOUT = 5.0


def format_address(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """``host:port``, or ``[v6]:port``: the form ``listen`` keys take."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class AdminServer:
    """/healthz (alive), /readyz (ready for mail) and /metrics (Prometheus text)."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        checks: Mapping[str, ReadinessCheck],
        refresh: Callable[[], Awaitable[None]] | None = None,
        check_timeout: float = CHECK_TIMEOUT,
        advisory: Collection[str] = (),
        console: ConsoleSources | None = None,
        token: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.metrics = metrics
        #: Token, Host, CSP and CSRF checks on every path (console/security.py).
        self.guard = Guard(token)
        self.console = Console(console, self.guard) if console is not None else None
        self._checks = dict(checks)
        #: Checks whose problems are reported (``warnings``) but leave /readyz 200.
        self.advisory = frozenset(advisory)
        self._refresh = refresh
        self._timeout = check_timeout
        self._runner: web.AppRunner | None = None
        self.address: str | None = None

    def app(self) -> web.Application:
        # client_max_size: the console's "Try a message" takes an .eml upload.
        app = web.Application(middlewares=[self.guard.middleware], client_max_size=11 << 20)
        if self.console is not None:
            self.console.add_routes(app, self.readiness)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self, listen: str | None = None, *, sock: socket.socket | None = None) -> str:
        """Listen on ``listen`` (host:port, port 0 for an ephemeral one) or on ``sock``
        (socket activation); return the bound address. Raises OSError."""
        # handle_signals=False: the service owns SIGTERM/SIGHUP.
        runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            site: web.BaseSite
            if sock is not None:
                site = web.SockSite(runner, sock)
            else:
                assert listen is not None
                host, port = split_host_port(listen)
                site = web.TCPSite(runner, host or None, port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.address = format_address(runner.addresses[0])
        return self.address

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # ------------------------------------------------------------ handlers

    async def _healthz(self, request: web.Request) -> web.Response:
        # Answering at all proves the process and its event loop are alive.
        return web.Response(text="ok\n")

    async def readiness(self) -> dict[str, str]:
        """Each check's verdict: "ok" or what is wrong."""

        async def run(check: ReadinessCheck) -> str:
            try:
                problem = await asyncio.wait_for(check(), self._timeout)
            except TimeoutError:
                return "timed out"
            except Exception as exc:  # a probe must answer, whatever went wrong
                log_event(
                    log, "readiness_check_error", level=logging.WARNING, error=type(exc).__name__
                )
                return "check failed"
            return problem or "ok"

        names = list(self._checks)
        verdicts = await asyncio.gather(*(run(self._checks[n]) for n in names))
        return dict(zip(names, verdicts, strict=True))

    async def _readyz(self, request: web.Request) -> web.Response:
        checks = await self.readiness()
        problems = [name for name, verdict in checks.items() if verdict != "ok"]
        failed = [name for name in problems if name not in self.advisory]
        warnings = [name for name in problems if name in self.advisory]
        body = {"ready": not failed, "failed": failed, "warnings": warnings, "checks": checks}
        return web.Response(
            text=json.dumps(body) + "\n",
            status=503 if failed else 200,
            content_type="application/json",
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        if self._refresh is not None:
            try:
                await asyncio.wait_for(self._refresh(), self._timeout)
            except Exception as exc:  # stale gauges beat no metrics at all
                log_event(
                    log, "metrics_refresh_failed", level=logging.WARNING, error=type(exc).__name__
                )
        accept = request.headers.get("Accept", "")
        if "application/openmetrics-text" in accept:
            encoder, content_type = choose_encoder(accept)
            body = encoder(self.metrics.registry)
        else:
            body, content_type = self.metrics.render(), CONTENT_TYPE_LATEST
        return web.Response(body=body, headers={"Content-Type": content_type})
