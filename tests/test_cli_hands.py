"""The command line as an operator's hands expect it (docs/cli.md): options anywhere,
``SMTP_BRIDGE_CONFIG``, columns and ``--json``, progress on a terminal, completion,
and ``serve --sandbox`` telling a newcomer where to look.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import shutil
import smtplib
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from proc_daemon import Daemon

from smtp_bridge import cli
from smtp_bridge.config import DEFAULT_CONFIG_PATH
from smtp_bridge.outcomes import RecipientState
from smtp_bridge.store import MessageRecord, RecipientRecord
from smtp_bridge.store.sqlite import SQLiteStore

WAIT = 15.0
ROUTES = """
routes:
  - name: default
    template_id: "E_GENERIC"
    data: {subject: "{{ subject }}"}
"""


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent(f"""\
            api: {{url: "http://127.0.0.1:9/x", app_key: k}}
            delivery: {{mode: queue, state_dir: {json.dumps(str(tmp_path / "state"))}}}
            admin: {{listen: null}}
            """)
        + ROUTES
    )
    return path


async def dead_letters(tmp_path: Path, count: int) -> list[str]:
    """A state store holding ``count`` dead letters (content kept: retryable)."""
    store = await SQLiteStore.open(tmp_path / "state" / "state.sqlite3")
    ids = []
    try:
        for n in range(count):
            queue_id = f"Q{n:04d}ABCDEF"
            message = MessageRecord(
                queue_id, f"key-{n}", "app@example.com", "127.0.0.1", "", f"Order {n}", 10,
                time.time(), "queue", b"Subject: x\r\n\r\nx\r\n",
            )  # fmt: skip
            rcpt = RecipientRecord(
                queue_id, f"user{n}@a-rather-long-domain{n % 2}.example.org",
                RecipientState.DEAD, route="default", api_code=40005,
                reply="550 5.1.3 Recipient address rejected", attempts=1,
            )  # fmt: skip
            await store.add_message(message, [rcpt])
            ids.append(queue_id)
    finally:
        await store.close()
    return ids


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(list(args))
    return code, capsys.readouterr().out


async def test_options_stand_before_or_after_the_subcommand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await dead_letters(tmp_path, 2)
    config = str(write_config(tmp_path))
    same = [
        (
            ("queue", "--config", config, "list", "--dead"),
            ("queue", "list", "--dead", "--config", config),
        ),
        (
            ("queue", "--config", config, "--json", "show", ids[0]),
            ("queue", "show", ids[0], "-c", config, "--json"),
        ),
        (
            ("queue", "--json", "list", "--dead", "-c", config),
            ("queue", "list", "--config", config, "--dead", "--json"),
        ),
    ]
    for before, after in same:
        first = await asyncio.to_thread(run, capsys, *before)
        second = await asyncio.to_thread(run, capsys, *after)
        assert first == second and first[0] == 0, (before, after)
    code, out = await asyncio.to_thread(
        run, capsys, "queue", "list", "--dead", "--json", "-c", config
    )
    assert sorted(row["queue_id"] for row in json.loads(out)) == ids
    code, out = await asyncio.to_thread(
        run, capsys, "queue", "retry", ids[0], "--json", "-c", config
    )
    assert json.loads(out) == {"queued": 1, "not_retryable": 0}
    code, out = await asyncio.to_thread(
        run, capsys, "queue", "purge", "--config", config, ids[1], "--json"
    )
    assert json.loads(out) == {"purged": 1}


async def test_queue_list_lines_up_in_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await dead_letters(tmp_path, 3)
    config = str(write_config(tmp_path))
    code, out = await asyncio.to_thread(run, capsys, "queue", "list", "--dead", "--config", config)
    assert code == 0
    header, *rows, total = out.splitlines()
    assert total == "3 dead letters (3 messages)"
    for column in ("STATE", "RECIPIENT", "LAST REPLY"):
        start = header.index(column)
        for row in rows:
            assert row[start - 2 : start] == "  " and row[start] != " ", (column, row)
    assert all(row[header.index("RECIPIENT") :].startswith("user") for row in rows)


def test_smtp_bridge_config_sets_the_default(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    env = {**os.environ, "SMTP_BRIDGE_CONFIG": str(config)}
    result = subprocess.run(
        [sys.executable, "-m", "smtp_bridge", "check-config"],
        env=env, capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {config}: 1 routes")
    # --config still wins over the environment.
    env["SMTP_BRIDGE_CONFIG"] = str(tmp_path / "missing.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "smtp_bridge", "check-config", "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def _run_on_a_terminal(*args: str) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal: (exit code, stdout, terminal text)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "smtp_bridge", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
        )  # fmt: skip
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        out, _ = proc.communicate(timeout=WAIT)
    finally:
        os.close(master)
    return proc.returncode, out.decode(), b"".join(chunks).decode()


async def test_retry_all_dead_shows_progress_on_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await dead_letters(tmp_path, 30)
    config = str(write_config(tmp_path))
    code, out, terminal = await asyncio.to_thread(
        _run_on_a_terminal, "queue", "retry", "--all-dead", "--config", config
    )
    assert code == 0, terminal
    assert "dead letters: 30 recipients due for delivery now" in out
    assert "retried 1/30 messages" in terminal and "retried 30/30 messages (100%)" in terminal
    # Not a terminal: no progress line, the same result.
    await dead_letters(tmp_path / "again", 3)
    config = str(write_config(tmp_path / "again"))
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, ["queue", "retry", "--all-dead", "-c", config])
    captured = capsys.readouterr()
    assert code == 0 and "3 recipients due" in captured.out and captured.err == ""


def _completion(shell: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "smtp_bridge", "completion", shell],
        capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion(tmp_path: Path) -> None:
    script = tmp_path / "smtp-bridge.bash"
    script.write_text(_completion("bash"))
    assert subprocess.run(["bash", "-n", str(script)], timeout=WAIT).returncode == 0
    probe = textwrap.dedent(f"""\
        source {script}
        t() {{ COMP_WORDS=("$@"); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 )); COMPREPLY=()
              _smtp_bridge; echo "${{COMPREPLY[*]}}"; }}
        t smtp-bridge qu
        t smtp-bridge queue ""
        t smtp-bridge queue --config f.yaml re
        t smtp-bridge queue list --d
        t smtp-bridge serve --log-level w
        t smtp-bridge completion ""
        """)
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "queue",
        "list show retry purge --config --json",
        "retry",
        "--dead",
        "warning",
        "bash zsh",
    ]


def test_zsh_completion() -> None:
    script = _completion("zsh")
    assert script.startswith("#compdef smtp-bridge\n") and "bashcompinit" in script
    zsh = shutil.which("zsh")
    if zsh is None:
        pytest.skip("zsh is not installed: its syntax check cannot run")
    result = subprocess.run([zsh, "-n"], input=script, text=True, timeout=WAIT)
    assert result.returncode == 0


# ---------------------------------------------------------------- serve --sandbox


def _send(address: str, subject: str) -> str:
    host, port = address.rsplit(":", 1)
    with smtplib.SMTP(host, int(port), timeout=WAIT) as client:
        client.ehlo()
        client.mail("app@example.com")
        client.rcpt("bob@example.org")
        code, reply = client.data(
            f"From: App <app@example.com>\r\nSubject: {subject}\r\n\r\nHi\r\n"
        )
    assert code == 250, reply
    return reply.decode().rsplit(" id=", 1)[1]


def _newcomer(daemon: Daemon, subject: str) -> None:
    """What the README's first steps promise: the printed URL shows the message."""
    smtp = daemon.line("smtp-bridge sandbox: send mail to ").rsplit(" ", 1)[1]
    url = daemon.line("smtp-bridge console: ").split()[2]
    queue_id = _send(smtp, subject)
    deadline = time.monotonic() + WAIT
    while True:  # the history is written just behind the reply
        page = httpx.get(url, timeout=WAIT)
        if queue_id in page.text:
            break
        assert time.monotonic() < deadline, page.text
    assert subject in page.text
    detail = httpx.get(f"{url}messages/{queue_id}", timeout=WAIT).text
    assert "sandbox-template" in detail or "E_GENERIC" in detail
    assert f"id={queue_id}" in detail and "&#34;app_key&#34;: &#34;***&#34;" in detail
    assert "delivered" in detail


