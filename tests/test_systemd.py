"""systemd integration: the unit files, sd_notify, the watchdog and socket activation.

A fake ``$NOTIFY_SOCKET`` (an AF_UNIX datagram socket bound here) receives what
the real ``smtp-bridge serve`` subprocess tells systemd; every wait is on a
message or a log line under a deadline, never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from test_daemon import (
    WAIT,
    Daemon,
    assert_no_traceback,
    bridge_command,
    daemon_env,
    make_message,
    send,
    write_config,
)

from smtp_bridge.config import load_config
from smtp_bridge.sandbox import Sandbox, fingerprint
from smtp_bridge.systemd import listen_fds, watchdog_interval

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
SERVICE_UNIT = SYSTEMD / "smtp-bridge.service"
SOCKET_UNIT = SYSTEMD / "smtp-bridge.socket"
UNIT_CONFIG = "/etc/smtp-bridge/config.yaml"
UNIT_KEY = "unit-test-key-0123456789"
#: As the unit file's comment and the README tell operators to write it.
UNIT_KEY_FILE = "${CREDENTIALS_DIRECTORY:-/etc/smtp-bridge}/aotsend.key"


class NotifySocket:
    """What systemd's notification socket would receive, one datagram per message."""

    def __init__(self) -> None:
        # AF_UNIX paths are limited to ~108 bytes: not under pytest's tmp_path.
        self._dir = tempfile.mkdtemp(prefix="sb-notify-")
        self.path = os.path.join(self._dir, "notify")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def close(self) -> None:
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    async def wait_for(
        self, predicate: Callable[[dict[str, str]], bool], *, after: int = 0
    ) -> tuple[int, dict[str, str]]:
        """The first message at index >= ``after`` matching ``predicate``: (index, fields)."""
        loop = asyncio.get_running_loop()

        async def find() -> tuple[int, dict[str, str]]:
            index = after
            while True:
                while index < len(self.messages):
                    if predicate(self.messages[index]):
                        return index, self.messages[index]
                    index += 1
                data = await loop.sock_recv(self._sock, 65536)
                fields = dict(
                    line.split("=", 1) for line in data.decode().splitlines() if "=" in line
                )
                self.messages.append(fields)

        try:
            return await asyncio.wait_for(find(), WAIT)
        except TimeoutError:
            raise AssertionError(f"no such notification within {WAIT}s: {self.messages}") from None

    async def wait(
        self, key: str, value: str = "1", *, after: int = 0
    ) -> tuple[int, dict[str, str]]:
        return await self.wait_for(lambda m: m.get(key) == value, after=after)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    try:
        yield sock
    finally:
        sock.close()


@contextlib.asynccontextmanager
async def running(*args: str, env: dict[str, str]) -> AsyncIterator[Daemon]:
    daemon = await Daemon.start(*args, env=env)
    try:
        yield daemon
    finally:
        await daemon.close()


def unit_entries(path: Path) -> dict[str, list[str]]:
    """``Key`` -> every value given for it (systemd allows repeats), comments skipped."""
    entries: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        entries.setdefault(key.strip(), []).append(value.strip())
    return entries


def unit_command(value: str, config: Path) -> list[str]:
    """An Exec*= line as this test runs it: our smtp-bridge, the test's config file.

    The unit names the installed program (``/opt/smtp-bridge/bin/smtp-bridge``);
    everything else on the line is used as written.
    """
    argv = shlex.split(value.lstrip("-@:+!"))
    assert Path(argv[0]).name == "smtp-bridge", argv
    assert UNIT_CONFIG in argv, argv
    return [
        *bridge_command(),
        *(str(config) if arg == UNIT_CONFIG else arg for arg in argv[1:]),
    ]


