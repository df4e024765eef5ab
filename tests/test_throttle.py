"""Trouble upstream (issue 13): slow down, never freeze (docs/guarantees.md; /readyz: docs/cli.md).

The real bridge against the real sandbox, scripted to answer HTTP 429 with or
without Retry-After for chosen recipients; real SMTP clients; /readyz and
/metrics read over HTTP. The breakers' clock is the test's (``ApiGate.clock``),
so "the pause is over" is a statement, not a sleep.

1. One 429 answers that recipient ``451 4.4.5`` and lowers the key's allowed
   concurrency; other mail is not refused. Only a run of 429s pauses the key.
2. A Retry-After is capped by ``api.max_retry_after``, with a warning.
3. Every change of a breaker's pause is logged, a failed probe's included.
4. /readyz: an open breaker is reported, not failed, in queue and hybrid mode;
   a full connection table fails it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from conftest import TEST_KEY
from test_admin import admin_of, scrape, value
from test_breaker import _line, refused_at_mail_from, send, use_clock
from test_queue import ROUTES, WAIT, attempts_done, queue_id_of, record, spool_drained

from smtp_bridge import replies
from smtp_bridge.breaker import THROTTLE_RUN
from smtp_bridge.outcomes import RecipientState

ADMIN = 'admin: {listen: "127.0.0.1:0"}\n'
CAROL = "carol@example.org"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=WAIT, trust_env=False) as client:
        yield client


CHANGES = ("breaker_opened", "breaker_reopened", "breaker_closed")


def events(log_lines: Any, *names: str) -> list[dict[str, Any]]:
    return [line for line in log_lines() if line["event"] in names]


async def allowed(http: httpx.AsyncClient, b: Any) -> float:
    """The default key's allowed concurrency, as /metrics shows it."""
    response = await http.get(f"http://{admin_of(b)}/metrics")
    assert TEST_KEY not in response.text  # the label is "default", never the key
    samples = await scrape(http, admin_of(b))
    return value(samples, "smtp_bridge_api_concurrency_limit", key="default")


# ---------------------------------------------------------------- 1. slower, not stop


async def test_one_429_answers_that_recipient_451_and_other_mail_keeps_flowing(
    bridge: Any, http: httpx.AsyncClient, log_lines: Any
) -> None:
    async with bridge(ADMIN + "api: {max_concurrency: 8}\n" + ROUTES) as b:
        use_clock(b)  # the clock stands still: nothing below waits for a pause to end
        assert await allowed(http, b) == 8
        b.sandbox.script({"to": CAROL, "status": 429})
        code, text = await send(b, "throttled", CAROL)
        assert (code, text.split(" id=")[0]) == (451, _line(replies.THROTTLED))
        assert not b.service.breaker_is_open()
        assert await allowed(http, b) == 4  # halved
        [throttled] = events(log_lines, "api_throttled")
        assert (throttled["key"], throttled["was"], throttled["limit"]) == ("default", 8, 4)

        # Unrelated mail, several at once: MAIL FROM taken, every message delivered.
        results = await asyncio.gather(*(send(b, f"m{n}", f"r{n}@example.org") for n in range(6)))
        assert [code for code, _ in results] == [250] * 6, results
        assert len(b.delivered()) == 6
        assert await allowed(http, b) == 5  # a round of 4 answers: one slot back
        assert events(log_lines, *CHANGES) == []
        assert TEST_KEY not in log_lines.text()


async def test_hybrid_spools_the_throttled_recipient_and_goes_on(bridge: Any) -> None:
    async with bridge("delivery: {mode: hybrid, backoff: [50ms]}\n" + ROUTES) as b:
        b.sandbox.script({"to": CAROL, "status": 429})
        code, text = await send(b, "throttled", CAROL)
        assert code == 250, text  # taken: spooled for a worker
        assert not b.service.breaker_is_open()
        assert (await send(b, "other", "bob@example.org"))[0] == 250
        await spool_drained(b)  # the worker's retry of carol is delivered
        assert sorted(r["to"] for r in b.delivered()) == ["bob@example.org", CAROL]


