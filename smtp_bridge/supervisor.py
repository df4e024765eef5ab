"""``serve --workers N``: N worker processes, one event loop each, behind SO_REUSEPORT.

One event loop is at most one core. With ``--workers N`` the process systemd
started becomes a supervisor that serves no mail itself. It starts N copies of
``smtp-bridge serve`` (the workers); each binds every listen address with
SO_REUSEPORT, so the kernel spreads connections across them, and all of them
share the one state store (SQLite WAL: writes take turns on its lock; dedup
records and the spool are common to all). The supervisor:

- resolves ``:0`` ports once and holds them, so every worker binds the same one;
- gives each worker its share of the limits meant for the daemon as a whole:
  ``api.rate_limit``, ``api.max_concurrency``, ``smtp.max_connections`` and
  ``smtp.max_connections_per_ip`` divided by N (rounded up, worker_process.py),
  so the configured totals are never exceeded; the admin endpoint runs in worker
  0 only, and its /metrics add up every worker's (prometheus-client's
  multiprocess mode, over a directory of this run that the supervisor makes and
  removes);
- stands between the workers and systemd: READY=1 once every worker is ready,
  RELOADING=1 ... READY=1 around a SIGHUP it forwards to every worker,
  STOPPING=1 on SIGTERM/SIGINT, which it forwards too (each worker drains its
  own sessions), and WATCHDOG=1 while it runs: a worker that stops pinging is
  killed and restarted instead;
- restarts a worker that dies, with a growing delay; a worker that cannot
  start in the first place stops the daemon with exit code 2.

Per worker by nature: the circuit breaker, and the wait of a client's retry for
a delivery of the same message still in flight: a retry that reaches another
worker in that window may send again (the ledger stops it once the first
attempt is recorded). Socket activation cannot be combined with ``--workers``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import secrets
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, split_host_port
from .listeners import IMPLICIT_TLS_KEY, listen_plan
from .logs import log_event
from .metrics import MULTIPROCESS_ENV, forget_process
from .sockets import ipv6_only, is_ipv6_wildcard
from .systemd import (
    handle_signals,
    listen_fds,
    notify_reloading,
    sd_notify,
    unhandle_signals,
    watchdog_usec,
)
from .worker_process import EXIT_OK, EXIT_STARTUP, WORKER_ENV, WorkerSlot, serve_worker

__all__ = ["serve_workers"]

log = logging.getLogger("smtp_bridge.supervisor")

#: Restart delays for a worker that keeps dying; reset once it has run a minute.
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_AFTER = 60.0
#: How long a worker may take to start, or to answer a reload.
READY_TIMEOUT = 120.0


# --------------------------------------------------------------------------- entry


def serve_workers(
    args: argparse.Namespace,
    config: Config,
    config_path: Path | None,
    run: Callable[[Coroutine[Any, Any, Any]], Any],
) -> int:
    """``serve`` with ``--workers N`` (the supervisor), or as one of its workers."""
    value = os.environ.pop(WORKER_ENV, None)
    if value is None:
        return run(_Supervisor(args, config).run())  # type: ignore[no-any-return]
    slot = WorkerSlot.from_env(value)
    return serve_worker(slot, config, config_path, sandbox=args.sandbox, run=run)


# --------------------------------------------------------------------------- supervisor


@dataclass(eq=False)
class _Worker:
    index: int
    notify: socket.socket  # our end of the worker's NOTIFY_SOCKET
    notify_address: str
    process: asyncio.subprocess.Process | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    started_at: float = 0.0
    last_ping: float = 0.0
    failures: int = 0


class _Supervisor:
    def __init__(self, args: argparse.Namespace, config: Config) -> None:
        self.args = args
        self.config = config
        self.count = int(args.workers)
        self.workers: list[_Worker] = []
        self.placeholders: list[socket.socket] = []
        self.listen: dict[str, str] = {}
        self.stopping = False
        self.stop_event = asyncio.Event()
        self.watchdog = watchdog_usec()
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Where the workers' metrics live (prometheus-client multiprocess mode).
        self.metrics_dir = ""

    # ------------------------------------------------------------ run

    async def run(self) -> int:
        if listen_fds():
            log_event(log, "cannot_start", level=logging.ERROR,
                      error="--workers cannot use socket activation")  # fmt: skip
            return EXIT_STARTUP
        try:
            self.listen = self._resolve_ports()
        except OSError as exc:
            log_event(log, "cannot_start", level=logging.ERROR,
                      error=f"cannot listen: {os.strerror(exc.errno or 0)}")  # fmt: skip
            return EXIT_STARTUP
        loop = asyncio.get_running_loop()
        handle_signals(loop, stop=self.stop_event.set, reload=self._on_sighup)
        metrics_dir = tempfile.TemporaryDirectory(prefix="smtp-bridge-metrics-")
        self.metrics_dir = metrics_dir.name
        try:
            return await self._run()
        finally:
            metrics_dir.cleanup()
            unhandle_signals(loop)
            for worker in self.workers:
                loop.remove_reader(worker.notify.fileno())
                worker.notify.close()
            for sock in self.placeholders:
                sock.close()

    async def _run(self) -> int:
        log_event(log, "workers_starting", workers=self.count)
        self.workers = [self._new_worker(i) for i in range(self.count)]
        # Worker 0 first: it creates or migrates the state store alone; then the rest.
        code = await self._start_all([self.workers[0]])
        if code is None:
            code = await self._start_all(self.workers[1:])
        if code is not None:
            await self._stop_all()
            return code
        sd_notify(f"READY=1\nSTATUS={self._status()}")
        log_event(log, "workers_ready", workers=self.count, pids=self._pids())
        watchdog = self._spawn(self._watch()) if self.watchdog else None
        monitors = [self._spawn(self._monitor(w)) for w in self.workers]
        await self.stop_event.wait()
        self.stopping = True
        sd_notify("STOPPING=1\nSTATUS=stopping: workers finishing their sessions")
        log_event(log, "workers_stopping", workers=self.count)
        if watchdog is not None:
            watchdog.cancel()
        codes = await self._stop_all()
        for task in monitors:
            task.cancel()
        await asyncio.gather(*monitors, return_exceptions=True)
        log_event(log, "workers_stopped", exit_codes=codes)
        return EXIT_OK if all(c in (0, -signal.SIGTERM) for c in codes) else 1

    async def _start_all(self, workers: list[_Worker]) -> int | None:
        """Start ``workers`` and wait until each is ready; an exit code if one failed."""
        for worker in workers:
            await self._start(worker)
        for worker in workers:
            code = await self._wait_ready(worker)
            if self.stop_event.is_set():
                return EXIT_OK  # SIGTERM during startup: stop, and that is no failure
            if code is not None:
                log_event(
                    log,
                    "worker_failed_to_start",
                    level=logging.ERROR,
                    worker=worker.index,
                    exit_code=code,
                )
                return EXIT_STARTUP if code != 0 else 1
        return None

    async def _wait_ready(self, worker: _Worker) -> int | None:
        ready = asyncio.ensure_future(worker.ready.wait())
        exited = asyncio.ensure_future(worker.exited.wait())
        stop = asyncio.ensure_future(self.stop_event.wait())
        done, pending = await asyncio.wait(
            {ready, exited, stop}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        if ready in done and not worker.exited.is_set():
            return None
        if stop in done:
            return EXIT_OK
        assert worker.process is not None
        if worker.process.returncode is None:  # timed out
            worker.process.kill()
            await worker.process.wait()
            return EXIT_STARTUP
        return worker.process.returncode

    # ------------------------------------------------------------ workers

    def _new_worker(self, index: int) -> _Worker:
        name = f"smtp-bridge-{os.getpid()}-{index}-{secrets.token_hex(4)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("\0" + name)  # abstract namespace: nothing on disk to clean up
        sock.setblocking(False)
        worker = _Worker(index, sock, "@" + name)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_notify, worker)
        return worker

    async def _start(self, worker: _Worker) -> None:
        env = dict(os.environ)
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID"):
            env.pop(key, None)
        env[WORKER_ENV] = WorkerSlot(worker.index, self.count, self.listen).to_env()
        env[MULTIPROCESS_ENV] = self.metrics_dir
        env["NOTIFY_SOCKET"] = worker.notify_address
        if self.watchdog:
            env["WATCHDOG_USEC"] = str(self.watchdog)
        else:
            env.pop("WATCHDOG_USEC", None)
        worker.ready.clear()
        worker.exited.clear()
        worker.process = await asyncio.create_subprocess_exec(
            *self._command(), env=env, preexec_fn=_die_with_parent
        )
        worker.started_at = worker.last_ping = time.monotonic()
        log_event(log, "worker_started", worker=worker.index, pid=worker.process.pid)
        self._spawn(self._reap(worker, worker.process))

    def _command(self) -> list[str]:
        args = self.args
        command = [sys.executable, "-m", "smtp_bridge", "serve"]
        if args.config:
            command += ["--config", str(args.config)]
        command += ["--log-format", args.log_format, "--log-level", args.log_level]
        if args.sandbox:
            command.append("--sandbox")
        return command

    async def _reap(self, worker: _Worker, process: asyncio.subprocess.Process) -> None:
        await process.wait()
        if worker.process is process:
            worker.exited.set()

    async def _monitor(self, worker: _Worker) -> None:
        """Restart ``worker`` whenever it dies, with a growing delay if it keeps dying."""
        while not self.stopping:
            await worker.exited.wait()
            if self.stopping:
                return
            assert worker.process is not None
            code = worker.process.returncode
            if time.monotonic() - worker.started_at > STABLE_AFTER:
                worker.failures = 0
            delay = RESTART_DELAYS[min(worker.failures, len(RESTART_DELAYS) - 1)]
            worker.failures += 1
            log_event(
                log,
                "worker_exited",
                level=logging.ERROR,
                worker=worker.index,
                pid=worker.process.pid,
                exit_code=code,
                restart_in=delay,
            )
            sd_notify(f"STATUS={self._status()}")
            forget_process(self.metrics_dir, worker.process.pid)  # its live gauges
            await asyncio.sleep(delay)
            if self.stopping:
                return
            await self._start(worker)
            if await self._wait_ready(worker) is None:
                sd_notify(f"STATUS={self._status()}")

    async def _stop_all(self) -> list[int]:
        running = [w.process for w in self.workers if w.process and w.process.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        # Each worker bounds its own drain (smtp.shutdown_timeout + api.timeout).
        return [await p.wait() for p in (w.process for w in self.workers) if p is not None]

    # ------------------------------------------------------------ systemd

    def _on_notify(self, worker: _Worker) -> None:
        while True:
            try:
                data = worker.notify.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            for line in data.decode("utf-8", "replace").splitlines():
                key, _, value = line.partition("=")
                if key == "READY" and value == "1":
                    worker.ready.set()
                elif key == "RELOADING" and value == "1":
                    worker.ready.clear()
                elif key == "WATCHDOG" and value == "1":
                    worker.last_ping = time.monotonic()

    def _on_sighup(self) -> None:
        self._spawn(self._reload())

    async def _reload(self) -> None:
        """Forward SIGHUP; RELOADING=1 until every worker has answered READY=1 again."""
        notify_reloading()
        waiting = []
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.ready.clear()
                worker.process.send_signal(signal.SIGHUP)
                waiting.append(worker.ready.wait())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*waiting), READY_TIMEOUT)
        sd_notify(f"READY=1\nSTATUS={self._status()}")

    async def _watch(self) -> None:
        """Ping systemd while we run; kill a worker whose own pings stopped (stuck loop)."""
        assert self.watchdog
        limit = self.watchdog / 1_000_000
        while True:
            sd_notify("WATCHDOG=1")
            now = time.monotonic()
            for worker in self.workers:
                self._on_notify(worker)  # pings that queued while this loop was busy
                process = worker.process
                # A worker still starting (importing, opening the store) is judged by
                # READY_TIMEOUT, as systemd judges the daemon only after READY=1.
                allowed = limit if worker.ready.is_set() else max(limit, READY_TIMEOUT)
                if (
                    process is not None
                    and process.returncode is None
                    and now - worker.last_ping > allowed
                ):
                    log_event(
                        log,
                        "worker_unresponsive",
                        level=logging.ERROR,
                        worker=worker.index,
                        pid=process.pid,
                    )
                    process.kill()
            await asyncio.sleep(limit / 4)

    # ------------------------------------------------------------ helpers

    def _resolve_ports(self) -> dict[str, str]:
        """``host:0`` -> ``host:PORT``, one port for all workers, held until we exit.

        The placeholder sockets are bound (SO_REUSEPORT) but never listen, so they
        receive no connections; holding them keeps the port ours between restarts.
        """
        resolved: dict[str, str] = {}
        for entry in listen_plan(self.config):
            host, port = split_host_port(entry.removeprefix(IMPLICIT_TLS_KEY))
            if port != 0:
                continue
            port = self._reserve(host)
            shown = f"[{host}]" if ":" in host else host
            resolved[entry] = f"{shown}:{port}"
        return resolved

    def _reserve(self, host: str) -> int:
        infos = socket.getaddrinfo(
            host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        port = 0
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # As the workers will bind it (sockets.py): [::] takes IPv4 too.
                v6only = not is_ipv6_wildcard(host) or ipv6_only(
                    0, self.config.smtp.dual_stack, self.config.smtp.listen
                )
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            try:
                sock.bind((address[0], port, *address[2:]))
            except OSError:
                sock.close()
                raise
            self.placeholders.append(sock)
            port = sock.getsockname()[1]
        return port

    def _status(self) -> str:
        up = sum(1 for w in self.workers if w.process and w.process.returncode is None)
        return f"{up} of {self.count} workers accepting mail"

    def _pids(self) -> list[int]:
        return [w.process.pid for w in self.workers if w.process is not None]

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _load_libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - not Linux
        return None


#: Loaded up front: nothing may be loaded between fork and exec.
_LIBC = _load_libc()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the worker between fork and exec: SIGTERM when the supervisor dies."""
    prctl = getattr(_LIBC, "prctl", None)
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
