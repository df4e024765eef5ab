"""Log lines: one JSON object per event, the fields an operator greps for, no secrets.

The secrets test runs the real daemon at ``--log-level debug`` with an API key,
a per-user key and a user whose hash comes from ``smtp-bridge hash-password``,
drives AUTH with a wrong and a right password, and searches every line written.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import signal
import smtplib
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import DEFAULT_ROUTES
from hypothesis import given, settings
from hypothesis import strategies as st
from test_daemon import WAIT, Daemon, assert_no_traceback, bridge_command, daemon_env, make_message
from test_systemd import NotifySocket

from smtp_bridge import replies
from smtp_bridge.logs import (
    JsonFormatter,
    TextFormatter,
    log_context,
    log_event,
    register_secrets,
    unregister_secrets,
)
from smtp_bridge.sandbox import Sandbox

GLOBAL_KEY = "global-key-Zq8Xw3Lr5Tn1"
USER_KEY = "user-key-Mf4Hs9Kd2Pb7"
PASSWORD = "right-Pa55word-Vc6Jy0"
WRONG_PASSWORD = "wrong-Pa55word-Ge3Ru8"


async def hash_password(password: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *bridge_command(), "hash-password",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(password.encode() + b"\n"), WAIT)
    assert proc.returncode == 0, err
    return out.decode().strip()


def write_config(path: Path, api_url: str, password_hash: str) -> Path:
    path.write_text(
        textwrap.dedent(f"""\
        smtp:
          listen: ["127.0.0.1:0"]
          hostname: bridge.test
          auth:
            users:
              crm: {{password_hash: "{password_hash}", app_key: "{USER_KEY}"}}
              ops: {{password_hash: "{password_hash}"}}
        api:
          url: {json.dumps(api_url)}
          app_key: {GLOBAL_KEY}
        delivery:
          state_dir: {json.dumps(str(path.parent / "state"))}
        admin:
          listen: null
        routes:
          - name: default
            template_id: "E_GENERIC"
            data: {{subject: "{{{{ subject }}}}"}}
        """)
    )
    return path


def session(port: int, user: str, password: str, mechanism: str) -> tuple[int, str]:
    """AUTH, then one message if it succeeded: (AUTH or DATA reply code, text)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=WAIT) as smtp:
        smtp.ehlo()
        smtp.user, smtp.password = user, password
        auth = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
        try:
            smtp.auth(mechanism, auth)
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code, exc.smtp_error.decode()
        try:
            smtp.sendmail("app@example.com", ["bob@example.org"], make_message("Auth test"))
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error.decode()
        return 250, ""


async def test_no_line_holds_a_key_or_a_password(tmp_path: Path) -> None:
    password_hash = await hash_password(PASSWORD)
    async with Sandbox(app_key=GLOBAL_KEY) as sandbox:  # USER_KEY: 40002, bad key
        path = write_config(tmp_path / "config.yaml", sandbox.url, password_hash)
        daemon = await Daemon.start(
            "serve", "--config", str(path), "--log-level", "debug", env=daemon_env()
        )
        try:
            port = await daemon.port()
            for mechanism in ("PLAIN", "LOGIN"):
                code, _ = await asyncio.to_thread(session, port, "crm", WRONG_PASSWORD, mechanism)
                assert code == 535
            # crm's own key is refused by the API: 451, and a warning with the reply.
            code, text = await asyncio.to_thread(session, port, "crm", PASSWORD, "PLAIN")
            assert code == 451 and text.startswith("4.3.5"), text
            code, text = await asyncio.to_thread(session, port, "ops", PASSWORD, "LOGIN")
            assert code == 250, text
            # A refused reload logs its errors: no secret among them either.
            path.write_text(path.read_text().replace("app_key: " + GLOBAL_KEY, "app_kee: x"))
            daemon.proc.send_signal(signal.SIGHUP)
            await daemon.wait_event("reload_refused")
            assert await daemon.terminate() == 0
        finally:
            await daemon.close()
        assert [r["code"] for r in reversed(sandbox.sent())] == [40002, 200]

    events = daemon.events
    assert len(events) == len(daemon.lines), "every line is one JSON object"
    names = [e["event"] for e in events]
    assert names.count("auth_failed") == 2 and names.count("auth_ok") == 2, names
    assert [e["user"] for e in events if e["event"] == "auth_failed"] == ["crm", "crm"]
    everything = daemon.stderr
    forbidden = {
        "API key": GLOBAL_KEY,
        "user API key": USER_KEY,
        "password": PASSWORD,
        "wrong password": WRONG_PASSWORD,
        "password hash": password_hash,
        "hash digest": password_hash.rsplit("$", 1)[-1],
    }
    for secret in (PASSWORD, WRONG_PASSWORD):  # as AUTH PLAIN and LOGIN carry them
        forbidden[f"base64 {secret}"] = base64.b64encode(secret.encode()).decode()
        plain = base64.b64encode(f"\0crm\0{secret}".encode()).decode()
        forbidden[f"AUTH PLAIN {secret}"] = plain
    for what, secret in forbidden.items():
        assert secret not in everything, f"{what} in the log"
    assert_no_traceback(everything)


async def test_api_call_line_has_what_an_operator_greps_for(
    bridge: Any, sandbox: Sandbox, log_lines: Any
) -> None:
    async with bridge() as b:
        code, _ = await b.send(make_message("Fields"), ["bob@example.org"])
        assert code == 250
    lines = log_lines()
    [connect] = [line for line in lines if line["event"] == "connect"]
    [call] = [line for line in lines if line["event"] == "api_call"]
    [message] = [line for line in lines if line["event"] == "message"]
    assert call["queue_id"] == message["queue_id"]
    assert call["session"] == message["session"] == connect["session"]
    assert call["client"] == message["client"] == "127.0.0.1"
    assert (call["rcpt"], call["route"], call["template"]) == (
        "bob@example.org",
        "default",
        "E_GENERIC",
    )
    assert call["api_code"] == 200
    assert message["routes"] == ["default"]
    assert message["spooled"] == 0
    assert isinstance(call["latency_ms"], float)
    assert call["level"] == "info"


