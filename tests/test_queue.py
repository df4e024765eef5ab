"""Queue mode (docs/guarantees.md): a 250 is a promise kept by the spool and its workers.

The real bridge on a loopback port, real SMTP clients, the real sandbox API
scripted to fail; ``smtp-bridge queue`` run as the operator would, against the
same state store while the daemon runs. Waits are on events (the sandbox's
request count, the worker's finished attempts), never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import json
import os
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from smtp_bridge import cli, replies
from smtp_bridge.outcomes import RecipientState
from smtp_bridge.policy import next_delay
from smtp_bridge.store import STATE_FILE
from smtp_bridge.store.sqlite import SQLiteStore as Store

#: Upper bound of any one wait; never a synchronisation sleep.
WAIT = 10.0

ROUTES = """
routes:
  - name: default
    template_id: "E_GENERIC"
    data: {subject: "{{ subject }}", body: "{{ text }}"}
"""
QUEUE = "delivery: {mode: queue, backoff: [50ms]}\n" + ROUTES
S = RecipientState


def make_message(subject: str = "Your order", size: int = 0, message_id: str = "") -> bytes:
    msg = EmailMessage()
    msg["From"] = "Shop <shop@example.com>"
    msg["To"] = "customers@example.org"
    msg["Subject"] = subject
    if message_id:
        msg["Message-ID"] = message_id
    msg.set_content("Thanks for your order.\n" + "x" * size)
    return msg.as_bytes(policy=email.policy.SMTP)


async def send(
    b: Any, message: bytes, rcpts: list[str], mail_from: str = "app@example.com"
) -> tuple[int, str]:
    """One message on a fresh connection: the DATA reply, refusals included."""
    async with b.client() as smtp:
        await smtp.ehlo()
        await smtp.mail(mail_from)
        for rcpt in rcpts:
            code, text = await smtp.rcpt(rcpt)
            assert code == 250, (rcpt, code, text)
        try:
            response = await smtp.data(message)
        except aiosmtplib.SMTPDataError as exc:
            return exc.code, exc.message
        return response.code, response.message


def queue_id_of(text: str) -> str:
    assert " id=" in text, text
    return text.rsplit(" id=", 1)[1]


async def attempts_done(b: Any, count: int) -> None:
    """Wait until the bridge's queue worker has finished ``count`` attempts."""
    async with asyncio.timeout(WAIT):
        await b.service.worker.wait_attempts(count)


async def spool_drained(b: Any) -> None:
    """Wait until nothing waits in the spool, looking again after each finished attempt."""
    worker = b.service.worker
    async with asyncio.timeout(WAIT):
        while True:
            # Counted before the look: an attempt that ends during it is not waited for.
            done = worker.attempts_done
            if not (await b.service.store.spool_stats()).depth:
                return
            await worker.wait_attempts(done + 1)


async def requests(b: Any, count: int) -> list[dict[str, Any]]:
    """Wait until the sandbox has had ``count`` requests; all of them, oldest first."""
    async with asyncio.timeout(WAIT):
        await b.sandbox.wait_sent(count)
    return list(reversed(b.sandbox.sent()))


async def record(b: Any, queue_id: str) -> tuple[Any, dict[str, Any]]:
    found = await b.service.store.get_message(queue_id)
    assert found is not None, queue_id
    message, rcpts = found
    return message, {r.rcpt: r for r in rcpts}


def write_config(tmp_path: Path, sandbox_url: str, delivery: str = "mode: queue") -> Path:
    """A config file naming the bridge fixture's state store, for ``smtp-bridge queue``."""
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent(f"""\
            api: {{url: {json.dumps(sandbox_url)}, app_key: k}}
            delivery: {{{delivery}, state_dir: {json.dumps(str(tmp_path / "state"))}}}
            admin: {{listen: null}}
            """)
        + ROUTES
    )
    return path


async def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``smtp-bridge ARGS`` in a thread (it runs its own event loop): (exit code, stdout)."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, list(args))
    return code, capsys.readouterr().out


# ---------------------------------------------------------------- delivery


async def test_queue_mode_answers_250_after_the_commit_and_delivers(bridge: Any) -> None:
    async with bridge(QUEUE) as b:
        code, text = await send(b, make_message("Spooled"), ["bob@example.org"])
        assert code == 250, text
        assert text.startswith(f"{replies.QUEUED.status} {replies.QUEUED.text} id=")
        queue_id = queue_id_of(text)
        # Committed before the 250: the spool has it, content and all.
        message, _ = await record(b, queue_id)
        assert message.mode == "queue"
        [sent] = await requests(b, 1)
        await attempts_done(b, 1)
        assert (sent["to"], sent["code"], sent["data"]["subject"]) == (
            "bob@example.org",
            200,
            "Spooled",
        )
        message, rcpts = await record(b, queue_id)
        assert rcpts["bob@example.org"].state is S.DELIVERED
        assert rcpts["bob@example.org"].attempts == 1
        assert message.content is None  # delivered: the body is not kept
        assert b.service.metrics.messages.labels(route="default", outcome="delivered")._value.get()


