"""The real daemon: ``smtp-bridge serve`` as a subprocess, driven by SMTP and signals.

The port is learnt from the daemon's own JSON log (``listening``), read line
by line under a deadline; nothing here waits by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import sys
import textwrap
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any

import httpx
import pytest

from smtp_bridge.config import DEFAULT_CONFIG_PATH
from smtp_bridge.sandbox import Sandbox

#: Upper bound for any one wait on the daemon; never a synchronisation sleep.
WAIT = 20.0

ROUTES = """
routes:
  - name: default
    template_id: "E_GENERIC"
    data: {subject: "{{ subject }}", body: "{{ text }}"}
"""


def write_config(path: Path, *, state_dir: Path, api: str = "", smtp: str = "",
                 routes: str = ROUTES) -> Path:  # fmt: skip
    """A daemon config on an ephemeral loopback port; ``api``/``smtp`` add YAML lines."""
    text = textwrap.dedent(f"""\
        smtp:
          listen: ["127.0.0.1:0"]
          hostname: bridge.test
          shutdown_timeout: 15s
        {textwrap.indent(textwrap.dedent(smtp), "  ").strip() if smtp else ""}
        delivery:
          state_dir: {json.dumps(str(state_dir))}
        admin:
          listen: null
        """)
    if api:
        text += "api:\n" + textwrap.indent(textwrap.dedent(api).strip(), "  ") + "\n"
    path.write_text(text + textwrap.dedent(routes))
    return path


def bridge_command() -> list[str]:
    """The installed ``smtp-bridge`` entry point of this interpreter's environment."""
    script = Path(sys.executable).with_name("smtp-bridge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "smtp_bridge"]


def daemon_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


class Daemon:
    """A running ``smtp-bridge`` subprocess and the log lines it has written."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._eof = False
        self._pump = asyncio.get_running_loop().create_task(self._read_stderr())

    @classmethod
    async def start(cls, *args: str, env: dict[str, str] | None = None) -> Daemon:
        proc = await asyncio.create_subprocess_exec(
            *bridge_command(), *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env or daemon_env(),
        )  # fmt: skip
        return cls(proc)

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        try:
            while line := await self.proc.stderr.readline():
                self.lines.append(line.decode(errors="replace").rstrip("\n"))
                self._changed.set()
        finally:
            self._eof = True
            self._changed.set()

    @property
    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines, parsed (other stderr lines are skipped)."""
        found = []
        for line in self.lines:
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return found

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    async def wait_event(self, name: str, *, after: int = 0) -> tuple[int, dict[str, Any]]:
        """The first log event ``name`` at index >= ``after``: (index, fields)."""

        async def find() -> tuple[int, dict[str, Any]]:
            while True:
                self._changed.clear()
                for index, event in enumerate(self.events):
                    if index >= after and event.get("event") == name:
                        return index, event
                if self._eof:
                    raise AssertionError(f"daemon ended without logging {name!r}:\n{self.stderr}")
                await self._changed.wait()

        try:
            return await asyncio.wait_for(find(), WAIT)
        except TimeoutError:
            raise AssertionError(f"no {name!r} event within {WAIT}s:\n{self.stderr}") from None

    async def port(self) -> int:
        """Wait for ``listening``, then for a full SMTP greeting.

        The greeting proves the daemon is past startup and inside ``serve``
        (its signal handlers are installed), so signals sent after this are safe.
        """
        _, event = await self.wait_event("listening")
        host, _, port = event["address"].rpartition(":")
        assert host == "127.0.0.1", event
        reader, writer = await asyncio.open_connection("127.0.0.1", int(port))
        try:
            assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"220 ")
            writer.write(b"QUIT\r\n")
            assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"221 ")
        finally:
            writer.close()
            await writer.wait_closed()
        return int(port)

    async def wait(self) -> int:
        try:
            code = await asyncio.wait_for(self.proc.wait(), WAIT)
        except TimeoutError:
            raise AssertionError(f"daemon did not exit within {WAIT}s:\n{self.stderr}") from None
        await asyncio.wait_for(self._pump, WAIT)
        return code

    async def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await self.wait()

    async def close(self) -> None:
        """Test teardown: make sure nothing is left running."""
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await asyncio.wait_for(self._pump, WAIT)