async def test_at_the_lowest_pace_mail_waits_for_the_slot_and_is_delivered(
    bridge: Any, http: httpx.AsyncClient
) -> None:
    async with bridge(ADMIN + "api: {max_concurrency: 2}\n" + ROUTES) as b:
        use_clock(b)
        b.sandbox.script({"to": CAROL, "status": 429})
        assert (await send(b, "throttled", CAROL))[0] == 451
        assert await allowed(http, b) == 1
        # Eight sessions at once through one slot: each waits its turn, none is refused.
        results = await asyncio.gather(*(send(b, f"m{n}", f"r{n}@example.org") for n in range(8)))
        assert [code for code, _ in results] == [250] * 8, results
        assert await allowed(http, b) == 2  # climbed back to api.max_concurrency


async def test_only_a_run_of_429s_pauses_the_key(bridge: Any, log_lines: Any) -> None:
    async with bridge("api: {breaker_interval: 30s}\n" + ROUTES) as b:
        clock = use_clock(b)
        b.sandbox.script({"to": CAROL, "status": 429, "times": THROTTLE_RUN})
        for n in range(THROTTLE_RUN):
            assert (await send(b, f"t{n}", CAROL))[0] == 451
            assert not b.service.breaker_is_open()
            # An answer without 429 in between: the run starts again.
            assert (await send(b, f"ok{n}", "bob@example.org"))[0] == 250
        # Three 429s in a row now (each sent after the pace had dropped): a pause.
        b.sandbox.script({"to": CAROL, "status": 429, "times": THROTTLE_RUN})
        for n in range(THROTTLE_RUN):
            code, text = await send(b, f"run{n}", CAROL)
            assert (code, text.split(" id=")[0]) == (451, _line(replies.THROTTLED))
        assert b.service.breaker_is_open()
        assert await refused_at_mail_from(b) == (451, _line(replies.THROTTLED))
        [opened] = events(log_lines, *CHANGES)
        assert (opened["event"], opened["cause"], opened["pause"]) == (
            "breaker_opened",
            "http_429",
            30,
        )
        clock.now += 30
        assert (await send(b, "probe", "bob@example.org"))[0] == 250
        assert not b.service.breaker_is_open()


# ---------------------------------------------------------------- 2. Retry-After, capped


@pytest.mark.parametrize("header", ["3600", "99999999999999999999"])
async def test_retry_after_is_capped_by_max_retry_after(
    bridge: Any, log_lines: Any, header: str
) -> None:
    async with bridge(ROUTES) as b:  # api.max_retry_after: the default, 5m
        clock = use_clock(b)
        b.sandbox.script({"to": CAROL, "status": 429, "headers": {"Retry-After": header}})
        code, text = await send(b, "slow down", CAROL)
        assert (code, text.split(" id=")[0]) == (451, _line(replies.THROTTLED))
        [capped] = events(log_lines, "retry_after_capped")
        assert capped["level"] == "warning"
        assert (capped["retry_after"], capped["used"]) == (min(float(header), 1e12), 300)
        assert b.service.breaker_is_open()  # a Retry-After pauses the key...
        assert b.service.worker.gate.retry_in(TEST_KEY) == 300  # ...for five minutes at most
        clock.now += 299
        assert (await refused_at_mail_from(b))[0] == 451
        clock.now += 1
        assert (await send(b, "after the pause", "bob@example.org"))[0] == 250


async def test_queue_mode_resumes_after_the_capped_pause(bridge: Any, log_lines: Any) -> None:
    config = "delivery: {mode: queue, backoff: [50ms]}\napi: {max_retry_after: 1s}\n" + ROUTES
    async with bridge(config) as b:
        b.sandbox.script({"status": 429, "headers": {"Retry-After": "3600"}})
        code, text = await send(b, "queued", "bob@example.org")
        assert code == 250
        await attempts_done(b, 1)
        _, rcpts = await record(b, queue_id_of(text))
        waiting = rcpts["bob@example.org"]
        assert waiting.state is RecipientState.RETRYING
        assert waiting.next_attempt is not None
        assert waiting.next_attempt <= time.time() + 1.0  # in a second, not an hour
        await spool_drained(b)  # the worker resumes after a second, not an hour
        assert [r["code"] for r in b.delivered()] == [200]
        assert events(log_lines, "retry_after_capped")[0]["used"] == 1


# ---------------------------------------------------------------- 3. every change logged