async def test_transient_failures_are_retried_with_backoff_until_delivered(bridge: Any) -> None:
    async with bridge(QUEUE) as b:
        b.sandbox.script({"status": 503, "times": 2})
        code, text = await send(b, make_message(), ["bob@example.org"])
        assert code == 250, text
        sent = await requests(b, 3)
        await attempts_done(b, 3)
        assert [r["code"] for r in sent] == [None, None, 200]  # 503, 503, then delivered
        _, rcpts = await record(b, queue_id_of(text))
        assert (rcpts["bob@example.org"].state, rcpts["bob@example.org"].attempts) == (
            S.DELIVERED,
            3,
        )


async def test_retry_after_is_honoured(bridge: Any) -> None:
    async with bridge(QUEUE) as b:
        b.sandbox.script({"status": 429, "headers": {"Retry-After": "1"}})
        loop = asyncio.get_running_loop()
        code, _ = await send(b, make_message(), ["bob@example.org"])
        assert code == 250
        await requests(b, 1)
        throttled_at = loop.time()
        await requests(b, 2)
        # 50ms of backoff, but the API asked for a second.
        assert loop.time() - throttled_at >= 0.9
        await attempts_done(b, 2)
        assert [r["code"] for r in b.delivered()] == [200]


async def test_unknown_outcome_is_sent_again(bridge: Any) -> None:
    async with bridge(QUEUE) as b:
        b.sandbox.script({"action": "reset"})
        code, text = await send(b, make_message(), ["bob@example.org"])
        assert code == 250
        await requests(b, 2)
        await attempts_done(b, 2)
        _, rcpts = await record(b, queue_id_of(text))
        assert rcpts["bob@example.org"].state is S.DELIVERED


async def test_multi_recipient_message_each_recipient_on_its_own(bridge: Any) -> None:
    async with bridge(QUEUE) as b:
        b.sandbox.script({"status": 503, "to": "carol@example.org"})
        code, text = await send(
            b, make_message(), ["alice@example.org", "bob@example.org", "carol@example.org"]
        )
        assert code == 250, text
        await requests(b, 4)
        await attempts_done(b, 4)
        assert sorted(r["to"] for r in b.delivered()) == [
            "alice@example.org",
            "bob@example.org",
            "carol@example.org",
        ]


async def test_max_age_makes_a_dead_letter(bridge: Any) -> None:
    config = "delivery: {mode: queue, backoff: [50ms], max_age: 0s}\n" + ROUTES
    async with bridge(config) as b:
        b.sandbox.script({"status": 503, "times": 5})
        code, text = await send(b, make_message(), ["bob@example.org"])
        assert code == 250
        await attempts_done(b, 1)
        _, rcpts = await record(b, queue_id_of(text))
        dead = rcpts["bob@example.org"]
        assert (dead.state, dead.attempts) == (S.DEAD, 1)
        assert len(b.sandbox.sent()) == 1


# ---------------------------------------------------------------- dead letters and the CLI


