"""``serve --workers N``: the supervisor, its workers, their shares of the limits.

The end-to-end tests run the real daemon as a subprocess with two workers and
talk to it over SMTP, signals and a NOTIFY_SOCKET of their own (as systemd).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from smtp_bridge.cli import build_parser
from smtp_bridge.config import parse_config
from smtp_bridge.sandbox import Sandbox
from smtp_bridge.workers import WorkerSlot, worker_config

WAIT = 30.0


def config_text(state_dir: Path, api_url: str, extra: str = "") -> str:
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
          listen: null
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
        self.changed = asyncio.Event()
        self.pump = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))
            self.changed.set()
        self.changed.set()

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    async def wait_for(self, name: str, count: int = 1) -> list[dict[str, Any]]:
        async def until() -> list[dict[str, Any]]:
            while len(self.named(name)) < count:
                if self.pump.done():
                    raise AssertionError(f"exited before {count} {name!r}: {self.events}")
                self.changed.clear()
                await self.changed.wait()
            return self.named(name)

        return await asyncio.wait_for(until(), WAIT)

    async def notified(self, key: str) -> str:
        """The next NOTIFY_SOCKET datagram holding ``key``."""
        loop = asyncio.get_running_loop()
        while True:
            data = (await asyncio.wait_for(loop.sock_recv(self.notify, 4096), WAIT)).decode()
            if any(line.startswith(key + "=") for line in data.splitlines()):
                return data


@contextlib.asynccontextmanager
async def supervisor(tmp_path: Path, api_url: str) -> AsyncIterator[Supervisor]:
    config = tmp_path / "config.yaml"
    config.write_text(config_text(tmp_path / "state", api_url))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setblocking(False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "WATCHDOG_"))}
    env.update(PYTHONUNBUFFERED="1", NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smtp_bridge", "serve", "--config", str(config), "--workers", "2",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    running = Supervisor(proc, notify)
    try:
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.wait_for(running.pump, WAIT)
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


async def test_a_worker_that_cannot_start_stops_the_daemon_with_exit_2(tmp_path: Path) -> None:
    # The state directory is a file: the store cannot open, in every worker.
    (tmp_path / "state").write_text("not a directory")
    async with supervisor(tmp_path, "http://127.0.0.1:9/x") as sup:
        assert await asyncio.wait_for(sup.proc.wait(), WAIT) == 2
        await sup.wait_for("worker_failed_to_start")