def unit_config(tmp_path: Path, api_url: str) -> tuple[Path, Path]:
    """A config read the way the unit arranges it: the key from a credential file."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "aotsend.key").write_text(UNIT_KEY + "\n")
    config = write_config(
        tmp_path / "config.yaml",
        state_dir=tmp_path / "state",
        api=f"url: {api_url}\napp_key_file: {UNIT_KEY_FILE}",
    )
    return config, credentials


# ---------------------------------------------------------------- the unit files


def test_service_unit_declares_what_operators_expect() -> None:
    unit = unit_entries(SERVICE_UNIT)
    one = {key: values[-1] for key, values in unit.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert re.fullmatch(r"\S*kill -HUP \$MAINPID", one["ExecReload"]), one["ExecReload"]
    assert one["WatchdogSec"]
    assert one["LoadCredential"] == "aotsend.key:/etc/smtp-bridge/aotsend.key"
    assert one["StateDirectory"] == "smtp-bridge"
    assert one["DynamicUser"] == "yes"
    assert one["NoNewPrivileges"] == "yes"
    assert one["ProtectSystem"] == "strict"
    assert one["ProtectHome"] == "yes"
    assert one["PrivateTmp"] == "yes"
    assert set(one["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert one["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert one["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert one["SystemCallFilter"] == "@system-service"
    # The stop timeout covers the drain (smtp.shutdown_timeout, 30s by default)
    # plus the API calls still in flight (api.timeout, 10s).
    assert int(one["TimeoutStopSec"].removesuffix("s")) > 40


def test_socket_unit_matches_the_service() -> None:
    unit = unit_entries(SOCKET_UNIT)
    assert unit["ListenStream"]
    assert unit["FileDescriptorName"][-1] == "smtp"
    assert unit["Service"][-1] == SERVICE_UNIT.name


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not found")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # The program path is where the README installs it; here it is this
    # environment's entry point, so verify checks everything else as written.
    program = bridge_command()[0]
    if Path(program).name != "smtp-bridge":
        pytest.skip("no smtp-bridge entry point installed in this environment")
    for unit in (SERVICE_UNIT, SOCKET_UNIT):
        text = re.sub(r"/opt/smtp-bridge/bin/smtp-bridge", program, unit.read_text())
        (tmp_path / unit.name).write_text(text)
    units = [str(tmp_path / unit.name) for unit in (SERVICE_UNIT, SOCKET_UNIT)]
    result = subprocess.run(
        ["systemd-analyze", "verify", *units],
        capture_output=True, text=True, timeout=WAIT, check=False,
    )  # fmt: skip
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        # Where no systemd runs (a container), verify says so; not about our units.
        if line.strip() and "Failed to connect to bus" not in line
    ]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


async def test_unit_exec_lines_start_and_reach_ready(
    tmp_path: Path, sandbox: Sandbox, notify: NotifySocket
) -> None:
    unit = unit_entries(SERVICE_UNIT)
    config, credentials = unit_config(tmp_path, sandbox.url)
    env = daemon_env(NOTIFY_SOCKET=notify.path, CREDENTIALS_DIRECTORY=str(credentials))

    for pre in unit.get("ExecStartPre", []):
        check = await asyncio.create_subprocess_exec(
            *unit_command(pre, config), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(check.communicate(), WAIT)
        assert check.returncode == 0, (pre, out, err)

    [start] = unit["ExecStart"]
    daemon = await Daemon.start(*unit_command(start, config)[len(bridge_command()) :], env=env)
    try:
        _, ready = await notify.wait("READY")
        assert "accepting mail on 127.0.0.1:" in ready["STATUS"], ready
        # READY=1 means the listeners are up: a connection now gets a greeting.
        _, event = await daemon.wait_event("listening")
        port = int(event["address"].rpartition(":")[2])
        code, text = await send(port, message=make_message("Via the unit"))
        assert code == 250, text
        [record] = sandbox.sent()
        assert record["key"] == fingerprint(UNIT_KEY)  # read from the credential file
        assert await daemon.terminate() == 0
        await notify.wait("STOPPING")
    finally:
        await daemon.close()
    assert_no_traceback(daemon.stderr)
    assert UNIT_KEY not in daemon.stderr


# ---------------------------------------------------------------- sd_notify


async def test_notify_ready_reloading_stopping(
    tmp_path: Path, sandbox: Sandbox, notify: NotifySocket
) -> None:
    path = write_config(tmp_path / "config.yaml", state_dir=tmp_path / "state",
                        api=f"url: {sandbox.url}\napp_key: k")  # fmt: skip
    env = daemon_env(NOTIFY_SOCKET=notify.path)
    async with running("serve", "--config", str(path), env=env) as daemon:
        ready_at, _ = await notify.wait("READY")
        # READY=1 comes after the listeners are up, never before.
        _, listening = await daemon.wait_event("listening")
        port = int(listening["address"].rpartition(":")[2])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"220 ")
        writer.close()
        await writer.wait_closed()

        daemon.proc.send_signal(signal.SIGHUP)
        reloading_at, reloading = await notify.wait("RELOADING", after=ready_at + 1)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        await notify.wait("READY", after=reloading_at + 1)
        await daemon.wait_event("reloaded")

        assert await daemon.terminate() == 0
        _, stopping = await notify.wait("STOPPING", after=reloading_at + 1)
        assert stopping["STATUS"].startswith("stopping")
    assert_no_traceback(daemon.stderr)


async def test_watchdog_pings_when_asked(
    tmp_path: Path, sandbox: Sandbox, notify: NotifySocket
) -> None:
    path = write_config(tmp_path / "config.yaml", state_dir=tmp_path / "state",
                        api=f"url: {sandbox.url}\napp_key: k")  # fmt: skip
    # 200ms: a ping every 100ms from the event loop.
    env = daemon_env(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="200000")
    async with running("serve", "--config", str(path), env=env) as daemon:
        first, _ = await notify.wait("WATCHDOG")
        await notify.wait("WATCHDOG", after=first + 1)  # and it keeps pinging
        await notify.wait("READY")
        assert await daemon.terminate() == 0
    assert_no_traceback(daemon.stderr)


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 15.0
    # The watchdog is another process's (a wrapper's): not ours to feed.
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "soon", "-5"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert watchdog_interval() is None


# ---------------------------------------------------------------- socket activation


def test_listen_fds_ignores_another_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listen_fds() == []
    assert "LISTEN_FDS" not in os.environ  # never handed on to anything we start


#: sd_listen_fds(3)'s side of socket activation, between fork and exec.
ACTIVATE = """
import fcntl, os, sys
passed = [int(fd) for fd in sys.argv[1:3]]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in passed]
for target, fd in enumerate(high, start=3):
    os.dup2(fd, target)