async def test_permanent_answer_is_a_dead_letter_and_queue_retry_sends_it_again(
    bridge: Any, tmp_path: Path, sandbox: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = write_config(tmp_path, sandbox.url)
    async with bridge(QUEUE) as b:
        b.sandbox.script({"code": 40005})
        code, text = await send(b, make_message("Dead"), ["bob@example.org"])
        assert code == 250, text  # the client was promised delivery ...
        queue_id = queue_id_of(text)
        await attempts_done(b, 1)
        _, rcpts = await record(b, queue_id)
        assert rcpts["bob@example.org"].state is S.DEAD  # ... so the failure is a dead letter

        code, out = await run_cli(capsys, "queue", "--config", str(config_path), "list", "--dead")
        assert code == 0
        assert queue_id in out and "bob@example.org" in out
        assert str(replies.BAD_RECIPIENT) in out
        assert "1 dead letters (1 messages)" in out
        code, out = await run_cli(capsys, "queue", "--config", str(config_path), "list")
        assert (code, out.strip()) == (0, "The spool is empty.")
        code, out = await run_cli(
            capsys, "queue", "--config", str(config_path), "show", queue_id, "--json"
        )
        shown = json.loads(out)
        assert shown["content_kept"] is True
        assert [(r["rcpt"], r["state"]) for r in shown["recipients"]] == [
            ("bob@example.org", "dead")
        ]

        # The operator fixed what was wrong; the daemon notices the retry by itself.
        code, out = await run_cli(capsys, "queue", "--config", str(config_path), "retry", queue_id)
        assert code == 0 and "1 recipients due" in out
        await attempts_done(b, 2)
        _, rcpts = await record(b, queue_id)
        assert rcpts["bob@example.org"].state is S.DELIVERED
        assert [r["code"] for r in reversed(b.sandbox.sent())] == [40005, 200]
        code, out = await run_cli(capsys, "queue", "--config", str(config_path), "list", "--dead")
        assert out.strip() == "No dead letters."


async def test_queue_retry_all_dead_and_purge(
    bridge: Any, tmp_path: Path, sandbox: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = write_config(tmp_path, sandbox.url)
    async with bridge(QUEUE) as b:
        b.sandbox.script({"code": 40008, "times": 3})
        ids = []
        for n in range(3):
            code, text = await send(b, make_message(f"m{n}"), [f"r{n}@example.org"])
            assert code == 250
            ids.append(queue_id_of(text))
        await attempts_done(b, 3)
        code, out = await run_cli(capsys, "queue", "--config", str(config_path), "purge", ids[0])
        assert code == 0 and f"{ids[0]}: purged (1 recipients)" in out
        assert await b.service.store.get_message(ids[0]) is None
        code, out = await run_cli(
            capsys, "queue", "--config", str(config_path), "retry", "--all-dead"
        )
        assert "2 recipients due" in out
        await attempts_done(b, 5)
        assert sorted(r["to"] for r in b.delivered()) == ["r1@example.org", "r2@example.org"]

        b.sandbox.script({"code": 40008})
        code, text = await send(b, make_message("again"), ["r9@example.org"])
        await attempts_done(b, 6)
        code, out = await run_cli(capsys, "queue", "--config", str(config_path), "purge", "--dead")
        assert "purged 1 dead letters" in out
        code, _ = await run_cli(capsys, "queue", "--config", str(config_path), "show", "NOPE")
        assert code == 1


async def test_failure_notice_goes_to_the_sender_but_never_to_a_null_sender(
    bridge: Any,
) -> None:
    config = "delivery: {mode: queue, backoff: [50ms], bounce_template_id: E_BOUNCE}\n" + ROUTES
    async with bridge(config) as b:
        b.sandbox.script(
            {"code": 40005, "to": "bob@example.org"}, {"code": 40005, "to": "carol@example.org"}
        )
        code, _ = await send(
            b, make_message("Invoice 42"), ["bob@example.org"], mail_from="billing@example.com"
        )
        assert code == 250
        code, _ = await send(b, make_message("Bounce me not"), ["carol@example.org"], "")
        assert code == 250
        # Two dead letters, one notice (to billing@), nothing for the null sender.
        await attempts_done(b, 3)
        notices = [r for r in b.sandbox.sent() if r["template_id"] == "E_BOUNCE"]
        assert len(notices) == 1
        [notice] = notices
        assert notice["to"] == "billing@example.com"
        assert notice["code"] == 200
        assert notice["data"] == {
            "recipient": "bob@example.org",
            "subject": "Invoice 42",
            "reason": str(replies.BAD_RECIPIENT),
        }
        assert (await b.service.store.counts())["dead"] == 2


# ---------------------------------------------------------------- store failures


async def limit_pages(b: Any, pages: int | None) -> None:
    """A deterministic full disk: the database may not grow past ``pages`` (None: now)."""

    def limit(conn: Any) -> None:
        (current,) = conn.execute("PRAGMA page_count").fetchone()
        conn.execute(f"PRAGMA max_page_count = {pages or current}")

    await b.service.store.writer.submit("test: disk full", limit, alone=True)


async def test_store_full_answers_451_never_250_and_recovers(bridge: Any) -> None:
    async with bridge(QUEUE) as b:
        await limit_pages(b, None)
        for n in range(3):
            code, text = await send(b, make_message(f"full {n}", size=100_000), ["bob@x.org"])
            assert code == 451, text
            assert text.split(" id=")[0] == f"{replies.INTERNAL.status} {replies.INTERNAL.text}"
        assert b.sandbox.sent() == []  # nothing is sent for mail the client still owns
        await limit_pages(b, 1_000_000)  # space again
        code, text = await send(b, make_message("after", size=100_000), ["bob@x.org"])
        assert code == 250, text
        await attempts_done(b, 1)
        assert [r["data"]["subject"] for r in b.delivered()] == ["after"]


@pytest.mark.parametrize("mode", ["queue", "hybrid", "direct"])
async def test_unwritable_store_answers_451_never_250(bridge: Any, mode: str) -> None:
    async with bridge(f"delivery: {{mode: {mode}, backoff: [50ms]}}\n" + ROUTES) as b:
        store = b.service.store
        await store.writer.submit("ro", lambda c: c.execute("PRAGMA query_only = ON"), alone=True)
        code, text = await send(b, make_message(), ["bob@example.org"])
        assert code == 451, text
        assert text.startswith(replies.INTERNAL.status)
        assert b.sandbox.sent() == []
        await store.writer.submit("rw", lambda c: c.execute("PRAGMA query_only = OFF"), alone=True)
        code, _ = await send(b, make_message(), ["bob@example.org"])
        assert code == 250
        await requests(b, 1)
        if mode == "queue":
            await attempts_done(b, 1)
        assert len(b.delivered()) == 1


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real, small filesystem at ``path``; skips the test where mounting is not allowed."""
    path.mkdir()
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("no mount(8) here: the tmpfs disk-full test needs it")
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to the last byte."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 1):
            with contextlib.suppress(OSError):  # ENOSPC: full at this granularity
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


async def test_full_tmpfs_answers_451_never_250_and_service_resumes(
    bridge: Any, tmp_path: Path
) -> None:
    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        config = f"delivery: {{mode: queue, state_dir: {json.dumps(str(disk))}}}\n" + ROUTES
        async with bridge(config) as b:
            code, _ = await send(b, make_message("before"), ["bob@example.org"])
            assert code == 250
            await attempts_done(b, 1)
            filler = fill(disk)
            accepted = 0
            for n in range(3):
                code, text = await send(b, make_message(f"full {n}", size=300_000), ["c@x.org"])
                assert code == 451, text  # never a 250 the disk cannot keep
                assert text.startswith(replies.INTERNAL.status)
            filler.unlink()
            for n in range(2):
                code, text = await send(b, make_message(f"after {n}", size=300_000), ["d@x.org"])
                assert code == 250, text
                accepted += 1
            await attempts_done(b, 1 + accepted)
            subjects = sorted(r["data"]["subject"] for r in b.delivered())
            assert subjects == ["after 0", "after 1", "before"]


async def test_queue_cli_without_a_store_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = write_config(tmp_path, "http://127.0.0.1:9/x")
    code = await asyncio.to_thread(cli.main, ["queue", "--config", str(config_path), "list"])
    assert code == 1
    assert "no state store" in capsys.readouterr().err
    assert not (tmp_path / "state" / STATE_FILE).exists()


async def test_spool_is_durable_across_a_restart(bridge: Any, tmp_path: Path) -> None:
    """Spooled and not yet delivered when the daemon stops: delivered by the next one."""
    stopping_fast = "smtp: {shutdown_timeout: 100ms}\n" + QUEUE
    async with bridge(stopping_fast) as b:
        b.sandbox.script({"action": "hang"})
        code, text = await send(b, make_message("kept"), ["bob@example.org"])
        assert code == 250
        await requests(b, 1)
        # The daemon stops with the call hanging: cancelled after the grace period.
    store = await Store.open(tmp_path / "state" / STATE_FILE)
    try:
        found = await store.get_message(queue_id_of(text))
        assert found is not None
        assert found[1][0].state in (S.UNKNOWN, S.RETRYING)
    finally:
        await store.close()
    async with bridge(QUEUE) as b:
        await attempts_done(b, 1)
        assert [r["data"]["subject"] for r in b.delivered()] == ["kept"]
        _, rcpts = await record(b, queue_id_of(text))
        assert rcpts["bob@example.org"].attempts == 2


def test_backoff_steps_repeat_the_last_with_jitter_and_retry_after() -> None:
    backoff = [30.0, 120.0, 600.0]
    middle = [next_delay(n, backoff, rand=lambda: 0.5) for n in (1, 2, 3, 4, 9)]
    assert middle == [30.0, 120.0, 600.0, 600.0, 600.0]
    assert next_delay(1, backoff, rand=lambda: 0.0) == pytest.approx(24.0)  # -20%
    assert next_delay(1, backoff, rand=lambda: 1.0) == pytest.approx(36.0)  # +20%
    assert next_delay(1, backoff, retry_after=500.0, rand=lambda: 0.5) == 500.0
    assert next_delay(3, backoff, retry_after=5.0, rand=lambda: 0.5) == 600.0