async def run_command(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a command that should end by itself; return (exit code, stderr)."""
    daemon = await Daemon.start(*args, env=env)
    try:
        return await daemon.wait(), daemon.stderr
    finally:
        await daemon.close()


def make_message(subject: str = "Hello", body: str = "Hi there") -> bytes:
    msg = EmailMessage()
    msg["From"] = "Shop <shop@example.com>"
    msg["To"] = "bob@example.org"
    msg["Subject"] = subject
    msg.set_content(body)
    return msg.as_bytes(policy=SMTP)  # CRLF line ends, as on the wire


def smtp_send(port: int, rcpt: str, message: bytes) -> tuple[int, str]:
    """One transaction with stdlib smtplib; the RCPT reply if refused, else DATA's."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=WAIT) as smtp:
        smtp.ehlo()
        code, text = smtp.mail("app@example.com")
        assert code == 250, (code, text)
        code, text = smtp.rcpt(rcpt)
        if code != 250:
            return code, text.decode()
        code, text = smtp.data(message)
        return code, text.decode()


async def send(
    port: int, rcpt: str = "bob@example.org", message: bytes | None = None
) -> tuple[int, str]:
    return await asyncio.to_thread(smtp_send, port, rcpt, message or make_message())


async def sandbox_sent(sandbox_url: str) -> list[dict[str, Any]]:
    base = sandbox_url.split("/index/", 1)[0]
    async with httpx.AsyncClient(timeout=WAIT) as client:
        response = await client.get(f"{base}/_sent")
    records: list[dict[str, Any]] = response.json()
    return records


async def assert_refused(port: int) -> None:
    """A new connection gets no SMTP session: refused, or reset without a greeting."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return
    try:
        data = await asyncio.wait_for(reader.read(), WAIT)
    except ConnectionResetError:
        data = b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    assert not data.startswith(b"220"), data


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text, text
    assert "most recent call last" not in text, text


# ---------------------------------------------------------------- (a) serve --sandbox


async def test_serve_with_sandbox_delivers(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", state_dir=tmp_path / "state")
    daemon = await Daemon.start("serve", "--sandbox", "--config", str(config))
    try:
        port = await daemon.port()
        _, started = await daemon.wait_event("sandbox_started")
        code, text = await send(port, message=make_message("Daemon hello"))
        assert code == 250, text
        assert text.startswith("2.0.0 Ok") and " id=" in text
        [record] = await sandbox_sent(started["url"])
        assert record["code"] == 200
        assert record["to"] == "bob@example.org"
        assert record["template_id"] == "E_GENERIC"
        assert record["data"]["subject"] == "Daemon hello"
        assert await daemon.terminate() == 0
    finally:
        await daemon.close()
    assert (tmp_path / "state" / "state.sqlite3").exists()
    _, message = await daemon.wait_event("message")
    assert message["reply"].startswith("250 2.0.0")
    assert_no_traceback(daemon.stderr)


# ---------------------------------------------------------------- (b) SIGTERM drain


def _start_slow_transaction(port: int, message: bytes) -> tuple[int, str]:
    smtp = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=WAIT)
    try:
        smtp.ehlo()
        assert smtp.mail("app@example.com")[0] == 250
        assert smtp.rcpt("bob@example.org")[0] == 250
        code, text = smtp.data(message)
        return code, text.decode()
    finally:
        # No QUIT: a shutting-down bridge answers the next command with 421.
        smtp.close()


async def test_sigterm_drains_in_flight_session(tmp_path: Path) -> None:
    async with Sandbox(latency=3.0) as slow:
        config = write_config(tmp_path / "config.yaml", state_dir=tmp_path / "state",
                              api=f"url: {slow.url}\napp_key: k\ntimeout: 10s")  # fmt: skip
        daemon = await Daemon.start("serve", "--config", str(config))
        try:
            port = await daemon.port()
            in_flight = asyncio.ensure_future(
                asyncio.to_thread(_start_slow_transaction, port, make_message("in flight"))
            )
            # The API call has reached the (slow) API: the session is mid-DATA.
            await asyncio.wait_for(slow.wait_sent(1), WAIT)
            daemon.proc.send_signal(signal.SIGTERM)
            await daemon.wait_event("stopping")
            await assert_refused(port)
            assert not in_flight.done(), "the API call should still be in flight"
            code, text = await asyncio.wait_for(in_flight, WAIT)
            assert code == 250, text
            assert await daemon.wait() == 0
        finally:
            await daemon.close()
        [record] = slow.sent()
        assert record["code"] == 200
    stopping, _ = await daemon.wait_event("stopping")
    message, event = await daemon.wait_event("message")
    stopped, _ = await daemon.wait_event("stopped")
    assert stopping < message < stopped
    assert event["reply"].startswith("250 2.0.0")
    assert_no_traceback(daemon.stderr)


async def test_sigterm_idle_daemon_exits_zero(tmp_path: Path, sandbox: Sandbox) -> None:
    config = write_config(tmp_path / "config.yaml", state_dir=tmp_path / "state",
                          api=f"url: {sandbox.url}\napp_key: k")  # fmt: skip
    daemon = await Daemon.start("serve", "--config", str(config))
    try:
        port = await daemon.port()
        # An idle session is told the bridge is going away, then closed.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"220 ")
        daemon.proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(reader.read(), WAIT)
        writer.close()
        await writer.wait_closed()
        assert rest.startswith(b"421 4.3.2 "), rest
        assert await daemon.wait() == 0
    finally:
        await daemon.close()
    await daemon.wait_event("stopped")
    assert_no_traceback(daemon.stderr)


# ---------------------------------------------------------------- (c) SIGHUP reload

ROUTES_A = """
routes:
  - name: route-a
    match: {rcpt: "*@a.example"}
    template_id: "T_A"
"""

ROUTES_B = """
routes:
  - name: route-b
    match: {rcpt: "*@b.example"}
    template_id: "T_B"
"""


async def test_sighup_reload(tmp_path: Path, sandbox: Sandbox) -> None:
    path = tmp_path / "config.yaml"
    api = f"url: {sandbox.url}\napp_key: k"

    def write(routes: str) -> None:
        write_config(path, state_dir=tmp_path / "state", api=api, routes=routes)

    write(ROUTES_A)
    daemon = await Daemon.start("serve", "--config", str(path))
    try:
        port = await daemon.port()
        assert (await send(port, "x@a.example"))[0] == 250
        assert (await send(port, "x@b.example"))[0] == 550

        # A broken config is refused; the old routes keep working.
        path.write_text(path.read_text().replace("template_id:", "template_idd:"))
        daemon.proc.send_signal(signal.SIGHUP)
        refused_at, refused = await daemon.wait_event("reload_refused")
        assert any("template_idd" in error for error in refused["errors"]), refused
        code, text = await send(port, "y@a.example")
        assert code == 250, text
        code, text = await send(port, "y@b.example")
        assert code == 550 and text.startswith("5.1.1"), text

        # A fixed config is taken.
        write(ROUTES_B)
        daemon.proc.send_signal(signal.SIGHUP)
        _, reloaded = await daemon.wait_event("reloaded", after=refused_at)
        assert reloaded["routes"] == 1
        code, text = await send(port, "z@b.example")
        assert code == 250, text
        code, text = await send(port, "z@a.example")
        assert code == 550 and text.startswith("5.1.1"), text
        assert await daemon.terminate() == 0
    finally:
        await daemon.close()
    delivered = [(r["to"], r["template_id"]) for r in reversed(sandbox.sent())]
    assert delivered == [("x@a.example", "T_A"), ("y@a.example", "T_A"), ("z@b.example", "T_B")]
    assert_no_traceback(daemon.stderr)


# ---------------------------------------------------------------- (d), (e) failures


async def test_port_in_use_exits_2(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        config = write_config(tmp_path / "config.yaml", state_dir=tmp_path / "state")
        config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
        # -X dev: whatever startup had opened must be closed again, no ResourceWarning.
        env = daemon_env(PYTHONDEVMODE="1")
        code, stderr = await run_command("serve", "--sandbox", "--config", str(config), env=env)
    assert code == 2, stderr
    # Every line JSON, the start-up error included (issue 13).
    events = [json.loads(line) for line in stderr.splitlines()]
    failed = [e for e in events if e["event"] == "cannot_start"]
    assert len(failed) == 1 and failed[0]["level"] == "error", stderr
    assert re.fullmatch(rf"cannot listen on 127\.0\.0\.1:{port}: .*in use", failed[0]["error"])
    assert_no_traceback(stderr)
    assert "ResourceWarning" not in stderr, stderr


async def test_bad_config_exits_1(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        'smtp:\n  listen: ["127.0.0.1:0"]\n  max_recipients: -1\n  max_conections: 10\n' + ROUTES
    )
    code, stderr = await run_command("serve", "--config", str(config))
    assert code == 1, stderr
    events = [json.loads(line) for line in stderr.splitlines()]  # every line JSON
    assert {e["event"] for e in events} == {"config_error"}, stderr
    lines = [e["error"] for e in events]
    assert f"{config}:3: smtp.max_recipients: must be greater than or equal to 1" in lines, stderr
    assert any(line.startswith(f"{config}:4: smtp.max_conections: unknown key") for line in lines)
    assert_no_traceback(stderr)


async def test_missing_config_file_exits_1(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    code, stderr = await run_command("serve", "--config", str(missing))
    assert code == 1, stderr
    [event] = [json.loads(line) for line in stderr.splitlines()]
    assert event["event"] == "config_error", stderr
    assert str(missing) in event["error"] and "cannot read" in event["error"], stderr
    assert_no_traceback(stderr)


# ---------------------------------------------------------------- (f) built-in sandbox config

SANDBOX_PORT = 2525


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        # As the daemon binds: SO_REUSEADDR, so TIME_WAIT leftovers do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_serve_sandbox_without_config(tmp_path: Path) -> None:
    if DEFAULT_CONFIG_PATH.exists():
        pytest.skip(f"{DEFAULT_CONFIG_PATH} exists: serve --sandbox would use it")
    if not _port_free(SANDBOX_PORT):
        pytest.skip(f"127.0.0.1:{SANDBOX_PORT} is in use; the built-in config listens there")
    env = daemon_env(HOME=str(tmp_path / "home"), XDG_STATE_HOME=str(tmp_path / "xdg"))
    daemon = await Daemon.start("serve", "--sandbox", env=env)
    try:
        port = await daemon.port()
        assert port == SANDBOX_PORT
        _, started = await daemon.wait_event("sandbox_started")
        code, text = await send(port, message=make_message("Built-in"))
        assert code == 250, text
        [record] = await sandbox_sent(started["url"])
        assert record["code"] == 200
        assert record["template_id"] == "sandbox-template"
        assert record["alias"] == "Shop"
        assert record["data"] == {"subject": "Built-in", "body": "Hi there\n"}
        assert await daemon.terminate() == 0
    finally:
        await daemon.close()
    assert (tmp_path / "xdg" / "smtp-bridge" / "state.sqlite3").exists()
    assert_no_traceback(daemon.stderr)


# ---------------------------------------------------------------- (g) swaks


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
async def test_swaks(tmp_path: Path) -> None:
    swaks = shutil.which("swaks")
    assert swaks is not None
    config = write_config(tmp_path / "config.yaml", state_dir=tmp_path / "state")
    daemon = await Daemon.start("serve", "--sandbox", "--config", str(config))
    try:
        port = await daemon.port()
        proc = await asyncio.create_subprocess_exec(
            swaks, "--server", f"127.0.0.1:{port}", "--from", "app@example.com",
            "--to", "bob@example.org", "--header", "Subject: from swaks", "--body", "swaks body",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), WAIT)
        transcript = out.decode(errors="replace")
        assert proc.returncode == 0, transcript
        assert re.search(r"<-\s+250 2\.0\.0 Ok id=", transcript), transcript
        assert await daemon.terminate() == 0
    finally:
        await daemon.close()
