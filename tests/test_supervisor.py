"""``serve --workers N``: the supervisor, its workers, their shares of the limits.

The end-to-end tests run the real daemon as a subprocess with two workers and
talk to it over SMTP, signals and a NOTIFY_SOCKET of their own (as systemd).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import pytest

from smtp_bridge.cli import build_parser
from smtp_bridge.config import parse_config
from smtp_bridge.outcomes import RecipientState
from smtp_bridge.sandbox import Sandbox
from smtp_bridge.store import MessageRecord, RecipientRecord
from smtp_bridge.store.sqlite import SQLiteStore as Store
from smtp_bridge.worker_process import WorkerSlot, worker_config

WAIT = 30.0


def config_text(
    state_dir: Path, api_url: str, extra: str = "", *, admin_listen: str = "null"
) -> str:
    return textwrap.dedent(f"""\
        smtp:
          listen: ["127.0.0.1:0"]
          hostname: bridge.test
          shutdown_timeout: 10s
        api:
          url: {api_url}
          app_key: test-key
        delivery:
          state_dir: {json.dumps(str(state_dir))}
        admin:
          listen: {admin_listen}
        routes:
          - name: default
            template_id: "E_GENERIC"
            data: {{subject: "{{{{ subject }}}}"}}
        """) + textwrap.dedent(extra)


# --------------------------------------------------------------------------- pure


def test_each_worker_gets_its_share_of_the_daemon_wide_limits(tmp_path: Path) -> None:
    config = parse_config(
        textwrap.dedent("""\
            smtp:
              listen: ["127.0.0.1:0"]
              hostname: bridge.test
              max_connections: 1001
            api:
              url: http://127.0.0.1:9/x
              rate_limit: 9
              max_concurrency: 5
            admin:
              listen: 127.0.0.1:9025
            routes:
              - name: default
                template_id: E_GENERIC
            """),
        filename="config.yaml",
    )
    listen = {"127.0.0.1:0": "127.0.0.1:40001"}

    first = worker_config(config, WorkerSlot(0, 2, listen))
    second = worker_config(config, WorkerSlot(1, 2, listen))

    for share in (first, second):
        assert share.smtp.listen == ["127.0.0.1:40001"]
        assert share.api.rate_limit == 4.5  # 9 calls/s for the daemon as a whole
        assert share.api.max_concurrency == 3  # rounded up: never below 1
        assert share.smtp.max_connections == 501
        assert share.smtp.max_connections_per_ip == 10
    assert first.admin.listen == "127.0.0.1:9025"  # worker 0 only: one /metrics
    assert second.admin.listen is None
    assert config.api.rate_limit == 9  # the loaded config itself is untouched


def test_worker_slot_round_trips_through_the_environment() -> None:
    slot = WorkerSlot(1, 3, {"[::1]:0": "[::1]:2525"})
    assert WorkerSlot.from_env(slot.to_env()) == slot


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_workers_must_be_a_positive_number(value: str, capsys: Any) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--workers", value])
    assert "--workers" in capsys.readouterr().err


# --------------------------------------------------------------------------- e2e


class Supervisor:
    def __init__(self, proc: asyncio.subprocess.Process, notify: socket.socket) -> None:
        self.proc = proc
        self.notify = notify
        self.events: list[dict[str, Any]] = []
        self.notes: list[str] = []  # NOTIFY_SOCKET datagrams, drained as systemd does
        self.read_notes = 0
        self.changed = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.pump = loop.create_task(self._read())
        self.drain = loop.create_task(self._drain())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))
            self.changed.set()
        self.changed.set()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.notes.append((await loop.sock_recv(self.notify, 4096)).decode())
            self.changed.set()

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    async def _until(self, done: Any) -> Any:
        async def wait() -> Any:
            while not (found := done()):
                if self.pump.done():
                    raise AssertionError(f"exited early: {self.events}")
                self.changed.clear()
                await self.changed.wait()
            return found

        return await asyncio.wait_for(wait(), WAIT)

    async def wait_for(self, name: str, count: int = 1) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await self._until(
            lambda: len(self.named(name)) >= count and self.named(name)
        )
        return found

    async def notified(self, key: str) -> str:
        """The next NOTIFY_SOCKET datagram holding ``key`` (after the last one returned)."""

        def find() -> str | None:
            for index in range(self.read_notes, len(self.notes)):
                if any(line.startswith(key + "=") for line in self.notes[index].splitlines()):
                    self.read_notes = index + 1
                    return self.notes[index]
            return None

        note: str = await self._until(find)
        return note


@contextlib.asynccontextmanager
async def supervisor(
    tmp_path: Path,
    api_url: str,
    *,
    watchdog_usec: int = 0,
    admin_listen: str = "null",
    nofile: int = 0,
) -> AsyncIterator[Supervisor]:
    config = tmp_path / "config.yaml"
    config.write_text(config_text(tmp_path / "state", api_url, admin_listen=admin_listen))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setblocking(False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "WATCHDOG_"))}
    env.update(PYTHONUNBUFFERED="1", NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smtp_bridge", "serve", "--config", str(config), "--workers", "2",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=env,
        preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
        if nofile else None,
    )  # fmt: skip
    running = Supervisor(proc, notify)
    try:
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.wait_for(running.pump, WAIT)
        running.drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running.drain
        notify.close()


async def send(port: int, n: int) -> list[int]:
    codes = []
    for i in range(n):  # a connection each: SO_REUSEPORT spreads connections
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
            message = f"Subject: hello {i}\r\nMessage-ID: <{i}.{os.getpid()}@test>\r\n\r\nhi\r\n"
            errors, _ = await smtp.sendmail("app@example.com", [f"to{i}@example.org"], message)
            codes.append(0 if not errors else 1)
    return codes


async def test_two_workers_share_the_port_reload_restart_and_stop(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    async with supervisor(tmp_path, sandbox.url) as sup:
        ready = await sup.notified("READY")  # once, after both workers are ready
        assert "READY=1" in ready
        listening = await sup.wait_for("listening", 2)
        assert len({e["address"] for e in listening}) == 1  # one port, two listeners
        port = int(listening[0]["address"].rpartition(":")[2])
        pids = (await sup.wait_for("workers_ready"))[0]["pids"]
        assert len(set(pids)) == 2

        assert await send(port, 12) == [0] * 12
        assert len(sandbox.sent()) == 12

        # SIGHUP goes to every worker; READY=1 once both have reloaded.
        assert sup.proc.pid is not None
        os.kill(sup.proc.pid, signal.SIGHUP)
        assert "RELOADING=1" in await sup.notified("RELOADING")
        assert "READY=1" in await sup.notified("READY")
        assert len(await sup.wait_for("reloaded", 2)) == 2

        # A worker that dies is replaced; mail keeps flowing meanwhile.
        os.kill(pids[1], signal.SIGKILL)
        exited = (await sup.wait_for("worker_exited"))[0]
        assert exited["pid"] == pids[1]
        await sup.wait_for("listening", 3)
        assert await send(port, 4) == [0] * 4

        sup.proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in await sup.notified("STOPPING")
        assert await asyncio.wait_for(sup.proc.wait(), WAIT) == 0
        await sup.wait_for("workers_stopped")


async def test_a_worker_whose_loop_is_stuck_is_killed_and_replaced(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    async with supervisor(tmp_path, sandbox.url, watchdog_usec=1_000_000) as sup:
        await sup.notified("READY")
        pids = (await sup.wait_for("workers_ready"))[0]["pids"]
        assert "WATCHDOG=1" in await sup.notified("WATCHDOG")
        os.kill(pids[0], signal.SIGSTOP)  # its loop stops pinging; the other's does not
        stuck = (await sup.wait_for("worker_unresponsive"))[0]
        assert stuck["pid"] == pids[0]
        await sup.wait_for("listening", 3)  # its replacement
        assert [e["pid"] for e in sup.named("worker_unresponsive")] == [pids[0]]
        assert "WATCHDOG=1" in await sup.notified("WATCHDOG")  # systemd still pinged
        sup.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(sup.proc.wait(), WAIT) == 0


async def test_a_worker_that_cannot_start_stops_the_daemon_with_exit_2(tmp_path: Path) -> None:
    # An open-file limit below what smtp.max_connections (1000) needs, hard
    # too: no worker can start. (A store that cannot open no longer stops a
    # start: the workers run and answer 451, tests/test_store_outage.py.)
    async with supervisor(tmp_path, "http://127.0.0.1:9/x", nofile=512) as sup:
        assert await asyncio.wait_for(sup.proc.wait(), WAIT) == 2
        await sup.wait_for("worker_failed_to_start")
        assert any("RLIMIT_NOFILE" in e["error"] for e in sup.named("cannot_start"))


# --------------------------------------------------------------------------- store


async def test_two_stores_on_one_file_take_turns_and_lose_nothing(tmp_path: Path) -> None:
    """What two workers do: write the one state store at once, each in its own batches."""
    path = tmp_path / "state.sqlite3"
    first = await Store.open(path)
    second = await Store.open(path)
    try:

        async def write(store: Store, who: str, n: int) -> None:
            for i in range(n):
                queue_id = f"{who}{i:04d}"
                record = MessageRecord(queue_id, f"key-{queue_id}", "a@b.c", "", "", "s", 1,
                                       time.time(), "direct")  # fmt: skip
                rcpt = RecipientRecord(queue_id, "r@x.y", RecipientState.DELIVERED)
                await store.add_message(record, [rcpt])

        await asyncio.gather(
            *(write(first, f"A{t}", 25) for t in range(4)),
            *(write(second, f"B{t}", 25) for t in range(4)),
        )
        counts = await first.counts()
        assert counts[RecipientState.DELIVERED.value] == 200
        assert (tmp_path / "state.sqlite3.write-lock").exists()
        # Group commit still groups: far fewer transactions than writes.
        assert first.writer.commits + second.writer.commits < 200
    finally:
        await first.close()
        await second.close()


async def test_metrics_of_one_scrape_cover_every_worker(tmp_path: Path, sandbox: Sandbox) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    admin_port = probe.getsockname()[1]
    probe.close()  # a free port for the admin endpoint (worker 0's)
    async with supervisor(tmp_path, sandbox.url, admin_listen=f"127.0.0.1:{admin_port}") as sup:
        await sup.notified("READY")
        listening = await sup.wait_for("listening", 2)
        port = int(listening[0]["address"].rpartition(":")[2])
        pids = (await sup.wait_for("workers_ready"))[0]["pids"]
        assert await send(port, 40) == [0] * 40
        async with httpx.AsyncClient(timeout=WAIT) as client:
            text = (await client.get(f"http://127.0.0.1:{admin_port}/metrics")).text
        sup.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(sup.proc.wait(), WAIT) == 0
    delivered = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("smtp_bridge_messages_total{") and 'outcome="delivered"' in line
    ]
    # Every message, whichever worker took it (SO_REUSEPORT spreads the 40
    # connections over both): the scrape adds up both workers, not worker 0's half.
    assert len(set(pids)) == 2
    assert sum(delivered) == 40, text
