"""Once means once: copies of a message never cause a second call, in every mode.

Each test drives the real daemon over SMTP against the sandbox API and counts
the calls the API received; store failures are real (SQLite refuses to grow).
"""

from __future__ import annotations

import asyncio
import email.policy
from collections import Counter
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import pytest

from smtp_bridge import replies
from smtp_bridge.outcomes import RecipientState
from smtp_bridge.sandbox import Sandbox

S = RecipientState
#: Upper bound of any one wait; never a synchronisation sleep.
WAIT = 15.0
A, B = "alice@example.org", "bob@example.org"
ROUTES = """
routes:
  - name: default
    template_id: "E_GENERIC"
    data: {subject: "{{ subject }}", body: "{{ text }}"}
"""


def config(delivery: str) -> str:
    return f"delivery: {{{delivery}}}\n" + ROUTES


def make_message(message_id: str | None = "<once@example.com>", body: str = "Hello.") -> bytes:
    msg = EmailMessage()
    msg["From"] = "Shop <shop@example.com>"
    msg["To"] = "customers@example.org"
    msg["Subject"] = "Your order"
    if message_id:
        msg["Message-ID"] = message_id
    msg.set_content(body)
    return msg.as_bytes(policy=email.policy.SMTP)


async def send(b: Any, message: bytes, rcpts: list[str]) -> tuple[int, str]:
    """One message on a fresh connection: the DATA reply (code, text)."""
    async with b.client() as smtp:
        await smtp.ehlo()
        await smtp.mail("app@example.com")
        for rcpt in rcpts:
            await smtp.rcpt(rcpt)
        try:
            response = await smtp.data(message)
        except aiosmtplib.SMTPDataError as exc:
            return exc.code, exc.message
        return response.code, response.message


def text_of(reply: replies.Reply) -> str:
    return f"{reply.status} {reply.text}"


def calls(sandbox: Sandbox, code: int | None = None) -> Counter[str]:
    return Counter(r["to"] for r in sandbox.sent() if code is None or r["code"] == code)


def events(log_lines: Any, name: str) -> list[dict[str, Any]]:
    return [e for e in log_lines() if e.get("event") == name]


async def spool_drained(b: Any) -> None:
    worker = b.service.worker
    async with asyncio.timeout(WAIT):
        while True:
            # Counted before the look: an attempt that ends during it is not waited for.
            done = worker.attempts_done
            if not (await b.service.store.spool_stats()).depth:
                return
            await worker.wait_attempts(done + 1)


async def states(b: Any, queue_id: str) -> dict[str, RecipientState]:
    found = await b.service.store.get_message(queue_id)
    assert found is not None
    return {r.rcpt: r.state for r in found[1]}


def queue_id_of(text: str) -> str:
    return text.rsplit(" id=", 1)[1]


async def refuse_writes(b: Any, refuse: bool) -> None:
    """The store's writer refuses every write (SQLite's query_only), or takes them again."""
    pragma = f"PRAGMA query_only = {'ON' if refuse else 'OFF'}"
    await b.service.store.writer.submit("test: read-only", lambda c: c.execute(pragma), alone=True)


# --- queue mode: a resubmitted message -----------------------------------------------


async def test_queue_mode_copy_sent_back_to_back_is_already_queued(bridge: Any) -> None:
    message = make_message()
    async with Sandbox(latency=0.3) as slow, bridge(config("mode: queue"), api_url=slow.url) as b:
        code1, text1 = await send(b, message, [A, B])
        code2, text2 = await send(b, message, [A, B])
        assert code1 == 250 and text1.startswith(text_of(replies.QUEUED)), text1
        assert code2 == 250 and text2.startswith(text_of(replies.ALREADY_QUEUED)), text2
        await spool_drained(b)
        assert await states(b, queue_id_of(text2)) == {A: S.DUPLICATE, B: S.DUPLICATE}
    assert calls(slow) == {A: 1, B: 1}


async def test_queue_mode_copy_sent_during_the_call_is_already_queued(bridge: Any) -> None:
    message = make_message()
    async with Sandbox(latency=0.5) as slow, bridge(config("mode: queue"), api_url=slow.url) as b:
        assert (await send(b, message, [A]))[0] == 250
        await slow.wait_sent(1)  # the worker's call is at the API, unanswered
        code, text = await send(b, message, [A])
        assert code == 250 and text.startswith(text_of(replies.ALREADY_QUEUED)), text
        await spool_drained(b)
    assert calls(slow) == {A: 1}


async def test_queue_mode_copies_across_an_outage_are_sent_once(bridge: Any) -> None:
    message = make_message()
    async with bridge(config("mode: queue, backoff: [50ms]")) as b:
        b.sandbox.script({"status": 503, "times": 3})
        first = await send(b, message, [A])
        await b.sandbox.wait_sent(1)
        copies = [await send(b, message, [A]) for _ in range(3)]
        assert first[0] == 250
        assert all(c[0] == 250 and c[1].startswith(text_of(replies.ALREADY_QUEUED)) for c in copies)
        await spool_drained(b)
    assert calls(b.sandbox, 200) == {A: 1}


