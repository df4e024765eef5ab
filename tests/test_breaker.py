"""The API circuit breaker and the rate limit (docs/guarantees.md (breaker and rate limit)).

The policy on its own with the time passed in, then the real bridge against
the real sandbox: direct mode refuses at MAIL FROM while the breaker is open
and calls nothing; queue and hybrid modes keep answering 250 through an API
outage and deliver everything once it is back. The breaker's clock is the
test's (``ApiGate.clock``), so "the interval has passed" is a statement, not
a sleep.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import aiosmtplib
import httpx
import pytest
from test_queue import ROUTES, attempts_done, make_message, requests, spool_drained

from smtp_bridge import replies
from smtp_bridge.breaker import (
    THROTTLE_RUN,
    Breaker,
    Breakers,
    BreakerState,
    Transition,
    cap_retry_after,
)
from smtp_bridge.outcomes import ApiResult, ResultKind
from smtp_bridge.ratelimit import RateLimiter, TokenBucket

OK = ApiResult(ResultKind.API, code=200)
BALANCE = ApiResult(ResultKind.API, code=40007)
BAD_KEY = ApiResult(ResultKind.API, code=40002)
BAD_RCPT = ApiResult(ResultKind.API, code=40005)
DOWN = ApiResult(ResultKind.HTTP, http_status=503)
REFUSED = ApiResult(ResultKind.NEVER_SENT)
UNKNOWN = ApiResult(ResultKind.UNKNOWN)


def answer(breaker: Breaker, result: ApiResult, now: float) -> Transition:
    ticket = breaker.admit(now)
    assert ticket is not None
    return breaker.record(ticket, result, replies.reply_for(result), now)


# ---------------------------------------------------------------- the policy


@pytest.mark.parametrize("result", [BALANCE, BAD_KEY, ApiResult(ResultKind.API, code=40001)])
def test_key_and_balance_answers_open_at_once(result: ApiResult) -> None:
    breaker = Breaker(failures=5, interval=30)
    assert answer(breaker, result, 0) is Transition.OPENED
    assert breaker.blocked(1) == replies.reply_for(result)  # that same 4xx
    assert breaker.admit(1) is None
    assert breaker.retry_in(1) == 29


def test_consecutive_transport_failures_open_it_and_answers_reset_the_count() -> None:
    breaker = Breaker(failures=3, interval=30)
    assert answer(breaker, DOWN, 0) is Transition.NONE
    assert answer(breaker, REFUSED, 0) is Transition.NONE
    assert answer(breaker, BAD_RCPT, 0) is Transition.NONE  # the API answered: not a run
    assert answer(breaker, UNKNOWN, 0) is Transition.NONE
    assert answer(breaker, DOWN, 0) is Transition.NONE
    assert answer(breaker, REFUSED, 0) is Transition.OPENED
    assert breaker.blocked(0) == replies.NEVER_SENT  # the reply of the failure that opened it


def test_429_opens_for_its_retry_after() -> None:
    breaker = Breaker(failures=5, interval=30)
    throttled = ApiResult(ResultKind.HTTP, http_status=429, retry_after=2.5)
    assert answer(breaker, throttled, 10) is Transition.OPENED
    assert breaker.blocked(12) == replies.THROTTLED
    assert breaker.blocked(12.5) is None
    # Without Retry-After one 429 only slows the key down (aimd): no pause.
    breaker = Breaker(failures=5, interval=30)
    assert answer(breaker, ApiResult(ResultKind.HTTP, http_status=429), 0) is Transition.NONE
    assert breaker.state is BreakerState.CLOSED
    assert breaker.retry_in(0) == 0


THROTTLED = ApiResult(ResultKind.HTTP, http_status=429)


def throttle(breaker: Breaker, now: float, *, fresh: bool = True) -> Transition:
    ticket = breaker.admit(now)
    assert ticket is not None
    return breaker.record(ticket, THROTTLED, replies.THROTTLED, now, fresh=fresh)


def test_only_a_run_of_fresh_429s_pauses_the_key() -> None:
    breaker = Breaker(failures=5, interval=30)
    assert THROTTLE_RUN == 3
    assert throttle(breaker, 0) is Transition.NONE
    assert throttle(breaker, 0, fresh=False) is Transition.NONE  # sent at the old pace
    assert throttle(breaker, 0) is Transition.NONE
    assert breaker.state is BreakerState.CLOSED and breaker.throttled == 2
    assert answer(breaker, BAD_RCPT, 0) is Transition.NONE  # the API answered at this pace
    assert breaker.throttled == 0
    assert [throttle(breaker, 1) for _ in range(3)] == [
        Transition.NONE,
        Transition.NONE,
        Transition.OPENED,
    ]
    assert breaker.blocked(1) == replies.THROTTLED
    assert (breaker.pause, breaker.retry_in(1)) == (30, 30)  # breaker_interval


def test_transport_failures_and_429s_keep_their_own_counts() -> None:
    breaker = Breaker(failures=2, interval=30)
    assert answer(breaker, DOWN, 0) is Transition.NONE
    assert throttle(breaker, 0) is Transition.NONE  # neither resets the other
    assert answer(breaker, DOWN, 0) is Transition.OPENED


def test_retry_after_is_capped_with_the_time_passed_in() -> None:
    breaker = Breaker(failures=5, interval=30, max_retry_after=300)
    huge = ApiResult(ResultKind.HTTP, http_status=429, retry_after=1e20)
    assert answer(breaker, huge, 100) is Transition.OPENED
    assert (breaker.pause, breaker.retry_at) == (300, 400)
    assert breaker.admit(399.9) is None
    assert breaker.admit(400) is not None  # the probe, five minutes later
    short = Breaker(max_retry_after=300)
    answer(short, ApiResult(ResultKind.HTTP, http_status=429, retry_after=7), 0)
    assert short.retry_in(0) == 7  # within the cap: as asked


def test_cap_retry_after() -> None:
    asked = ApiResult(ResultKind.HTTP, http_status=429, retry_after=3600.0)
    assert cap_retry_after(asked, 300).retry_after == 300
    assert cap_retry_after(asked, 300).http_status == 429
    within = ApiResult(ResultKind.HTTP, http_status=429, retry_after=60.0)
    assert cap_retry_after(within, 300) is within
    assert cap_retry_after(THROTTLED, 300) is THROTTLED  # no Retry-After at all


def test_a_failed_probe_reopens_for_a_new_pause_and_says_so() -> None:
    breaker = Breaker(failures=1, interval=30, max_retry_after=300)
    answer(breaker, DOWN, 0)
    probe = breaker.admit(30)
    assert probe is not None
    asked = ApiResult(ResultKind.HTTP, http_status=429, retry_after=86400.0)
    assert breaker.record(probe, asked, replies.THROTTLED, 31) is Transition.REOPENED
    assert (breaker.pause, breaker.retry_in(31)) == (300, 300)  # a day asked, capped
    probe = breaker.admit(331)
    assert probe is not None
    assert breaker.record(probe, THROTTLED, replies.THROTTLED, 331) is Transition.REOPENED
    assert breaker.pause == 30  # a 429 without Retry-After fails the probe too
    probe = breaker.admit(361)
    assert probe is not None
    assert breaker.record(probe, OK, replies.OK, 361) is Transition.CLOSED


def test_one_probe_after_the_interval_and_success_closes() -> None:
    breaker = Breaker(failures=1, interval=30)
    answer(breaker, DOWN, 0)
    assert breaker.admit(29.9) is None
    probe = breaker.admit(30)
    assert probe is not None and probe.probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.admit(30) is None  # only one probe at a time
    assert breaker.blocked(31) == replies.UPSTREAM_UNAVAILABLE
    assert breaker.record(probe, OK, replies.OK, 31) is Transition.CLOSED
    assert breaker.state is BreakerState.CLOSED
    assert breaker.blocked(31) is None


def test_failed_probe_opens_again_for_an_interval() -> None:
    breaker = Breaker(failures=1, interval=30)
    answer(breaker, DOWN, 0)
    probe = breaker.admit(30)
    assert probe is not None
    assert breaker.record(probe, BALANCE, replies.BALANCE, 31) is Transition.REOPENED
    assert breaker.state is BreakerState.OPEN
    assert breaker.blocked(31) == replies.BALANCE
    assert breaker.retry_in(31) == 30


def test_inconclusive_probe_frees_the_slot() -> None:
    breaker = Breaker(failures=1, interval=30)
    answer(breaker, DOWN, 0)
    probe = breaker.admit(30)
    assert probe is not None
    breaker.record(probe, BAD_RCPT, replies.BAD_RECIPIENT, 30)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.admit(30) is not None  # the next call is the probe


def test_late_answers_of_calls_made_before_the_change_are_ignored() -> None:
    breaker = Breaker(failures=1, interval=30)
    early = breaker.admit(0)
    assert early is not None
    answer(breaker, DOWN, 0)  # opens
    assert breaker.record(early, OK, replies.OK, 1) is Transition.NONE  # does not close it
    assert breaker.state is BreakerState.OPEN


def test_a_lost_probe_does_not_hold_the_breaker_for_ever() -> None:
    breaker = Breaker(failures=1, interval=30)
    answer(breaker, DOWN, 0)
    lost = breaker.admit(30)
    assert lost is not None
    assert breaker.admit(59) is None
    assert breaker.admit(60) is not None  # an interval later another call probes
    released = Breaker(failures=1, interval=30)
    answer(released, DOWN, 0)
    probe = released.admit(30)
    assert probe is not None
    released.release(probe)  # cancelled before it was sent
    assert released.admit(30) is not None


def test_breakers_are_per_key_and_take_new_settings() -> None:
    breakers = Breakers(failures=1, interval=30)
    answer(breakers.get("key-a"), DOWN, 0)
    assert breakers.get("key-a").blocked(0) is not None
    assert breakers.get("key-b").blocked(0) is None
    assert breakers.any_open()
    breakers.configure(failures=4, interval=5)
    assert (breakers.get("key-a").interval, breakers.get("key-b").failures) == (5, 4)
    assert "key-a" not in repr(breakers.get("key-a"))


def test_token_bucket_spaces_calls_at_the_rate() -> None:
    bucket = TokenBucket(4)  # 4 calls a second: one each 0.25s
    waits = [bucket.reserve(10.0) for _ in range(4)]
    assert waits == [0.0, 0.25, 0.5, 0.75]
    assert bucket.reserve(11.0) == 0.0  # idle long enough: at once again
    burst = TokenBucket(10, burst=3)
    assert [burst.reserve(0.0) for _ in range(5)] == [0.0, 0.0, 0.0, pytest.approx(0.1),
                                                      pytest.approx(0.2)]  # fmt: skip
    assert TokenBucket(0).reserve(0.0) == 0.0  # 0 = unlimited
    with pytest.raises(ValueError):
        TokenBucket(-1)


async def test_rate_limiter_waits_its_turn() -> None:
    now = [0.0]
    limiter = RateLimiter(1000, clock=lambda: now[0])
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(5):
        await limiter.acquire()
    assert loop.time() - started >= 0.003  # 4 waits of 1ms


# ---------------------------------------------------------------- the bridge


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def use_clock(b: Any) -> Clock:
    """Give the bridge's breakers a clock the test moves by hand."""
    clock = Clock()
    b.service.worker.gate.clock = clock
    return clock


