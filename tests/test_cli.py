"""The ``smtp-bridge`` command line as a user runs it: a real subprocess each time.

Subprocesses are run with asyncio so the in-process sandbox keeps answering
while the command runs (and so a command that should send nothing but does
would be seen, not deadlock).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import textwrap
from pathlib import Path

import httpx

from smtp_bridge import __version__
from smtp_bridge.sandbox import SEND_PATH, Sandbox

#: Upper bound for any one command; never a synchronisation sleep.
WAIT = 30.0

SECRET_KEY = "cli-secret-key-9f8e7d6c5b4a"

MESSAGE = (
    b"From: Shop <shop@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: Reset your password\r\n"
    b"Message-ID: <cli-1@example.com>\r\n"
    b"\r\n"
    b"Click https://example.com/reset/abc123 to reset.\r\n"
)


RESET_ROUTES = """
        routes:
          - name: password-reset
            match: {rcpt: ["*@example.org"], subject: "re:reset"}
            template_id: "E_RESET"
            alias: "{{ sender.name }}"
            data:
              name: "{{ rcpt.local }}"
              link: "{{ text | regex_search('https://\\\\S+') }}"
        """


def write_config(tmp_path: Path, api_url: str, routes: str = RESET_ROUTES) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent(f"""
        smtp:
          listen: ["127.0.0.1:0"]
          hostname: bridge.test
        api:
          url: {json.dumps(api_url)}
          app_key: {json.dumps(SECRET_KEY)}
        delivery:
          state_dir: {json.dumps(str(tmp_path / "state"))}
        admin:
          listen: null
        """)
        + textwrap.dedent(routes)
    )
    return path


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def run_cli(*args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    """Run ``python -m smtp_bridge ARGS``; return (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smtp_bridge", *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=cli_env(),
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), WAIT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _request_json(stdout: str) -> dict[str, object]:
    """The JSON request block ``route`` prints after its ``POST`` line."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("POST "))
    block: list[str] = []
    for line in lines[start + 1 :]:
        block.append(line)
        if line.strip() == "}":
            break
    doc = json.loads("\n".join(block))
    assert isinstance(doc, dict)
    return doc


# ---------------------------------------------------------------- route


async def test_route_prints_request_and_sends_nothing(tmp_path: Path, sandbox: Sandbox) -> None:
    config = write_config(tmp_path, sandbox.url)
    eml = tmp_path / "message.eml"
    eml.write_bytes(MESSAGE)
    code, out, err = await run_cli("route", str(eml), "--rcpt", "bob@example.org",
                                   "--config", str(config))  # fmt: skip
    assert code == 0, err
    assert "rcpt: bob@example.org" in out
    assert re.search(r"^\s*route: password-reset$", out, re.MULTILINE), out
    assert f"POST {sandbox.url} (form)" in out
    assert _request_json(out) == {
        "app_key": "***",
        "template_id": "E_RESET",
        "to": "bob@example.org",
        "data": json.dumps(
            {"name": "bob", "link": "https://example.com/reset/abc123"}, separators=(",", ":")
        ),
        "alias": "Shop",
    }
    assert SECRET_KEY not in out
    assert SECRET_KEY not in err
    assert sandbox.sent() == []


async def test_route_json_encoding_shows_data_as_object(tmp_path: Path, sandbox: Sandbox) -> None:
    config = write_config(tmp_path, sandbox.url)
    config.write_text(config.read_text().replace("api:\n", "api:\n  encoding: json\n"))
    eml = tmp_path / "message.eml"
    eml.write_bytes(MESSAGE)
    code, out, err = await run_cli("route", str(eml), "--rcpt", "bob@example.org",
                                   "--config", str(config))  # fmt: skip
    assert code == 0, err
    request = _request_json(out)
    assert request["app_key"] == "***"
    assert request["data"] == {"name": "bob", "link": "https://example.com/reset/abc123"}
    assert SECRET_KEY not in out + err
    assert sandbox.sent() == []


async def test_route_unroutable_recipient(tmp_path: Path, sandbox: Sandbox) -> None:
    config = write_config(tmp_path, sandbox.url)
    eml = tmp_path / "message.eml"
    eml.write_bytes(MESSAGE)
    code, out, err = await run_cli("route", str(eml), "--rcpt", "carol@elsewhere.example",
                                   "--config", str(config))  # fmt: skip
    assert code != 0
    assert "rcpt: carol@elsewhere.example" in out
    assert re.search(r"^\s*route: \(none\)$", out, re.MULTILINE), out
    assert "no API call: 550 5.7.1" in out
    assert "POST " not in out
    assert "Traceback" not in err
    assert sandbox.sent() == []


# ---------------------------------------------------------------- schema, version


async def test_schema_is_json() -> None:
    code, out, err = await run_cli("schema")
    assert code == 0, err
    schema = json.loads(out)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert {"smtp", "api", "delivery", "routes"} <= set(schema["properties"])


async def test_version() -> None:
    code, out, err = await run_cli("--version")
    assert code == 0, err
    assert out.strip() == f"smtp-bridge {__version__}"


# ---------------------------------------------------------------- sandbox


async def test_sandbox_command_answers_posts() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smtp_bridge", "sandbox", "--listen", f"127.0.0.1:{port}",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=cli_env(),
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        # Wait for its "listening" log line (bounded), not a fixed time.
        async def listening() -> str:
            assert proc.stderr is not None
            while line := await proc.stderr.readline():
                if "sandbox listening" in line.decode():
                    return line.decode()
            raise AssertionError("sandbox exited before listening")

        line = await asyncio.wait_for(listening(), WAIT)
        assert f"127.0.0.1:{port}" in line
        url = f"http://127.0.0.1:{port}{SEND_PATH}"
        async with httpx.AsyncClient(timeout=WAIT) as client:
            fields = {"app_key": "k", "template_id": "T1", "to": "bob@example.org",
                      "data": json.dumps({"name": "Bob"})}  # fmt: skip
            ok = await client.post(url, data=fields)
            assert ok.status_code == 200
            assert ok.json() == {"code": 200, "message": "Request successful"}
            bad = await client.post(url, data={**fields, "to": "not-an-address"})
            assert bad.json()["code"] == 40005
            sent = (await client.get(f"http://127.0.0.1:{port}/_sent")).json()
        assert [r["to"] for r in sent] == ["not-an-address", "bob@example.org"]
        assert sent[1]["data"] == {"name": "Bob"}
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), WAIT)


# ---------------------------------------------------------------- send-test


async def test_send_test_delivers(tmp_path: Path, sandbox: Sandbox) -> None:
    config = write_config(tmp_path, sandbox.url)
    code, out, err = await run_cli("send-test", "--to", "a@b.example", "--template", "T_TEST",
                                   "--data", '{"name": "A"}', "--config", str(config))  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["code"] == 200
    assert result["result"] == "api"
    assert SECRET_KEY not in out + err
    [sent] = sandbox.sent()
    assert (sent["to"], sent["template_id"]) == ("a@b.example", "T_TEST")
    assert sent["data"] == {"name": "A"}


async def test_send_test_wrong_template_fails(tmp_path: Path) -> None:
    async with Sandbox(templates=["T_ONLY"]) as restricted:
        config = write_config(tmp_path, restricted.url)
        code, out, err = await run_cli("send-test", "--to", "a@b.example", "--template", "T_OTHER",
                                       "--config", str(config))  # fmt: skip
        assert code != 0
        result = json.loads(out)
        assert result["code"] == 40003
        assert "Traceback" not in err
        assert [r["code"] for r in restricted.sent()] == [40003]


async def test_settle_heap_freezes_what_is_alive_and_raises_the_threshold() -> None:
    """What ``serve`` does once its config is loaded (in a child: it is process-wide)."""
    script = (
        "import gc, json; from smtp_bridge.service import settle_heap;"
        "before = gc.get_freeze_count(); settle_heap();"
        "print(json.dumps([before, gc.get_freeze_count(), gc.get_threshold()]))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, env=cli_env()
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    before, after, threshold = json.loads(out)
    assert before == 0
    assert after > 10_000  # modules, classes and the like: the permanent generation
    assert threshold == [20_000, 50, 100]
