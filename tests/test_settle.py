"""An outcome write is retried until on record, as sessions and workers both rely on.

The end-to-end side (a real store refusing writes, the daemon's lines) is in
test_once.py and test_store_outage.py; here, the loop's own contract: its
backoff, when it gives up, and what it says then.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from smtp_bridge import settle
from smtp_bridge.errors import StoreError
from smtp_bridge.outcomes import RecipientState
from smtp_bridge.settle import RECORD_RETRY, LateWrites, write_until_recorded
from smtp_bridge.store import RecipientRecord

WHERE = {"queue_id": "Q1", "rcpt": "a@example.org"}


class FailingWrites:
    """A write the store refuses ``failures`` times, then takes."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def write(self) -> bool:
        self.calls += 1
        if self.calls <= self.failures:
            raise StoreError("database or disk is full")
        return True


@pytest.fixture
def waited(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The backoff's waits, taken at once."""
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)

    monkeypatch.setattr(settle.asyncio, "sleep", sleep)
    return delays


def events(log_lines: Any, name: str) -> list[dict[str, Any]]:
    return [e for e in log_lines() if e["event"] == name]


async def test_a_workers_write_is_retried_on_the_backoff_until_the_store_takes_it(
    waited: list[float], log_lines: Any
) -> None:
    store = FailingWrites(6)
    about = {**WHERE, "state": "delivered"}
    result = await write_until_recorded(store.write, about=about, retry_fields=WHERE)
    assert result == (True, 6)
    assert waited == [*RECORD_RETRY, RECORD_RETRY[-1]]  # the last step repeats
    lines = events(log_lines, "store_error")
    assert [e["retry"] for e in lines] == [1, 2, 3, 4, 5, 6]
    assert {(e["queue_id"], e["rcpt"], e["error"]) for e in lines} == {
        ("Q1", "a@example.org", "database or disk is full")
    }
    assert events(log_lines, "outcome_unrecorded") == []


async def test_a_sessions_write_that_failed_before_its_reply_waits_first(
    waited: list[float], log_lines: Any
) -> None:
    store = FailingWrites(1)
    assert await write_until_recorded(store.write, about=WHERE, failed=1) == (True, 2)
    assert waited == list(RECORD_RETRY[:2])
    assert events(log_lines, "store_error") == []  # no retry_fields: silent


async def test_stopping_gives_a_failing_write_one_last_try_then_says_what_is_unrecorded(
    waited: list[float], log_lines: Any
) -> None:
    store = FailingWrites(99)
    about = {**WHERE, "state": "delivered"}
    with pytest.raises(StoreError):
        await write_until_recorded(store.write, about=about, stopping=lambda: True)
    assert store.calls == 2
    [line] = events(log_lines, "outcome_unrecorded")
    assert (line["queue_id"], line["rcpt"], line["state"], line["level"]) == (
        "Q1",
        "a@example.org",
        "delivered",
        "error",
    )


async def test_closing_late_writes_gives_each_a_last_try(log_lines: Any) -> None:
    late = LateWrites()
    landing, failing = FailingWrites(0), FailingWrites(99)
    for rcpt, writes in (("a@example.org", landing), ("b@example.org", failing)):
        record = RecipientRecord(queue_id="Q1", rcpt=rcpt, state=RecipientState.DELIVERED)
        late.keep("Q1", [record], writes.write)
    await asyncio.sleep(0)  # both wait for their first retry
    await late.close()
    assert (landing.calls, failing.calls) == (1, 1)
    [line] = events(log_lines, "outcome_unrecorded")
    assert (line["rcpts"], line["states"]) == (["b@example.org"], ["delivered"])
    assert events(log_lines, "outcome_recorded_late") == []