async def api_is_back(b: Any) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.delete(f"{b.sandbox.base_url}/_script")
        response.raise_for_status()


async def refused_at_mail_from(b: Any) -> tuple[int, str]:
    async with b.client() as smtp:
        await smtp.ehlo()
        code, text = await smtp.execute_command(b"MAIL", b"FROM:<app@example.com>")
        return code, text


async def send(b: Any, subject: str, rcpt: str = "bob@example.org") -> tuple[int, str]:
    async with b.client() as smtp:
        await smtp.ehlo()
        code, text = await smtp.mail("app@example.com")
        if code != 250:
            return code, text
        await smtp.rcpt(rcpt)
        try:
            response = await smtp.data(make_message(subject))
        except aiosmtplib.SMTPDataError as exc:
            return exc.code, exc.message
        return response.code, response.message


async def test_direct_mode_refuses_at_mail_from_while_open_without_calling(bridge: Any) -> None:
    config = "api: {breaker_failures: 3, breaker_interval: 30s}\n" + ROUTES
    async with bridge(config) as b:
        clock = use_clock(b)
        b.sandbox.script({"status": 503, "times": 1000})
        for n in range(3):
            code, text = await send_data(b, f"down {n}")
            assert (code, text.split(" id=")[0]) == (451, _line(replies.UPSTREAM_UNAVAILABLE))
        assert b.service.breaker_is_open()
        assert b.service.metrics.breaker_open._value.get() == 1
        for _ in range(5):  # the outage goes on: nothing reaches the API
            assert await refused_at_mail_from(b) == (451, _line(replies.UPSTREAM_UNAVAILABLE))
        assert len(b.sandbox.sent()) == 3

        await api_is_back(b)
        clock.now += 29
        assert (await refused_at_mail_from(b))[0] == 451  # not yet
        clock.now += 1  # the interval is over: the next message is the probe
        code, text = await send_data(b, "probe")
        assert code == 250, text
        assert not b.service.breaker_is_open()
        assert b.service.metrics.breaker_open._value.get() == 0
        code, _ = await send_data(b, "after")
        assert code == 250
        assert [r["code"] for r in reversed(b.sandbox.sent())] == [None, None, None, 200, 200]


