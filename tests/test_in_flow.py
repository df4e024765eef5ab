"""Queue mode's ``delivery.in_flow_delay``: acceptance keeps to the workers' pace.

The token gate alone (:class:`smtp_bridge.flow.InFlow`), then the real bridge on
a loopback port against the sandbox API scripted to hang, so the workers are
busy and no token comes back until the test lets one. Waits are on events (the
gate's count of delayed admissions, the sandbox's request count, the worker's
finished attempts), never on sleeps; durations are never asserted.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import make_config_text

from smtp_bridge import replies
from smtp_bridge.config import ConfigError, parse_config
from smtp_bridge.flow import InFlow
from smtp_bridge.store import STATE_FILE
from smtp_bridge.store.sqlite import SQLiteStore as Store

#: Upper bound of any one wait; never a synchronisation sleep.
WAIT = 10.0
#: An in_flow_delay no test waits out: reaching it is a failure (WAIT fires first).
LONG = "25s"

ROUTES = """
routes:
  - name: default
    template_id: "E_GENERIC"
    data: {subject: "{{ subject }}", body: "{{ text }}"}
"""


def queue_config(in_flow_delay: str = LONG, *, grace: str = "100ms", api: str = "") -> str:
    """Queue mode, two worker slots, API calls that outlast any test (cut at
    shutdown after ``grace``)."""
    return (
        f"smtp: {{timeout: 30s, shutdown_timeout: {grace}}}\n"
        f"api: {{max_concurrency: 2, timeout: 25s{api}}}\n"
        f"delivery: {{mode: queue, backoff: [50ms], in_flow_delay: {in_flow_delay}}}\n" + ROUTES
    )


def message(subject: str) -> bytes:
    return f"From: app@example.com\r\nSubject: {subject}\r\n\r\nHello.\r\n".encode()


async def send(b: Any, subject: str, rcpt: str = "bob@example.org") -> tuple[int, str]:
    """One message on a fresh connection: the DATA reply. No QUIT: at shutdown the
    session ends right after that reply."""
    smtp = b.client(timeout=2 * WAIT)
    await smtp.connect()
    try:
        await smtp.ehlo()
        await smtp.mail("app@example.com")
        await smtp.rcpt(rcpt)
        response = await smtp.data(message(subject))
        return response.code, response.message
    finally:
        smtp.close()


async def requests(b: Any, count: int) -> None:
    async with asyncio.timeout(WAIT):
        await b.sandbox.wait_sent(count)


async def delayed(flow: InFlow, count: int) -> None:
    async with asyncio.timeout(WAIT):
        await flow.wait_delayed(count)


async def busy_workers(b: Any) -> InFlow:
    """Two messages accepted whose calls hang: both worker slots taken (and, with
    an in_flow_delay, no token left)."""
    b.sandbox.script({"action": "hang"}, {"action": "hang"})
    for subject in ("first", "second"):
        code, text = await send(b, subject)
        assert code == 250, text
    await requests(b, 2)
    assert b.service.worker.in_flight == 2
    flow: InFlow = b.service.delivery.flow
    return flow


def queue_id_of(text: str) -> str:
    return text.rsplit(" id=", 1)[1]


# ---------------------------------------------------------------- the gate alone


def gate(capacity: int = 2, delivering: bool = True) -> InFlow:
    flow = InFlow()
    flow.attach(lambda: delivering, capacity)
    return flow


async def take(flow: InFlow, delay: float = 60.0, *, keep: bool = True) -> bool:
    """One admission through the gate: did it hold a token?"""
    async with asyncio.timeout(WAIT), flow.admit(delay) as admission:
        if keep:
            admission.keep()
        return admission.held


async def test_admission_takes_a_token_and_attempts_give_back_never_above_capacity() -> None:
    flow = gate(2)
    assert await take(flow) is True
    assert await take(flow) is True
    assert flow.tokens == 0
    flow.give()
    assert flow.tokens == 1
    for _ in range(5):
        flow.give()
    assert flow.tokens == 2


@pytest.mark.parametrize("end", ["nothing spooled", "error"])
async def test_admission_not_kept_gives_its_token_back(end: str) -> None:
    flow = gate(2)
    if end == "nothing spooled":
        assert await take(flow, keep=False) is True
    else:
        with pytest.raises(RuntimeError):
            async with flow.admit(60.0):
                assert flow.tokens == 1
                raise RuntimeError("store error")
    assert (flow.tokens, flow.pending, flow.finished) == (2, 0, 1)


async def test_without_a_token_the_wait_ends_when_an_attempt_gives_one_back() -> None:
    flow = gate(1)
    assert await take(flow) is True
    waiting = asyncio.create_task(take(flow))
    await delayed(flow, 1)
    assert not waiting.done() and flow.waiting == 1
    flow.give()
    assert await waiting is True  # the token went to the waiter, not to the pool
    assert (flow.tokens, flow.waiting) == (0, 0)


async def test_waiters_are_served_in_arrival_order() -> None:
    flow = gate(1)
    await take(flow)
    first = asyncio.create_task(take(flow))
    await delayed(flow, 1)
    second = asyncio.create_task(take(flow))
    await delayed(flow, 2)
    flow.give()
    assert await first is True
    assert not second.done()
    flow.give()
    assert await second is True


async def test_without_a_token_the_wait_ends_at_the_delay_and_accepts_anyway() -> None:
    flow = gate(1)
    await take(flow)
    assert await take(flow, delay=0.01) is False  # went on without a token
    assert (flow.delayed, flow.tokens, flow.waiting) == (1, 0, 0)
    flow.give()
    assert flow.tokens == 1  # nothing owed for the admission that went on


@pytest.mark.parametrize(
    "setup",
    ["paused", "no worker", "detached", "delay 0"],
)
async def test_no_wait_while_nobody_delivers_or_when_disabled(setup: str) -> None:
    flow = gate(1, delivering=setup != "paused")
    await take(flow)
    if setup == "no worker":
        flow = InFlow(1)
    elif setup == "detached":
        flow.detach()
    delay = 0.0 if setup == "delay 0" else 60.0
    assert await take(flow, delay) is False  # at once: asyncio.timeout(WAIT) never fires
    assert flow.delayed == 0


async def test_paused_admissions_leave_the_tokens_alone() -> None:
    delivering = True
    flow = InFlow()
    flow.attach(lambda: delivering, 2)
    delivering = False
    assert await take(flow) is False
    assert flow.tokens == 2


@pytest.mark.parametrize("how", ["release_all", "detach"])
async def test_waiters_go_on_when_the_workers_pause_or_stop(how: str) -> None:
    flow = gate(1)
    await take(flow)
    waiters = [asyncio.create_task(take(flow)) for _ in range(2)]
    await delayed(flow, 2)
    getattr(flow, how)()
    assert [await w for w in waiters] == [False, False]
    assert flow.tokens == 0


async def test_a_cancelled_wait_loses_no_token() -> None:
    flow = gate(1)
    await take(flow)
    waiting = asyncio.create_task(take(flow))
    await delayed(flow, 1)
    flow.give()  # handed to the waiter ...
    waiting.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert (flow.tokens, flow.pending) == (1, 0)
    cancelled = asyncio.create_task(take(flow, keep=False))
    await take(flow)  # takes the token back; the next one waits
    await delayed(flow, 2)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    flow.give()
    assert flow.tokens == 1  # not handed to the cancelled waiter


async def test_resize_moves_tokens_by_the_difference_and_serves_waiters() -> None:
    flow = gate(2)
    await take(flow)
    await take(flow)
    waiting = asyncio.create_task(take(flow))
    await delayed(flow, 1)
    flow.resize(3)  # one more slot: one more token, straight to the waiter
    assert await waiting is True
    assert (flow.capacity, flow.tokens) == (3, 0)
    flow.resize(1)
    assert flow.tokens == 0
    flow.give()
    flow.give()
    assert flow.tokens == 1


async def test_top_up_raises_to_the_idle_slots_never_lowers_never_above_capacity() -> None:
    flow = gate(4)
    for _ in range(4):
        await take(flow)
    flow.top_up(2, flow.finished)
    assert flow.tokens == 2
    flow.top_up(1, flow.finished)
    assert flow.tokens == 2
    flow.top_up(9, flow.finished)
    assert flow.tokens == 4


async def test_top_up_counts_admissions_the_workers_may_not_have_seen() -> None:
    flow = gate(4)
    for _ in range(4):
        await take(flow)
    before = flow.finished  # the workers look at the spool ...
    await take(flow, delay=0.01)  # ... while one more message is admitted and committed
    flow.top_up(3, before)
    assert flow.tokens == 2


# ---------------------------------------------------------------- config


def parse(body: str) -> Any:
    return parse_config(body + ROUTES, filename="c.yaml", env={})


def test_config_default_units_and_zero() -> None:
    assert parse("").delivery.in_flow_delay == 1.0
    assert parse("delivery: {in_flow_delay: 250ms}").delivery.in_flow_delay == 0.25
    assert parse("delivery: {in_flow_delay: 0}").delivery.in_flow_delay == 0.0


@pytest.mark.parametrize(
    ("body", "line", "words"),
    [
        ("delivery:\n  in_flow_delay: soon\n", 2, "expected a duration"),
        ("delivery:\n  in_flow_delay: -1\n", 2, "negative"),
        (
            "smtp:\n  timeout: 5s\napi:\n  timeout: 1s\ndelivery:\n  mode: queue\n"
            "  in_flow_delay: 5s\n",
            7,
            "shorter than smtp.timeout (5s)",
        ),
    ],
    ids=["not a duration", "negative", "not shorter than smtp.timeout"],
)
def test_config_errors_name_the_key(body: str, line: int, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(body)
    [issue] = caught.value.issues
    assert (issue.path, issue.line) == ("delivery.in_flow_delay", line)
    assert words in issue.message


def test_config_smtp_timeout_check_is_for_queue_mode_only() -> None:
    config = parse("smtp: {timeout: 300ms}\napi: {timeout: 200ms}\n")
    assert config.delivery.in_flow_delay == 1.0


# ---------------------------------------------------------------- the real bridge


async def test_no_token_holds_the_250_until_an_attempt_finishes(bridge: Any) -> None:
    async with bridge(queue_config()) as b:
        flow = await busy_workers(b)
        assert flow.tokens == 0
        worker = b.service.worker
        third = asyncio.create_task(send(b, "third"))
        await delayed(flow, 1)
        assert not third.done()  # the client waits after DATA ...
        assert worker.attempts_done == 0
        await b.sandbox.stop()  # ... until the hanging calls end (reset: outcome unknown)
        async with asyncio.timeout(WAIT):
            code, text = await third
        assert code == 250, text
        assert worker.attempts_done >= 1
        assert flow.delayed == 1
        found = await b.service.store.get_message(queue_id_of(text))
        assert found is not None and found[0].content == message("third")  # committed


async def test_every_finished_attempt_gives_its_token_back_failures_included(
    bridge: Any,
) -> None:
    # The first failure opens the breaker, so no idle top-up can refill the tokens.
    async with bridge(queue_config(api=", breaker_failures: 1, breaker_interval: 1h")) as b:
        flow = await busy_workers(b)
        assert flow.tokens == 0
        await b.sandbox.stop()  # both hanging calls end in a reset: outcome unknown
        async with asyncio.timeout(WAIT):
            await b.service.worker.wait_attempts(2)
        assert b.service.delivery.gate.is_open()
        assert flow.tokens == 2


async def test_waiting_messages_go_on_when_the_breaker_opens(bridge: Any) -> None:
    async with bridge(queue_config(api=", breaker_failures: 1, breaker_interval: 1h")) as b:
        flow = await busy_workers(b)
        waiting = [asyncio.create_task(send(b, f"waits {n}")) for n in range(3)]
        await delayed(flow, 3)
        await b.sandbox.stop()  # two tokens come back, and the breaker opens
        async with asyncio.timeout(WAIT):  # in_flow_delay is 25s
            results = await asyncio.gather(*waiting)
        assert [code for code, _ in results] == [250, 250, 250]
        assert b.service.delivery.gate.is_open()


async def test_in_flow_delay_0_accepts_at_once(bridge: Any) -> None:
    async with bridge(queue_config("0")) as b:
        flow = await busy_workers(b)
        async with asyncio.timeout(WAIT):
            for subject in ("third", "fourth"):  # more messages than worker slots
                code, text = await send(b, subject)
                assert code == 250, text
        assert b.service.worker.attempts_done == 0  # both calls still hang
        assert flow.delayed == 0


async def test_the_wait_is_bounded_then_the_mail_is_accepted_anyway(bridge: Any) -> None:
    async with bridge(queue_config("200ms")) as b:
        flow = await busy_workers(b)
        assert flow.tokens == 0
        async with asyncio.timeout(WAIT):
            code, text = await send(b, "third")
        assert code == 250, text
        assert text.startswith(f"{replies.QUEUED.status} {replies.QUEUED.text} id=")
        assert flow.delayed == 1  # it waited ...
        assert b.service.worker.attempts_done == 0  # ... and no token came back


async def test_breaker_open_the_spool_takes_mail_at_full_speed(bridge: Any) -> None:
    async with bridge(queue_config(api=", breaker_interval: 1h")) as b:
        b.sandbox.script({"code": 40007})  # balance exhausted: opens the breaker
        code, _ = await send(b, "opens it")
        assert code == 250
        async with asyncio.timeout(WAIT):
            await b.service.worker.wait_attempts(1)
        assert b.service.delivery.gate.is_open()
        flow: InFlow = b.service.delivery.flow
        worker = b.service.worker
        steps = 0
        step = worker._step

        async def counted() -> float | None:
            nonlocal steps
            steps += 1
            return await step()

        worker._step = counted
        async with asyncio.timeout(WAIT):  # in_flow_delay is 25s
            for n in range(4):  # more than the two tokens
                code, text = await send(b, f"outage {n}")
                assert code == 250, text
        assert flow.delayed == 0
        assert len(b.sandbox.sent()) == 1  # the workers paused: nothing else was sent
        # Nor did the spooled mail wake them to look (1h pause); one look the
        # attempt's end may still have owed when the count began.
        assert steps <= 1, steps


async def test_hybrid_mode_sessions_never_come_to_the_gate(bridge: Any) -> None:
    body = "api: {max_concurrency: 2}\ndelivery: {mode: hybrid, in_flow_delay: 25s}\n" + ROUTES
    async with bridge(body) as b:
        flow: InFlow = b.service.delivery.flow
        async with asyncio.timeout(WAIT):  # in_flow_delay is 25s
            for n in range(2):
                code, text = await send(b, f"hybrid {n}")
                assert code == 250, text
        assert len(b.delivered()) == 2  # delivered in the session, no worker attempt
        assert (flow.admitted, flow.delayed) == (0, 0)


async def test_reload_applies_in_flow_delay_to_new_sessions(bridge: Any, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    async with bridge(queue_config(), config_file=path) as b:
        flow = await busy_workers(b)
        assert flow.tokens == 0
        path.write_text(make_config_text(tmp_path, b.sandbox.url, queue_config("0")))
        assert await b.service.reload()
        async with asyncio.timeout(WAIT):
            code, text = await send(b, "after reload")
        assert code == 250, text
        assert flow.delayed == 0


async def test_sigterm_does_not_wait_out_the_gate_and_commits_the_waiting_message(
    bridge: Any, tmp_path: Path
) -> None:
    async with asyncio.timeout(WAIT):  # in_flow_delay is 25s
        async with bridge(queue_config(grace="2s")) as b:
            flow = await busy_workers(b)
            third = asyncio.create_task(send(b, "third"))
            await delayed(flow, 1)
            assert not third.done()
        # The bridge has stopped (the fixture's shutdown ran).
        code, text = await third
    assert code == 250, text
    store = await Store.open(tmp_path / "state" / STATE_FILE)
    try:
        found = await store.get_message(queue_id_of(text))
        assert found is not None
        assert found[0].content == message("third")
    finally:
        await store.close()