async def test_every_change_of_the_pause_is_logged(bridge: Any, log_lines: Any) -> None:
    config = "api: {breaker_failures: 1, breaker_interval: 30s}\n" + ROUTES
    async with bridge(config) as b:
        clock = use_clock(b)
        b.sandbox.script({"status": 503})
        assert (await send(b, "down", "bob@example.org"))[0] == 451
        clock.now += 30
        # The probe finds the API throttling and asking for two minutes.
        b.sandbox.script({"status": 429, "headers": {"Retry-After": "120"}})
        assert (await send(b, "probe 1", "bob@example.org"))[0] == 451
        assert b.service.breaker_is_open()
        clock.now += 120
        assert (await send(b, "probe 2", "bob@example.org"))[0] == 250
        changes = [
            (e["event"], e.get("cause"), e.get("pause"), e["key"])
            for e in events(log_lines, *CHANGES)
        ]
        assert changes == [
            ("breaker_opened", "http_503", 30, "default"),
            ("breaker_reopened", "http_429", 120, "default"),
            ("breaker_closed", None, None, "default"),
        ]
        reopened = events(log_lines, "breaker_reopened")[0]
        assert (reopened["level"], reopened["retry_in"]) == ("error", 120)


# ---------------------------------------------------------------- 4. readiness


@pytest.mark.parametrize("mode", ["queue", "hybrid"])
async def test_open_breaker_is_reported_but_queue_and_hybrid_stay_ready(
    bridge: Any, http: httpx.AsyncClient, mode: str
) -> None:
    config = ADMIN + f"delivery: {{mode: {mode}, backoff: [50ms]}}\n" + ROUTES
    async with bridge(config) as b:
        use_clock(b)
        b.sandbox.script({"code": 40007})  # balance exhausted: the breaker opens
        assert (await send(b, "m0", "bob@example.org"))[0] == 250
        if mode == "queue":
            await attempts_done(b, 1)
        assert b.service.breaker_is_open()
        assert (await send(b, "m1", "bob@example.org"))[0] == 250  # still taking mail
        ready = await http.get(f"http://{admin_of(b)}/readyz")
        body = ready.json()
        assert ready.status_code == 200, body
        assert (body["ready"], body["failed"], body["warnings"]) == (True, [], ["breaker"])
        assert body["checks"]["breaker"] == "open"
        samples = await scrape(http, admin_of(b))
        assert value(samples, "smtp_bridge_breaker_open") == 1


async def test_direct_mode_is_unready_while_the_breaker_is_open(
    bridge: Any, http: httpx.AsyncClient
) -> None:
    async with bridge(ADMIN + ROUTES) as b:
        use_clock(b)
        b.sandbox.script({"code": 40007})
        assert (await send(b, "m0", "bob@example.org"))[0] == 451
        ready = await http.get(f"http://{admin_of(b)}/readyz")
        assert ready.status_code == 503
        assert (ready.json()["failed"], ready.json()["warnings"]) == (["breaker"], [])


async def _open(b: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(b.host, b.port)


async def _line_of(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readline(), WAIT)


async def test_a_full_connection_table_makes_it_unready(
    bridge: Any, http: httpx.AsyncClient
) -> None:
    config = ADMIN + "smtp: {max_connections: 2, max_connections_per_ip: 10}\n" + ROUTES
    async with bridge(config) as b:
        conns = [await _open(b), await _open(b)]
        try:
            for reader, _ in conns:
                assert (await _line_of(reader)).startswith(b"220 ")
            ready = await http.get(f"http://{admin_of(b)}/readyz")
            body = ready.json()
            assert ready.status_code == 503, body
            assert (body["failed"], body["checks"]["connections"]) == (["connections"], "full")
            # What a load balancer would otherwise send here:
            reader, writer = await _open(b)
            try:
                assert (await _line_of(reader)).startswith(b"421 ")
            finally:
                writer.close()
                await writer.wait_closed()
        finally:
            for _, writer in conns:
                writer.close()
                await writer.wait_closed()
        async with asyncio.timeout(WAIT):
            await b.service.tracker.wait_empty()
        ready = await http.get(f"http://{admin_of(b)}/readyz")
        assert ready.status_code == 200, ready.json()