def test_serve_sandbox_prints_the_console_url(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(f"""\
            smtp: {{listen: ["127.0.0.1:0"]}}
            delivery: {{state_dir: {json.dumps(str(tmp_path / "state"))}}}
            admin: {{listen: "127.0.0.1:0"}}
            """)
        + ROUTES
    )
    daemon = Daemon("serve", "--sandbox", "--config", str(config))
    try:
        _newcomer(daemon, "First message")
    finally:
        daemon.stop()


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_serve_sandbox_without_a_config_starts_the_console(tmp_path: Path) -> None:
    if DEFAULT_CONFIG_PATH.exists():
        pytest.skip(f"{DEFAULT_CONFIG_PATH} exists: serve --sandbox would use it")
    if not (_port_free(2525) and _port_free(9025)):
        pytest.skip("127.0.0.1:2525 or :9025 is in use; the built-in config listens there")
    env = {k: v for k, v in os.environ.items() if k not in ("SMTP_BRIDGE_CONFIG", "NOTIFY_SOCKET")}
    env.update(HOME=str(tmp_path / "home"), XDG_STATE_HOME=str(tmp_path / "xdg"))
    daemon = Daemon("serve", "--sandbox", env=env)
    try:
        _newcomer(daemon, "Hello from the README")
    finally:
        daemon.stop()