# --- a store write that fails after the API accepted ----------------------------------


async def test_worker_outcome_write_fails_then_lands_and_is_never_resent(
    bridge: Any, log_lines: Any
) -> None:
    message = make_message()
    async with Sandbox(latency=0.5) as slow, bridge(config("mode: queue"), api_url=slow.url) as b:
        assert (await send(b, message, [A]))[0] == 250
        await slow.wait_sent(1)
        await refuse_writes(b, True)  # the attempt's end cannot be written
        async with asyncio.timeout(WAIT):
            while not events(log_lines, "store_error"):
                await asyncio.sleep(0.05)
        await refuse_writes(b, False)  # writable again: the retried write lands
        await spool_drained(b)
        # Resent by the client meanwhile or later: already delivered, no call.
        code, text = await send(b, message, [A])
        assert code == 250 and text.startswith(text_of(replies.ALREADY_DELIVERED)), text
    assert calls(slow) == {A: 1}
    assert [e["event"] for e in log_lines() if e["event"] in ("store_error", "delivered")][-1] == (
        "delivered"
    )
    assert not events(log_lines, "possible_duplicate")


async def test_direct_outcome_write_fails_client_retry_skips_the_delivered(
    bridge: Any, log_lines: Any
) -> None:
    message = make_message()
    async with Sandbox(latency=0.5) as slow, bridge(config("mode: direct"), api_url=slow.url) as b:
        slow.script({"status": 503, "to": B})

        async def fill_disk_once_both_calls_are_out() -> None:
            await slow.wait_sent(2)
            await refuse_writes(b, True)

        filler = asyncio.create_task(fill_disk_once_both_calls_are_out())
        code, text = await send(b, message, [A, B])
        await filler
        assert code == 451, text  # B failed, and nothing could be written
        await refuse_writes(b, False)
        code, text = await send(b, message, [A, B])
        assert code == 250, text
    # A was delivered by the first try and never sent again; B twice (503, then 200).
    assert calls(slow) == {A: 1, B: 2}
    assert calls(slow, 200) == {A: 1, B: 1}
    assert events(log_lines, "store_error")  # the first outcome write really failed
    assert events(log_lines, "outcome_recorded_late")  # ... and was retried until it landed
    assert not [e for e in events(log_lines, "possible_duplicate") if e["rcpt"] == A]


# --- the dedup key: retries, not reused Message-IDs -------------------------------------


async def test_reused_message_id_with_other_content_is_a_new_message(
    bridge: Any, log_lines: Any
) -> None:
    async with bridge(config("mode: direct")) as b:
        first = await send(b, make_message("<alert@app>", body="Disk 91% full"), [A])
        second = await send(b, make_message("<alert@app>", body="Disk 99% full"), [A])
        assert first[0] == second[0] == 250
        assert second[1].startswith(text_of(replies.OK)), second[1]
    assert calls(b.sandbox, 200) == {A: 2}
    (reused,) = events(log_lines, "message_id_reused")
    assert reused["previous_queue_id"] == queue_id_of(first[1])
    assert reused["queue_id"] == queue_id_of(second[1])


async def test_relay_trace_headers_do_not_make_a_retry_new(bridge: Any) -> None:
    message = make_message("<relayed@app>")
    relayed = b"Received: from mta.example.net by relay; Mon, 1 Jan 2024\r\n" + message
    async with bridge(config("mode: direct")) as b:
        assert (await send(b, message, [A]))[0] == 250
        code, text = await send(b, relayed, [A])
        assert code == 250 and text.startswith(text_of(replies.ALREADY_DELIVERED)), text
    assert calls(b.sandbox) == {A: 1}


@pytest.mark.parametrize(
    ("window", "sent"), [("1h", 1), ("0s", 2)], ids=["within-window", "window-off"]
)
async def test_identical_messages_without_message_id_dedup_only_within_the_window(
    bridge: Any, window: str, sent: int
) -> None:
    alert = make_message(None, body="Backup failed")
    async with bridge(config(f"mode: direct, anonymous_dedup_ttl: {window}")) as b:
        assert (await send(b, alert, [A]))[0] == 250
        code, text = await send(b, alert, [A])
        assert code == 250, text
    assert calls(b.sandbox) == {A: sent}


# --- several sessions at once ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["direct", "hybrid", "queue"])
async def test_copies_sent_at_once_are_sent_once(bridge: Any, mode: str) -> None:
    message = make_message(f"<race-{mode}@app>")
    async with Sandbox(latency=0.2) as slow, bridge(config(f"mode: {mode}"), api_url=slow.url) as b:
        results = await asyncio.gather(*(send(b, message, [A, B]) for _ in range(5)))
        assert [code for code, _ in results] == [250] * 5, results
        if mode != "direct":
            await spool_drained(b)
    assert calls(slow) == {A: 1, B: 1}