async def test_balance_exhausted_opens_at_once(bridge: Any) -> None:
    async with bridge() as b:
        use_clock(b)
        b.sandbox.script({"code": 40007})
        code, text = await send_data(b, "no balance")
        assert (code, text.split(" id=")[0]) == (451, _line(replies.BALANCE))
        assert await refused_at_mail_from(b) == (451, _line(replies.BALANCE))
        assert len(b.sandbox.sent()) == 1


@pytest.mark.parametrize("mode", ["queue", "hybrid"])
async def test_api_outage_queue_and_hybrid_keep_answering_250_then_deliver_all(
    bridge: Any, mode: str
) -> None:
    config = (
        f"delivery: {{mode: {mode}, backoff: [50ms]}}\n"
        "api: {breaker_failures: 1, breaker_interval: 30s}\n" + ROUTES
    )
    async with bridge(config) as b:
        clock = use_clock(b)
        b.sandbox.script({"status": 503, "times": 1000})
        code, _ = await send_data(b, "m0")
        assert code == 250
        await requests(b, 1)  # the one call that found the API down
        if mode == "queue":
            await attempts_done(b, 1)
        assert b.service.breaker_is_open()
        for n in range(1, 10):  # the outage: every message is taken, none is sent
            code, text = await send_data(b, f"m{n}")
            assert code == 250, text
        depth, _ = await b.service.store.spool_stats()
        assert depth == 10
        assert len(b.sandbox.sent()) == 1
        await b.service.worker.refresh_gauges()
        assert b.service.metrics.queue_depth._value.get() == 10
        assert b.service.metrics.breaker_open._value.get() == 1

        await api_is_back(b)
        clock.now += 30
        b.service.worker.wake()
        await spool_drained(b)
        subjects = sorted(r["data"]["subject"] for r in b.delivered())
        assert subjects == sorted(f"m{n}" for n in range(10))  # each once
        assert len(b.sandbox.sent()) == 11  # the failure + one call per message
        assert not b.service.breaker_is_open()


async def test_rate_limit_caps_calls_per_second(bridge: Any) -> None:
    config = "delivery: {mode: queue}\napi: {rate_limit: 20}\n" + ROUTES
    async with bridge(config) as b:
        for n in range(6):
            assert (await send_data(b, f"r{n}", f"r{n}@example.org"))[0] == 250
        sent = await requests(b, 6)
        times = [datetime.fromisoformat(r["time"]) for r in sent]
        # 6 calls at 20/s: 5 gaps of 50ms at least (ms timestamps, network jitter).
        assert (times[-1] - times[0]).total_seconds() >= 0.23


async def send_data(b: Any, subject: str, rcpt: str = "bob@example.org") -> tuple[int, str]:
    return await send(b, subject, rcpt)


def _line(reply: replies.Reply) -> str:
    return f"{reply.status} {reply.text}"
