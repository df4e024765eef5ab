"""Each API key's pace (AIMD, docs/guarantees.md): the pure policy, then its asyncio face.

No clock is needed for the concurrency: a drop and a climb are counted in
answers, not in seconds. The rate part takes its clock from the test.
"""

from __future__ import annotations

import asyncio

import pytest

from smtp_bridge.aimd import DEFAULT_LABEL, KeyPace, Pace, Paces, key_label
from smtp_bridge.ratelimit import TokenBucket
from smtp_bridge.sandbox import fingerprint

# ---------------------------------------------------------------- the policy


def test_a_429_halves_the_limit_and_successes_add_one_per_round() -> None:
    pace = Pace(8)
    assert (pace.limit, pace.slowed) == (8, False)
    assert pace.throttled(pace.epoch) is True
    assert (pace.limit, pace.slowed) == (4, True)
    for _ in range(3):
        pace.succeeded()
    assert pace.limit == 4  # a round is `limit` answers: not yet
    pace.succeeded()
    assert pace.limit == 5  # +1 after a round of 4
    for _ in range(200):
        pace.succeeded()
    assert (pace.limit, pace.slowed) == (8, False)  # never above max_concurrency


def test_never_below_one() -> None:
    pace = Pace(4)
    for _ in range(10):
        pace.throttled(pace.epoch)
    assert pace.limit == 1
    pace.succeeded()  # 1 + 1/1
    assert pace.limit == 2


def test_429s_to_calls_sent_before_the_drop_change_nothing() -> None:
    pace = Pace(64)
    sent_together = pace.epoch  # 64 calls in flight when the API starts throttling
    assert pace.throttled(sent_together) is True
    assert all(pace.throttled(sent_together) is False for _ in range(63))
    assert pace.limit == 32  # halved once, not to 1
    assert pace.throttled(pace.epoch) is True  # a call sent at the new pace
    assert pace.limit == 16


def test_rate_follows_the_same_factor_and_only_when_configured() -> None:
    pace = Pace(10, rate=20)
    assert pace.rate == 20
    pace.throttled(pace.epoch)
    assert pace.rate == 10
    assert Pace(10).rate == 0  # no api.rate_limit: no rate of the key's own


def test_reload_keeps_a_slowed_window_and_moves_a_full_one() -> None:
    full, slowed = Pace(8), Pace(8)
    slowed.throttled(slowed.epoch)
    full.configure(16, 0)
    slowed.configure(16, 0)
    assert (full.limit, slowed.limit) == (16, 4)
    slowed.configure(2, 0)
    assert slowed.limit == 2
    with pytest.raises(ValueError):
        Pace(0)


def test_labels_never_contain_the_key() -> None:
    key = "k-very-secret-0123456789"
    assert key_label("default-key", "default-key") == DEFAULT_LABEL
    label = key_label(key, "default-key")
    assert label == f"sha256:{fingerprint(key)}"  # what the sandbox's /_sent shows
    assert key not in label and len(label) == len("sha256:") + 12
    paces = Paces(4)
    paces.configure(ceiling=4, rate=0, default_key=key)
    assert paces.get(key).label == DEFAULT_LABEL
    paces.configure(ceiling=4, rate=0, default_key="other")  # a reload with a new api.app_key
    assert paces.get(key).label == label


def test_retune_keeps_the_schedule() -> None:
    bucket = TokenBucket(10)
    assert bucket.reserve(0.0) == 0.0
    bucket.retune(5)  # slowed down: the next call is not freed at once
    assert bucket.reserve(0.0) == pytest.approx(0.1)
    assert bucket.reserve(0.0) == pytest.approx(0.3)


# ---------------------------------------------------------------- waiting for a slot


async def steps(n: int = 5) -> None:
    """Let the other tasks run until they block (a loop step each, not a timed wait)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_calls_over_the_limit_wait_their_turn_not_refused() -> None:
    pace = KeyPace(Pace(2), "default")
    pace.throttled(pace.pace.epoch)  # limit 1
    first = pace.try_acquire()
    assert first is not None and pace.try_acquire() is None  # the one slot is taken
    second = asyncio.create_task(pace.acquire())
    third = asyncio.create_task(pace.acquire())
    await steps()
    assert (second.done(), third.done(), pace.waiting, pace.in_flight) == (False, False, 2, 1)
    pace.release()
    assert await second == first  # the first waiter, in the same epoch
    assert not third.done()
    pace.succeeded()  # limit 1 -> 2: the next waiter goes at once
    assert pace.pace.limit == 2
    await third
    assert (pace.in_flight, pace.waiting) == (2, 0)


async def test_a_cancelled_waiter_holds_nothing() -> None:
    pace = KeyPace(Pace(1), "default")
    await pace.acquire()
    waiter = asyncio.create_task(pace.acquire())
    await steps()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):
            await waiter  # the gate's api.timeout around the wait, expired
    assert waiter.cancelled() and pace.waiting == 0
    pace.release()
    assert pace.in_flight == 0
    await pace.acquire()  # the slot is free again
    assert pace.in_flight == 1


async def test_a_slot_handed_to_a_cancelled_waiter_goes_on() -> None:
    pace = KeyPace(Pace(1), "default")
    await pace.acquire()
    waiter = asyncio.create_task(pace.acquire())
    later = asyncio.create_task(pace.acquire())
    await steps()
    pace.release()  # handed to `waiter`...
    waiter.cancel()  # ...which is cancelled before it runs
    await later  # so it passed to the next one
    assert waiter.cancelled() and pace.in_flight == 1


async def test_a_slowed_key_keeps_to_its_share_of_the_rate() -> None:
    now = [100.0]
    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)  # the clock stands still: each wait is the schedule's

    pace = KeyPace(Pace(2, rate=10), "default", clock=lambda: now[0], sleep=sleep)
    await pace.acquire()  # full pace: api.rate_limit's process-wide bucket decides
    pace.release()
    pace.throttled(pace.pace.epoch)  # limit 1, 5 calls a second
    for _ in range(3):
        await pace.acquire()
        pace.release()
    assert slept == [pytest.approx(0.2), pytest.approx(0.4)]  # 1/5 s apart
