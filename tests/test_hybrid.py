"""Hybrid mode (docs/guarantees.md): direct delivery, and the spool for what could not go now.

A permanent answer is told to the client as it is; a transient or unknown one
puts the recipient in the spool and the client gets 250; the queue worker
delivers it later. Real bridge, real SMTP client, the sandbox scripted to fail.
"""

from __future__ import annotations

from typing import Any

from test_queue import ROUTES, attempts_done, make_message, queue_id_of, record, requests, send

from smtp_bridge import replies
from smtp_bridge.outcomes import RecipientState
from smtp_bridge.policy import JITTER

HYBRID = "delivery: {mode: hybrid, backoff: [50ms]}\n" + ROUTES
#: Retries an hour away: the spooled state can be looked at before the worker acts.
HYBRID_SLOW = "delivery: {mode: hybrid, backoff: [1h]}\n" + ROUTES
S = RecipientState


async def hurry(b: Any, queue_id: str) -> None:
    """What ``smtp-bridge queue retry ID`` does: the message's waiting recipients are due now."""
    await b.service.store.retry(queue_id)
    b.service.worker.wake()


async def test_delivered_at_once_answers_250_ok(bridge: Any) -> None:
    async with bridge(HYBRID) as b:
        code, text = await send(b, make_message(), ["bob@example.org"])
        assert (code, text.split(" id=")[0]) == (250, f"{replies.OK.status} {replies.OK.text}")
        assert len(b.delivered()) == 1  # while the client waited
        message, _ = await record(b, queue_id_of(text))
        assert message.content is None  # nothing spooled, nothing kept


async def test_permanent_answer_for_a_single_recipient_gets_its_5xx(bridge: Any) -> None:
    async with bridge(HYBRID) as b:
        b.sandbox.script({"code": 40005})
        code, text = await send(b, make_message(), ["bob@example.org"])
        assert (code, text.split(" id=")[0]) == (
            550,
            f"{replies.BAD_RECIPIENT.status} {replies.BAD_RECIPIENT.text}",
        )
        message, rcpts = await record(b, queue_id_of(text))
        assert rcpts["bob@example.org"].state is S.FAILED  # told to the client: no dead letter
        assert message.content is None
        assert (await b.service.store.counts())["dead"] == 0


async def test_transient_answer_gets_250_and_is_delivered_later(bridge: Any) -> None:
    async with bridge(HYBRID_SLOW) as b:
        b.sandbox.script({"status": 503})
        code, text = await send(b, make_message("Later"), ["bob@example.org"])
        assert code == 250, text
        assert text.startswith(f"{replies.QUEUED.status} {replies.QUEUED.text}")
        queue_id = queue_id_of(text)
        message, rcpts = await record(b, queue_id)
        assert message.content is not None  # spooled before the 250
        assert rcpts["bob@example.org"].state is S.RETRYING
        # backoff: 1h times the jitter factor, never less than its lower bound
        assert rcpts["bob@example.org"].next_attempt >= message.received_at + 3600 * JITTER[0]
        await hurry(b, queue_id)
        await attempts_done(b, 1)
        sent = await requests(b, 2)
        assert [(r["code"], r["data"]["subject"]) for r in sent] == [
            (None, "Later"),
            (200, "Later"),
        ]
        message, rcpts = await record(b, queue_id)
        assert (rcpts["bob@example.org"].state, rcpts["bob@example.org"].attempts) == (
            S.DELIVERED,
            2,
        )
        assert message.content is None


async def test_unknown_outcome_gets_250_and_is_sent_again(bridge: Any) -> None:
    async with bridge(HYBRID_SLOW) as b:
        b.sandbox.script({"action": "reset"})
        code, text = await send(b, make_message(), ["bob@example.org"])
        assert code == 250, text
        _, rcpts = await record(b, queue_id_of(text))
        assert rcpts["bob@example.org"].state is S.UNKNOWN
        await hurry(b, queue_id_of(text))
        await attempts_done(b, 1)
        _, rcpts = await record(b, queue_id_of(text))
        assert rcpts["bob@example.org"].state is S.DELIVERED


async def test_mixed_outcomes_250_with_dead_letter_and_spooled_recipient(bridge: Any) -> None:
    async with bridge(HYBRID_SLOW) as b:
        b.sandbox.script(
            {"code": 40005, "to": "bad@example.org"}, {"status": 503, "to": "slow@example.org"}
        )
        code, text = await send(
            b, make_message(), ["ok@example.org", "bad@example.org", "slow@example.org"]
        )
        assert code == 250, text
        _, rcpts = await record(b, queue_id_of(text))
        assert rcpts["ok@example.org"].state is S.DELIVERED
        assert rcpts["bad@example.org"].state is S.DEAD  # the client got 250: a dead letter
        assert rcpts["slow@example.org"].state is S.RETRYING
        # `queue retry ID` hurries the waiting recipient and revives the dead letter.
        await hurry(b, queue_id_of(text))
        await attempts_done(b, 2)
        assert sorted(r["to"] for r in b.delivered()) == [
            "bad@example.org",
            "ok@example.org",
            "slow@example.org",
        ]


async def test_transient_answer_is_retried_by_the_worker_on_its_own(bridge: Any) -> None:
    async with bridge(HYBRID) as b:
        b.sandbox.script({"status": 503, "times": 2})
        code, text = await send(b, make_message(), ["bob@example.org"])
        assert code == 250, text
        await attempts_done(b, 2)  # 503 again, then delivered: 50ms backoff each
        _, rcpts = await record(b, queue_id_of(text))
        assert (rcpts["bob@example.org"].state, rcpts["bob@example.org"].attempts) == (
            S.DELIVERED,
            3,
        )


async def test_only_permanent_failures_get_the_5xx(bridge: Any) -> None:
    async with bridge(HYBRID) as b:
        b.sandbox.script({"code": 40008, "times": 2})
        code, _ = await send(b, make_message(), ["a@example.org", "b@example.org"])
        assert code == 554
        assert (await b.service.store.spool_stats()).depth == 0