for fd in {*passed, *high} - {3, 4}:
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2", LISTEN_FDNAMES="smtp:admin")
os.execv(sys.argv[3], sys.argv[3:])
"""


def _bound(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(16)
    return sock


async def test_socket_activation(tmp_path: Path, sandbox: Sandbox, notify: NotifySocket) -> None:
    """The sockets systemd would pass (fd 3 smtp, fd 4 admin) are served as they are."""
    path = write_config(tmp_path / "config.yaml", state_dir=tmp_path / "state",
                        api=f"url: {sandbox.url}\napp_key: k")  # fmt: skip
    smtp_sock, admin_sock = _bound(), _bound()
    smtp_port, admin_port = smtp_sock.getsockname()[1], admin_sock.getsockname()[1]
    # As systemd does after fork: the sockets at fds 3 and 4, and LISTEN_PID the
    # pid that will run smtp-bridge (exec keeps it).
    a, b = smtp_sock.fileno(), admin_sock.fileno()
    command = [
        sys.executable, "-c", ACTIVATE, str(a), str(b),
        *bridge_command(), "serve", "--config", str(path),
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *command, pass_fds=(a, b), env=daemon_env(NOTIFY_SOCKET=notify.path),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    smtp_sock.close()
    admin_sock.close()
    daemon = Daemon(proc)
    try:
        _, listening = await daemon.wait_event("listening")
        await notify.wait("READY")
        assert listening == {**listening, "address": f"127.0.0.1:{smtp_port}", "activated": True}
        _, admin = await daemon.wait_event("admin_listening")
        assert admin["address"] == f"127.0.0.1:{admin_port}"
        code, text = await send(smtp_port, message=make_message("Activated"))
        assert code == 250, text
        async with httpx.AsyncClient(timeout=WAIT, trust_env=False) as client:
            health = await client.get(f"http://127.0.0.1:{admin_port}/healthz")
        assert health.status_code == 200

        # A reload does not touch the sockets the socket unit owns.
        daemon.proc.send_signal(signal.SIGHUP)
        _, reloaded = await daemon.wait_event("reloaded")
        assert reloaded["listeners_added"] == [] and reloaded["listeners_removed"] == []
        code, text = await send(smtp_port, message=make_message("Still activated"))
        assert code == 250, text
        assert await daemon.terminate() == 0
    finally:
        await daemon.close()
    assert_no_traceback(daemon.stderr)
    assert load_config(path).smtp.listen == ["127.0.0.1:0"]  # not what was served