async def test_queue_mode_message_line_counts_the_spooled_recipients(
    bridge: Any, sandbox: Sandbox, log_lines: Any
) -> None:
    """One line a message in queue mode too: how many recipients the workers have."""
    async with bridge("delivery: {mode: queue}\n" + DEFAULT_ROUTES) as b:
        code, text = await b.send(make_message("Spooled"), ["a@example.org", "b@example.org"])
    queued = f"{replies.QUEUED.status} {replies.QUEUED.text} id="
    assert code == 250 and text.startswith(queued), text
    lines = log_lines()
    [message] = [line for line in lines if line["event"] == "message"]
    assert message["spooled"] == 2
    assert message["reply"] == f"250 {replies.QUEUED.status} {replies.QUEUED.text}"
    assert text == f"{queued}{message['queue_id']}"
    assert not [line for line in lines if line["event"] == "spooled"]


def _record(event: str, **fields: Any) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("smtp_bridge.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        log_event(logger, event, **fields)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_secret_fields_and_registered_values_are_redacted() -> None:
    forms = register_secrets(["registered-Secret-Value-42", 'quo"ted-secret', "short"])
    try:
        line = json.loads(
            _record(
                "x",
                app_key="k-1234567",
                password="p",
                note="echoed: registered-Secret-Value-42 back",
                quoted='a quo"ted-secret here',  # matched as JSON escapes it too
                word="short",  # too short to be registered: words would vanish from logs
            )
        )
    finally:
        unregister_secrets(forms)
    assert line["app_key"] == "***" and line["password"] == "***"
    assert line["note"] == "echoed: *** back"
    assert line["quoted"] == "a *** here"
    assert line["word"] == "short"
    # Unregistered (the bridge stopped): no longer scrubbed.
    after = json.loads(_record("x", note="registered-Secret-Value-42"))
    assert after["note"] == "registered-Secret-Value-42"


def test_log_context_binds_fields_inside_the_block_only() -> None:
    with log_context(session="s1", queue_id="Q1"):
        inside = json.loads(_record("inside", queue_id="Q2"))
    outside = json.loads(_record("outside"))
    assert (inside["session"], inside["queue_id"]) == ("s1", "Q2")  # explicit fields win
    assert "session" not in outside


def test_text_format_is_one_escaped_line() -> None:
    record = logging.LogRecord("smtp_bridge", logging.WARNING, __file__, 1, "evt", None, None)
    record.bridge_fields = {"subject": "a\r\nb\x1b[31m", "rcpt": "x@y"}
    text = TextFormatter().format(record)
    assert "\n" not in text and "\x1b" not in text
    assert text.split(" ", 2)[1:] == ["warning", "evt subject=a\\r\\nb\\x1b[31m rcpt=x@y"]


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_serve_log_format_and_level(tmp_path: Path, sandbox: Sandbox, fmt: str) -> None:
    path = write_config(tmp_path / "config.yaml", sandbox.url, await hash_password(PASSWORD))
    notify = NotifySocket()
    daemon = await Daemon.start(
        "serve", "--config", str(path), "--log-format", fmt, "--log-level", "warning",
        env=daemon_env(NOTIFY_SOCKET=notify.path),
    )  # fmt: skip
    try:
        ready, _ = await notify.wait("READY")
        path.write_text(path.read_text().replace("routes:", "routez:"))
        daemon.proc.send_signal(signal.SIGHUP)
        await notify.wait("READY", after=ready + 1)  # the reload was refused and logged
        assert await daemon.terminate() == 0
    finally:
        await daemon.close()
        notify.close()
    assert "listening" not in daemon.stderr  # info: below --log-level warning
    if fmt == "json":
        assert [e["event"] for e in daemon.events] == ["reload_refused"]
    else:
        [line] = daemon.lines
        assert " error reload_refused errors=" in line and not line.startswith("{"), line


def _old_json_line(record: logging.LogRecord) -> str:
    """JsonFormatter.format as it was before issue 15: json.dumps per line, _clean."""
    from smtp_bridge import logs

    line: dict[str, Any] = {
        "ts": round(record.created, 3),
        "level": record.levelname.lower(),
        "event": record.getMessage(),
    }
    line.update(logs._clean(getattr(record, "bridge_fields", {})))
    return logs._scrub(json.dumps(line, default=str, ensure_ascii=True, separators=(",", ":")))


_FIELD_VALUES = st.none() | st.text() | st.integers() | st.floats() | st.booleans()


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["ts", "level", "event", "rcpt", "password", "token", "x", "é\x1b"]),
        _FIELD_VALUES | st.lists(_FIELD_VALUES, max_size=3) | st.builds(Path, st.text()),
    ),
    st.text(),
)
def test_json_lines_are_the_bytes_json_dumps_gave(fields: dict[str, Any], event: str) -> None:
    forms = register_secrets(["registered-Secret-Value-42"])
    try:
        record = logging.LogRecord("smtp_bridge", logging.INFO, "", 0, event, (), None)
        record.bridge_fields = {**fields, "note": "registered-Secret-Value-42"}
        assert JsonFormatter().format(record) == _old_json_line(record)
    finally:
        unregister_secrets(forms)
