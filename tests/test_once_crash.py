"""A call cut by ``kill -9`` in direct and hybrid mode: settled at the next start, and
the client's retry sends it again only as a logged possible duplicate naming both ids."""

from __future__ import annotations

import asyncio
import json
import signal
import textwrap
from pathlib import Path

import aiosmtplib
import pytest
from test_daemon import WAIT, Daemon
from test_once import A, make_message

from smtp_bridge.outcomes import RecipientState
from smtp_bridge.sandbox import Sandbox
from smtp_bridge.store import STATE_FILE
from smtp_bridge.store.sqlite import SQLiteStore


def config(path: Path, state_dir: Path, api_url: str, mode: str) -> Path:
    path.write_text(
        textwrap.dedent(f"""\
            smtp: {{listen: ["127.0.0.1:0"], hostname: bridge.test}}
            api: {{url: {json.dumps(api_url)}, app_key: crash-key, timeout: 5s}}
            delivery: {{mode: {mode}, state_dir: {json.dumps(str(state_dir))}}}
            admin: {{listen: null}}
            routes:
              - name: default
                template_id: "E_GENERIC"
                data: {{subject: "{{{{ subject }}}}"}}
            """)
    )
    return path


async def start_transaction(port: int, message: bytes) -> aiosmtplib.SMTP:
    """A client whose DATA is on its way; the reply is never read (the daemon dies)."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=WAIT)
    await smtp.connect()
    await smtp.ehlo()
    await smtp.mail("app@example.com")
    await smtp.rcpt(A)
    return smtp


@pytest.mark.parametrize("mode", ["direct", "hybrid"])
async def test_call_cut_by_kill_is_settled_and_resent_as_logged_possible_duplicate(
    tmp_path: Path, mode: str
) -> None:
    message = make_message(f"<cut-{mode}@app>")
    state = tmp_path / "state"
    async with Sandbox(latency=3.0) as slow:
        path = config(tmp_path / "config.yaml", state, slow.url, mode)
        first = await Daemon.start("serve", "--config", str(path))
        try:
            smtp = await start_transaction(await first.port(), message)
            sending = asyncio.ensure_future(smtp.data(message))
            await slow.wait_sent(1)  # the call is at the API, its answer 3 s away
            first.proc.send_signal(signal.SIGKILL)
            await first.wait()
            with pytest.raises((aiosmtplib.SMTPException, OSError)):
                await sending
            smtp.close()
        finally:
            if first.proc.returncode is None:
                first.proc.kill()
        second = await Daemon.start("serve", "--config", str(path))
        try:
            port = await second.port()
            # Settled at start: the cut call is UNKNOWN, not retrying forever.
            _, settled = await second.wait_event("spool_recovered")
            assert settled["recipients"] >= 1
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=WAIT) as retry:
                refused, reply = await retry.sendmail("app@example.com", [A], message)
            assert refused == {} and reply.startswith("2.0.0 Ok"), reply
            _, duplicate = await second.wait_event("possible_duplicate")
        finally:
            second.proc.send_signal(signal.SIGTERM)
            await second.wait()
    assert duplicate["rcpt"] == A
    assert duplicate["previous_queue_id"] != duplicate["queue_id"]
    store = await SQLiteStore.open(state / STATE_FILE)
    try:
        cut = await store.get_message(duplicate["previous_queue_id"])
    finally:
        await store.close()
    assert cut is not None
    assert [(r.rcpt, r.state) for r in cut[1]] == [(A, RecipientState.UNKNOWN)]
    assert len(slow.sent()) == 2  # the cut call, and the retry's: at least once, logged
